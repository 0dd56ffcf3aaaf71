"""Local training of one lease, and evaluation.

A lease's update is the pseudo-gradient ``theta_start - theta_end`` after
``local_steps`` AdamW steps over the lease's sequences. Each step uses
``batch_size`` sequences, cycling through the lease in an order shuffled by the
recipe's seed, and splits them into micro-batches whose gradients accumulate;
the model's routing is per sequence, so the split does not change the result.
On a CUDA out-of-memory error the micro-batch is halved and the step retried.

- :class:`TrainingStopped`: ``should_stop`` asked training to end early.
- :class:`NonFiniteResult`: the loss or the pseudo-gradient is not finite.
- :class:`RecipeError`: the recipe or the lease's tokens cannot be trained on.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor
from torch.nn.utils import clip_grad_norm_

from forge.model import HRMSMoE, lm_loss

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, float], None]
FLOAT32_LIMIT = 1e38  # below float32's largest finite value, about 3.4e38


class TrainingStopped(Exception):  # noqa: N818 -- the agreed name
    """Training was asked to stop before all of its steps ran."""


class NonFiniteResult(ArithmeticError):  # noqa: N818 -- reads as the event
    """The training loss or the pseudo-gradient holds a NaN or an infinity."""


class RecipeError(ValueError):
    """A recipe or a lease's tokens are unusable for training."""


@dataclass(frozen=True)
class TrainRecipe:
    """How a worker trains one lease; the server sets it, the worker may shrink
    ``micro_batch_size`` to fit its memory."""

    local_steps: int
    batch_size: int
    micro_batch_size: int
    learning_rate: float
    weight_decay: float
    beta1: float
    beta2: float
    grad_clip_norm: float  # 0 disables clipping
    seed: int


@dataclass(frozen=True)
class TrainResult:
    """The outcome of one lease.

    ``sample_count`` is the number of distinct sequences trained on and
    ``token_count`` the number of tokens processed (a sequence seen twice counts
    twice). ``loss_before`` is the language-model loss of the first step's batch
    at the start weights and ``loss_after`` that of the same batch at the end
    weights (nats per token). ``expert_usage`` is averaged over all steps,
    ``[n_moe_layers][num_experts]``.
    """

    pseudo_gradient: dict[str, Tensor]
    loss_before: float
    loss_after: float
    sample_count: int
    token_count: int
    seconds: float
    micro_batch_size: int
    expert_usage: list[list[float]]


