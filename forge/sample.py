"""Text generation from a trained model, for showing what a run has learned."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from forge import tokenizer

if TYPE_CHECKING:
    from forge.model import HRMSMoE


@torch.no_grad()
def generate(
    model: HRMSMoE,
    prompt: str,
    max_new_tokens: int = 200,
    *,
    temperature: float = 0.8,
    top_k: int = 40,
    seed: int = 0,
) -> str:
    """Continue ``prompt`` by sampling from the model; returns only the new text.

    Sampling stops at the end-of-document id. The context is cut to the model's
    ``max_seq_len`` most recent tokens.
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = tokenizer.encode(prompt) or [tokenizer.EOS_ID]
    window = model.config.max_seq_len
    new: list[int] = []
    try:
        for _ in range(max_new_tokens):
            context = torch.tensor([ids[-window:]], dtype=torch.long, device=device)
            logits = model(context).logits[0, -1].float() / temperature  # [V]
            if 0 < top_k < logits.numel():
                floor = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < floor, float("-inf"))
            token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
            if token == tokenizer.EOS_ID:
                break
            ids.append(token)
            new.append(token)
    finally:
        model.train(was_training)
    return tokenizer.decode(new)
