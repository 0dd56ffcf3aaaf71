"""HRM-sMoE: a decoder-only language model with two recurrent levels and sparse MoE.

One forward pass embeds the tokens into ``x`` and keeps two states of the same
shape, ``z_low`` and ``z_high`` (both start at zero). For each of ``h_cycles``
high-level steps the low-level module runs ``l_cycles`` times on
``z_low + z_high + x``; the high-level module then updates ``z_high`` from
``z_high + z_low``. The output head reads the final-normed ``z_high``.

Every block is pre-norm (RMSNorm): causal self-attention with rotary position
embeddings, then a sparse mixture of SwiGLU experts with top-k routing, a
per-expert capacity and a Switch-style load-balancing loss.

Routing statistics are computed per sequence (each sequence is its own routing
group): an expert's capacity, the dropped assignments and the balancing loss of
one sequence never depend on the other sequences of the batch. Splitting a batch
into micro-batches therefore gives the same gradients as the whole batch, and a
model scores a sequence the same whatever it is batched with. Inside a sequence
an expert takes assignments in token order, so a token's output never depends on
later tokens, capacity drops included.

Gradients flow through every cycle: exact backpropagation is affordable at a few
cycles. ``ModelConfig.one_step_grad`` switches to HRM's one-step approximation
for long cycle counts on small memories.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from forge.config import ModelConfig

logger = logging.getLogger(__name__)

INIT_STD = 0.02


class SequenceLengthError(ValueError):
    """A token sequence is longer than the model's ``max_seq_len``."""


@dataclass
class ModelOutput:
    """What one forward pass returns.

    ``aux_loss`` is the unscaled load-balancing loss (1.0 when routing is
    perfectly even), averaged over every MoE layer application of the pass.
    ``expert_usage`` holds, per MoE layer (low-level layers first, then the
    high-level ones), the fraction of the router's assignments that went to each
    expert, counted before capacity drops; each row sums to 1.
    ``drop_fraction`` is, per MoE layer, the fraction of assignments dropped
    because their expert was full.
    """

    logits: Tensor  # [B, T, V]
    aux_loss: Tensor  # scalar
    expert_usage: Tensor  # [n_moe_layers, num_experts]
    drop_fraction: Tensor  # [n_moe_layers]


@dataclass(frozen=True)
class LossOutput:
    """The training loss of one batch and its parts.

    ``loss`` is ``lm_loss + aux_loss_coef * aux_loss`` and carries the graph;
    the other fields are detached.
    """

    loss: Tensor
    lm_loss: Tensor
    aux_loss: Tensor
    expert_usage: Tensor  # [n_moe_layers, num_experts]


@dataclass(frozen=True)
class RoutingStats:
    """What one MoE layer application reports besides its output."""

    aux_loss: Tensor  # scalar, with grad
    assignments: Tensor  # [num_experts] float, assignments per expert before drops
    dropped: Tensor  # scalar float, assignments dropped by capacity
    total: int  # assignments made (tokens * top_k)