def train_lease(
    model: HRMSMoE,
    tokens: Tensor,
    recipe: TrainRecipe,
    *,
    device: torch.device,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``tokens`` [S, L+1] and return its update.

    The model is moved to ``device`` and ends at ``theta_end``; the
    pseudo-gradient is float32 on the CPU, one entry per state-dict name (tied
    names carry equal values).
    """
    started = time.perf_counter()
    tokens = _check_inputs(model, tokens, recipe).to(device)
    model.to(device)
    theta_start = _snapshot(model)
    batches = _batches(tokens, recipe)
    first_batch = tokens[0:0]  # replaced by the first step's batch

    with _training_mode(model):
        loop = _StepLoop(model, recipe, device)
        for step, batch in enumerate(batches, start=1):
            if should_stop is not None and should_stop():
                raise TrainingStopped(f"stopped before step {step}")
            if step == 1:
                first_batch = batch
            loss = loop.step(batch)
            if progress is not None:
                progress(step, recipe.local_steps, loss)
        loss_after = evaluate(model, first_batch, batch_size=loop.micro, device=device)

    length = tokens.shape[1] - 1
    result = TrainResult(
        pseudo_gradient=_pseudo_gradient(theta_start, model),
        loss_before=loop.losses[0],
        loss_after=loss_after,
        sample_count=min(tokens.shape[0], recipe.local_steps * recipe.batch_size),
        token_count=recipe.local_steps * recipe.batch_size * length,
        seconds=time.perf_counter() - started,
        micro_batch_size=loop.micro,
        expert_usage=(loop.usage / recipe.local_steps).tolist(),
    )
    logger.info(
        "trained %d steps: loss %.4f -> %.4f in %.1f s (micro-batch %d)",
        recipe.local_steps,
        result.loss_before,
        result.loss_after,
        result.seconds,
        result.micro_batch_size,
    )
    return result


class _StepLoop:
    """The optimizer and the running totals of one lease's steps."""

    def __init__(self, model: HRMSMoE, recipe: TrainRecipe, device: torch.device):
        self.model = model
        self.recipe = recipe
        self.optimizer = _optimizer(model, recipe, device)
        self.micro = max(1, min(recipe.micro_batch_size, recipe.batch_size))
        config = model.config
        self.usage = torch.zeros(model.moe_layers, config.num_experts, device=device)
        self.losses: list[float] = []

    def step(self, batch: Tensor) -> float:
        """One AdamW step on ``batch``; returns its mean LM loss before the step."""
        loss, usage, self.micro = _step_with_retry(self.model, batch, self.micro)
        value = loss.item()  # the step's one device sync, for the report
        if not math.isfinite(value):
            raise NonFiniteResult(
                f"training loss is {value} at step {len(self.losses) + 1}"
            )
        if self.recipe.grad_clip_norm > 0:
            clip_grad_norm_(self.model.parameters(), self.recipe.grad_clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.usage += usage
        self.losses.append(value)
        return value


def evaluate(
    model: HRMSMoE,
    tokens: Tensor,
    *,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
) -> float:
    """Mean next-token cross-entropy of ``tokens`` [N, L+1] in nats per token.

    No auxiliary loss and no graph; the model is moved to ``device`` and left in
    the mode it was in.
    """
    if tokens.dim() != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise RecipeError(
            f"evaluation needs tokens [N >= 1, L+1 >= 2], got {tokens.shape}"
        )
    model.to(device)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    try:
        with torch.no_grad():
            for start in range(0, tokens.shape[0], max(1, batch_size)):
                chunk = tokens[start : start + batch_size].to(device).long()
                logits = model(chunk[:, :-1]).logits
                total += F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(),
                    chunk[:, 1:].reshape(-1),
                    reduction="sum",
                ).double()
    finally:
        model.train(was_training)
    return total.item() / (tokens.shape[0] * (tokens.shape[1] - 1))


def _check_inputs(model: HRMSMoE, tokens: Tensor, recipe: TrainRecipe) -> Tensor:
    _check_recipe(recipe)
    if tokens.dim() != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise RecipeError(
            f"a lease needs tokens [S >= 1, L+1 >= 2], got {tokens.shape}"
        )
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise RecipeError(f"token ids must be integers, got {tokens.dtype}")
    if tokens.shape[1] - 1 > model.config.max_seq_len:
        raise RecipeError(
            f"sequences of {tokens.shape[1] - 1} tokens exceed the model's "
            f"max_seq_len {model.config.max_seq_len}"
        )
    ids = tokens.long()
    if int(ids.min()) < 0 or int(ids.max()) >= model.config.vocab_size:
        raise RecipeError(f"token ids must lie in [0, {model.config.vocab_size})")
    return ids


def _check_recipe(recipe: TrainRecipe) -> None:
    if recipe.local_steps < 1 or recipe.batch_size < 1 or recipe.micro_batch_size < 1:
        raise RecipeError(f"steps and batch sizes must be at least 1: {recipe}")
    # Comparisons written so that NaN fails them; the bounds keep every value
    # representable in float32, which the fused optimizers require.
    checks = {
        "learning_rate": 0 < recipe.learning_rate <= FLOAT32_LIMIT,
        "weight_decay": 0 <= recipe.weight_decay <= FLOAT32_LIMIT,
        "beta1": 0 <= recipe.beta1 < 1,
        "beta2": 0 <= recipe.beta2 < 1,
        "grad_clip_norm": 0 <= recipe.grad_clip_norm <= FLOAT32_LIMIT,
    }
    for name, ok in checks.items():
        if not ok:
            raise RecipeError(f"{name} {getattr(recipe, name)!r} is out of range")


def _snapshot(model: HRMSMoE) -> dict[str, Tensor]:
    """Float32 CPU copies of the state; tied names share one copy."""
    copies: dict[tuple[int, tuple[int, ...], tuple[int, ...]], Tensor] = {}
    snapshot: dict[str, Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride())
        if key not in copies or tensor.numel() == 0:
            copies[key] = tensor.detach().to("cpu", torch.float32, copy=True)
        snapshot[name] = copies[key]
    return snapshot


def _pseudo_gradient(start: dict[str, Tensor], model: HRMSMoE) -> dict[str, Tensor]:
    end = model.state_dict()
    update: dict[str, Tensor] = {}
    for name, before in start.items():
        delta = before - end[name].detach().to("cpu", torch.float32)
        if not bool(torch.isfinite(delta).all()):
            raise NonFiniteResult(f"pseudo-gradient of {name!r} is not finite")
        update[name] = delta
    return update


def _optimizer(
    model: HRMSMoE, recipe: TrainRecipe, device: torch.device
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm weights are not decayed)."""
    params = list(model.parameters())
    groups = [
        {
            "params": [p for p in params if p.dim() >= 2],
            "weight_decay": recipe.weight_decay,
        },
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=recipe.learning_rate,
        betas=(recipe.beta1, recipe.beta2),
        fused=device.type == "cuda",
    )


def _batches(tokens: Tensor, recipe: TrainRecipe) -> Iterator[Tensor]:
    """The ``local_steps`` batches of ``batch_size`` rows, cycling through the
    lease's sequences in an order shuffled by the recipe's seed."""
    count = tokens.shape[0]
    generator = torch.Generator().manual_seed(recipe.seed)
    permutation = torch.randperm(count, generator=generator).to(tokens.device)
    for step in range(recipe.local_steps):
        picks = (torch.arange(recipe.batch_size) + step * recipe.batch_size) % count
        yield tokens[permutation[picks.to(tokens.device)]]


def _step_with_retry(
    model: HRMSMoE, batch: Tensor, micro: int
) -> tuple[Tensor, Tensor, int]:
    """Accumulate one step's gradients, halving the micro-batch on CUDA OOM.

    Returns the step's mean LM loss (a tensor, not yet synced), the expert usage
    averaged over the batch, and the micro-batch size that worked.
    """
    while True:
        try:
            loss, usage = accumulate_gradients(model, batch, micro)
            return loss, usage, micro
        except torch.cuda.OutOfMemoryError:
            if micro == 1:
                raise
        # Past the except block its traceback, and the graph the traceback holds,
        # is gone, so the cache can hand that memory back.
        model.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        logger.warning("out of GPU memory at micro-batch %d; halving it", micro)
        micro //= 2


def accumulate_gradients(
    model: HRMSMoE, batch: Tensor, micro: int
) -> tuple[Tensor, Tensor]:
    """Add the gradient of ``batch``'s mean loss to ``.grad``, ``micro`` rows at a time.

    Each micro-batch's loss is weighted by its share of the batch, so the sum
    equals one pass over the whole batch. Returns the batch's mean LM loss and
    expert usage, as tensors (no device sync).
    """
    size = batch.shape[0]
    loss = torch.zeros((), device=batch.device)
    usage = torch.zeros((), device=batch.device)
    for start in range(0, size, micro):
        chunk = batch[start : start + micro]
        share = chunk.shape[0] / size  # weight of this micro-batch in the batch mean
        out = lm_loss(model, chunk)
        torch.autograd.backward(out.loss * share)
        loss = loss + out.lm_loss * share
        usage = usage + out.expert_usage * share
    return loss, usage


@contextmanager
def _training_mode(model: HRMSMoE) -> Iterator[None]:
    was_training = model.training
    model.train()
    try:
        yield
    finally:
        model.train(was_training)