def rope_tables(config: ModelConfig, device: torch.device | None = None) -> Tensor:
    """Rotary angles as ``[2, max_seq_len, head_dim // 2]``: cosines, then sines."""
    head_dim = config.d_model // config.n_heads
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device)
    inverse_freq = config.rope_base ** (-exponents / head_dim)
    positions = torch.arange(config.max_seq_len, dtype=torch.float64, device=device)
    angles = torch.outer(positions, inverse_freq)
    return torch.stack([angles.cos(), angles.sin()]).float()


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate ``x`` [B, H, T, head_dim] by the angles of its positions."""
    length = x.shape[-2]
    cos, sin = rope[0, :length], rope[1, :length]  # [T, head_dim / 2]
    first, second = x.chunk(2, dim=-1)
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary position embeddings."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x: Tensor, rope: Tensor) -> Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.n_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, T, head_dim]
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        output: Tensor = self.proj(y.transpose(1, 2).reshape(batch, length, width))
        return output


class MixtureOfExperts(nn.Module):
    """Sparse feed-forward layer: ``num_experts`` SwiGLU experts, top-k routing.

    Expert weights are stacked into three tensors so that a layer is three
    update tensors on the wire, not ``3 * num_experts``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        experts, width = config.num_experts, config.d_model
        hidden = config.expert_hidden
        self.num_experts = experts
        self.top_k = config.top_k
        self.capacity_factor = config.capacity_factor
        self.router = nn.Linear(width, experts, bias=False)
        self.w_gate = nn.Parameter(torch.empty(experts, width, hidden))
        self.w_up = nn.Parameter(torch.empty(experts, width, hidden))
        self.w_down = nn.Parameter(torch.empty(experts, hidden, width))

    def capacity(self, length: int) -> int:
        """Assignments one expert accepts from one sequence of ``length`` tokens."""
        fair_share = length * self.top_k / self.num_experts
        return max(1, math.ceil(self.capacity_factor * fair_share))

    def forward(self, x: Tensor) -> tuple[Tensor, RoutingStats]:
        batch, length, width = x.shape
        experts, top_k = self.num_experts, self.top_k
        flat = x.reshape(-1, width)  # [N, D], N = B * T

        probs = self.router(flat).float().softmax(dim=-1)  # [N, E]
        gate, expert = probs.topk(top_k, dim=-1)  # [N, k]
        gate = gate / gate.sum(dim=-1, keepdim=True)

        # Queue order inside a sequence is by position (a token's k choices
        # together), so whether an assignment is kept depends only on earlier
        # tokens: capacity drops never leak the future into the logits.
        one_hot = F.one_hot(expert.view(batch, length * top_k), experts)
        position = (one_hot.cumsum(dim=1) * one_hot).sum(dim=-1) - 1  # [B, T*k]
        keep = (position < self.capacity(length)).reshape(-1)  # [N*k]

        output = self._dispatch(flat, expert.reshape(-1), gate.reshape(-1), keep)

        # Switch loss per sequence: E * sum_e (share of assignments) * (mean prob).
        share = one_hot.float().mean(dim=1)  # [B, E]
        mean_prob = probs.view(batch, length, experts).mean(dim=1)  # [B, E]
        aux = experts * (share * mean_prob).sum(dim=-1).mean()
        stats = RoutingStats(
            aux_loss=aux,
            assignments=one_hot.sum(dim=(0, 1)).float().detach(),
            dropped=(~keep).sum().float(),
            total=keep.numel(),
        )
        return output.view(batch, length, width), stats

    def _dispatch(
        self, flat: Tensor, expert: Tensor, gate: Tensor, keep: Tensor
    ) -> Tensor:
        """Run each expert on the tokens it kept and sum the gated results.

        ``expert``, ``gate`` and ``keep`` are per assignment slot ``[N * k]``
        (slot ``t * k + j`` is token ``t``'s ``j``-th choice). The kept slots
        are sorted by expert, so one gather feeds every expert a contiguous
        slice and one ``index_copy`` puts the results back in slot order: no
        loop over tokens, and few gather/scatter kernels, which scale badly
        when several processes share the CPU cores.
        """
        tokens, width = flat.shape
        slots = keep.nonzero().squeeze(1)  # [M] kept slots
        slots = slots[torch.argsort(expert[slots], stable=True)]
        # The split sizes must be host integers: one device sync per layer.
        counts = torch.bincount(expert[slots], minlength=self.num_experts).tolist()
        inputs = flat[slots // self.top_k]  # [M, D], grouped by expert

        # unbind, not w[index] per expert: its backward is one stack, where
        # indexing would zero-fill and add a full-size gradient per expert.
        experts = zip(
            torch.unbind(self.w_gate),
            torch.unbind(self.w_up),
            torch.unbind(self.w_down),
            torch.split(inputs, counts),
            strict=True,
        )
        results = []
        for w_gate, w_up, w_down, chunk in experts:
            hidden = F.silu(chunk @ w_gate) * (chunk @ w_up)
            results.append(hidden @ w_down)
        gated = torch.cat(results) * gate[slots, None].to(flat.dtype)  # [M, D]

        per_slot = flat.new_zeros(tokens * self.top_k, width)
        per_slot = per_slot.index_copy(0, slots, gated)
        return per_slot.view(tokens, self.top_k, width).sum(dim=1)


class Block(nn.Module):
    """Pre-norm transformer block: attention, then the sparse MoE."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=1e-6)
        self.attn = Attention(config)
        self.moe_norm = nn.RMSNorm(config.d_model, eps=1e-6)
        self.moe = MixtureOfExperts(config)

    def forward(self, x: Tensor, rope: Tensor) -> tuple[Tensor, RoutingStats]:
        x = x + self.attn(self.attn_norm(x), rope)
        update, stats = self.moe(self.moe_norm(x))
        return x + update, stats


class Reasoner(nn.Module):
    """A stack of blocks: one level (high or low) of the recurrent model."""

    def __init__(self, config: ModelConfig, layers: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(config) for _ in range(layers))

    def forward(self, x: Tensor, rope: Tensor, log: list[list[RoutingStats]]) -> Tensor:
        """Run every block; ``log[i]`` collects the routing stats of block ``i``."""
        for block, entries in zip(self.blocks, log, strict=True):
            x, stats = block(x, rope)
            entries.append(stats)
        return x


class HRMSMoE(nn.Module):
    """The HRM-sMoE language model; see the module docstring for the pass."""

    rope: Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.low = Reasoner(config, config.l_layers)
        self.high = Reasoner(config, config.h_layers)
        self.norm = nn.RMSNorm(config.d_model, eps=1e-6)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.tie_weights()
        # Derived from the config, so never part of the trainable state.
        self.register_buffer("rope", rope_tables(config), persistent=False)

    @property
    def moe_layers(self) -> int:
        return self.config.l_layers + self.config.h_layers

    def tie_weights(self) -> None:
        """Make the output head share the embedding matrix, if the config ties them."""
        if self.config.tie_embeddings:
            self.head.weight = self.embed.weight

    def reset_buffers(self) -> None:
        """Recompute the derived buffers, e.g. after ``to_empty``."""
        self.rope = rope_tables(self.config, device=self.embed.weight.device)

    def forward(self, tokens: Tensor) -> ModelOutput:
        """Logits and routing statistics for ``tokens`` [B, T] (int64)."""
        length = tokens.shape[1]
        if length > self.config.max_seq_len:
            raise SequenceLengthError(
                f"sequence of {length} tokens exceeds max_seq_len "
                f"{self.config.max_seq_len}"
            )
        x = self.embed(tokens)  # [B, T, D]
        log: list[list[RoutingStats]] = [[] for _ in range(self.moe_layers)]
        z_high = self._cycles(x, log)
        logits = self.head(self.norm(z_high))
        return self._output(logits, log)

    def _cycles(self, x: Tensor, log: list[list[RoutingStats]]) -> Tensor:
        """The recurrent part of the pass: returns the final high-level state.

        Gradients flow through every cycle by default (exact backpropagation is
        affordable at a handful of cycles). With ``one_step_grad`` every step but
        the last low-level and the last high-level one runs without a graph, as
        in HRM's one-step approximation, which makes memory independent of the
        cycle counts.
        """
        config = self.config
        rope = self.rope.to(x.dtype)
        low_log, high_log = log[: config.l_layers], log[config.l_layers :]
        z_low = torch.zeros_like(x)
        z_high = torch.zeros_like(x)
        steps = config.h_cycles * config.l_cycles
        wants_grad = torch.is_grad_enabled()
        for step in range(steps):
            graph = wants_grad and (step == steps - 1 or not config.one_step_grad)
            with torch.set_grad_enabled(graph):
                z_low = self.low(z_low + z_high + x, rope, low_log)
                if (step + 1) % config.l_cycles == 0:
                    z_high = self.high(z_high + z_low, rope, high_log)
        return z_high

    def _output(self, logits: Tensor, log: list[list[RoutingStats]]) -> ModelOutput:
        aux = torch.stack([stats.aux_loss for entries in log for stats in entries])
        usage = torch.stack([sum_assignments(entries) for entries in log])
        drops = torch.stack([drop_fraction(entries) for entries in log])
        return ModelOutput(
            logits=logits,
            aux_loss=aux.mean(),
            expert_usage=usage / usage.sum(dim=-1, keepdim=True),
            drop_fraction=drops.detach(),
        )


def sum_assignments(entries: list[RoutingStats]) -> Tensor:
    """Assignments per expert over every application of one layer: [E]."""
    return torch.stack([stats.assignments for stats in entries]).sum(dim=0)


def drop_fraction(entries: list[RoutingStats]) -> Tensor:
    """Share of one layer's assignments dropped by capacity, over its applications."""
    dropped = torch.stack([stats.dropped for stats in entries]).sum()
    return dropped / sum(stats.total for stats in entries)


def init_weights(model: HRMSMoE, seed: int) -> None:
    """Small-normal init, deterministic for ``seed``, whatever the global RNG.

    Matrices get N(0, 0.02); the projections that write into the residual stream
    (attention output, expert down-projection) are scaled by
    ``1 / sqrt(2 * block applications per pass)`` so that the residual stream
    does not grow with depth and cycles. Norm weights start at one.
    """
    config = model.config
    applications = config.h_cycles * (
        config.l_cycles * config.l_layers + config.h_layers
    )
    residual_std = INIT_STD / math.sqrt(2 * applications)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.fill_(1.0)
                continue
            std = residual_std if name.endswith(("proj.weight", "w_down")) else INIT_STD
            values = torch.empty(param.shape).normal_(0.0, std, generator=generator)
            param.copy_(values)


def build_model(config: ModelConfig, seed: int = 0) -> HRMSMoE:
    """A freshly initialised model on the CPU, the same for the same seed."""
    model = empty_model(config)  # skips torch's default init and its global RNG
    init_weights(model, seed)
    logger.debug("built model with %d parameters", parameter_count(model))
    return model


def empty_model(config: ModelConfig, device: str | torch.device = "cpu") -> HRMSMoE:
    """A model with uninitialised weights on ``device``, to be loaded into."""
    with torch.device("meta"):
        model = HRMSMoE(config)
    model.to_empty(device=device)
    model.tie_weights()  # to_empty gives every parameter its own new tensor
    model.reset_buffers()
    return model


def parameter_count(model: nn.Module) -> int:
    """Trainable parameters, each tied tensor counted once."""
    return sum(param.numel() for param in model.parameters())


def lm_loss(model: HRMSMoE, tokens: Tensor) -> LossOutput:
    """Next-token loss of ``tokens`` [B, T+1]: predict ``tokens[:, 1:]``."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    output = model(inputs)
    language = F.cross_entropy(
        output.logits.reshape(-1, output.logits.shape[-1]).float(),
        targets.reshape(-1),
    )
    total = language + model.config.aux_loss_coef * output.aux_loss
    return LossOutput(
        loss=total,
        lm_loss=language.detach(),
        aux_loss=output.aux_loss.detach(),
        expert_usage=output.expert_usage,
    )


@dataclass(frozen=True)
class StateLayout:
    """Names, shapes and ties of the trainable state a config's model has."""

    shapes: Mapping[str, tuple[int, ...]]  # read-only: the layout is cached
    # Groups of state names that are one tensor (e.g. embedding and head), in
    # state-dict order; the first name of a group is its canonical one.
    ties: tuple[tuple[str, ...], ...]


@functools.lru_cache(maxsize=16)
def state_layout(config: ModelConfig) -> StateLayout:
    """The state layout of ``config``'s model, found without allocating weights."""
    with torch.device("meta"):
        model = HRMSMoE(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    ties = tuple(tuple(names) for names in groups.values() if len(names) > 1)
    return StateLayout(shapes=MappingProxyType(shapes), ties=ties)
