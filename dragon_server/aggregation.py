"""Combining updates into the next model version.

An aggregation round has two steps. A *combiner* turns the weighted sparse
updates into one dense pseudo-gradient (``theta_start - theta_end``, fp32); the
default is the weighted mean. A *server optimizer* applies it to the weights:

- ``fedavg``: ``theta -= lr * g`` (lr 1.0 applies the mean update as is);
- ``fedadam`` (Reddi et al., "Adaptive Federated Optimization"): ``m = b1 m +
  (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``, ``theta -= lr * m / (sqrt(v) + tau)``,
  without bias correction, as in the paper;
- ``nesterov`` (DiLoCo's outer step): ``buf = mu buf + g``,
  ``theta -= lr * (g + mu buf)``, as ``torch.optim.SGD(nesterov=True)`` does.

An update's weight is its sample count, times a staleness discount
``1 / (1 + staleness)``, times its worker's reputation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from dragon_server.errors import AggregationRefused
from dragon_server.settings import RunConfig
from forge.codec import SparseUpdate, accumulate

Spec = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class WeightedUpdate:
    """A decoded update and its weight in the round."""

    update: SparseUpdate
    weight: float


def staleness_discount(staleness: int) -> float:
    """How much an update computed ``staleness`` versions ago still counts."""
    if staleness < 0:
        raise ValueError("staleness must not be negative")
    return 1.0 / (1.0 + staleness)


def update_weight(samples: int, staleness: int, reputation: float) -> float:
    """The weight of one update in the weighted mean."""
    return samples * staleness_discount(staleness) * max(reputation, 0.0)


# A combiner maps the round's updates to one dense pseudo-gradient per tensor of
# the spec. Robust rules (norm clipping, 3-sigma norm rejection, coordinate-wise
# trimmed mean or median, Krum / Multi-Krum) plug in here with this signature.
Combiner = Callable[[Iterable[WeightedUpdate], Spec], dict[str, Tensor]]


def weighted_mean(updates: Iterable[WeightedUpdate], spec: Spec) -> dict[str, Tensor]:
    """The weighted mean of sparse updates as dense fp32 tensors.

    Streams: each update is added as it comes and can be dropped after, so a
    round needs memory for one model, not for every update. A tensor an update
    omits counts as zero for it. Refuses a round whose total weight is not
    positive and finite, so a model never turns into NaN.
    """
    combined = {
        name: torch.zeros(shape, dtype=torch.float32) for name, shape in spec.items()
    }
    total = 0.0
    count = 0
    for item in updates:
        count += 1
        if item.weight < 0 or not math.isfinite(item.weight):
            raise AggregationRefused(f"update weight {item.weight} is not usable")
        if item.weight > 0:
            accumulate(item.update, combined, item.weight)
            total += item.weight
    if not total > 0 or not math.isfinite(total):
        raise AggregationRefused(
            f"the total weight of {count} updates is {total}; nothing to apply"
        )
    for tensor in combined.values():
        tensor.div_(total)
    return combined


# TODO: robust combiners (norm clipping, rejection of update norms beyond 3 sigma,
# coordinate-wise trimmed mean and median, Krum / Multi-Krum refused when
# n <= 2f + 2) are not written yet; COMBINERS is where they will be registered.
COMBINERS: dict[str, Combiner] = {"mean": weighted_mean}


class ServerOptimizer(Protocol):
    """Applies a combined pseudo-gradient to the weights, in place."""

    def step(
        self, params: Mapping[str, Tensor], gradient: Mapping[str, Tensor]
    ) -> None:
        """``params[name]`` moves against ``gradient[name]`` for every name."""

    def state_dict(self) -> dict[str, Tensor]:
        """The optimizer's state as named tensors (empty when stateless)."""

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore :meth:`state_dict`'s output."""


class FedAvg:
    """``theta -= lr * g``: no state."""

    def __init__(self, lr: float = 1.0) -> None:
        self.lr = lr

    def step(
        self, params: Mapping[str, Tensor], gradient: Mapping[str, Tensor]
    ) -> None:
        for name, param in params.items():
            param.sub_(gradient[name], alpha=self.lr)

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        return None


class FedAdam:
    """Adam on the server (Reddi et al.): first and second moments per tensor."""

    def __init__(
        self,
        lr: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau
        self.m: dict[str, Tensor] = {}
        self.v: dict[str, Tensor] = {}

    def step(
        self, params: Mapping[str, Tensor], gradient: Mapping[str, Tensor]
    ) -> None:
        for name, param in params.items():
            g = gradient[name]
            m = self.m.setdefault(name, torch.zeros_like(param))
            v = self.v.setdefault(name, torch.zeros_like(param))
            m.mul_(self.beta1).add_(g, alpha=1 - self.beta1)
            v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
            param.sub_(self.lr * m / (v.sqrt() + self.tau))

    def state_dict(self) -> dict[str, Tensor]:
        state = {f"m/{name}": t for name, t in self.m.items()}
        state.update({f"v/{name}": t for name, t in self.v.items()})
        return state

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.m = {k[2:]: t.clone() for k, t in state.items() if k.startswith("m/")}
        self.v = {k[2:]: t.clone() for k, t in state.items() if k.startswith("v/")}


class Nesterov:
    """DiLoCo's outer optimizer: SGD with Nesterov momentum."""

    def __init__(self, lr: float = 0.7, momentum: float = 0.9) -> None:
        self.lr, self.momentum = lr, momentum
        self.buffers: dict[str, Tensor] = {}

    def step(
        self, params: Mapping[str, Tensor], gradient: Mapping[str, Tensor]
    ) -> None:
        for name, param in params.items():
            g = gradient[name]
            buf = self.buffers.setdefault(name, torch.zeros_like(param))
            buf.mul_(self.momentum).add_(g)
            param.sub_(g + self.momentum * buf, alpha=self.lr)

    def state_dict(self) -> dict[str, Tensor]:
        return {f"momentum/{name}": t for name, t in self.buffers.items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        prefix = "momentum/"
        self.buffers = {
            k[len(prefix) :]: t.clone()
            for k, t in state.items()
            if k.startswith(prefix)
        }


def make_optimizer(config: RunConfig) -> ServerOptimizer:
    """The server optimizer the run's config names."""
    lr = config.effective_server_learning_rate
    if config.optimizer == "fedadam":
        return FedAdam(lr, config.server_beta1, config.server_beta2, config.server_tau)
    if config.optimizer == "nesterov":
        return Nesterov(lr, config.server_momentum)
    return FedAvg(lr)


def alias_groups(tensors: Mapping[str, Tensor]) -> dict[str, list[str]]:
    """Names grouped by shared storage (tied weights), keyed by the first name."""
    groups: dict[tuple[int, int], list[str]] = {}
    for name in sorted(tensors):
        tensor = tensors[name]
        key = (tensor.untyped_storage().data_ptr(), int(tensor.storage_offset()))
        groups.setdefault(key, []).append(name)
    return {names[0]: names for names in groups.values()}


def apply_round(
    weights: Mapping[str, Tensor],
    combined: Mapping[str, Tensor],
    optimizer: ServerOptimizer,
) -> None:
    """Apply a combined pseudo-gradient to ``weights`` in place.

    Tied tensors (one storage under several names) move once, by the mean of
    their names' pseudo-gradients, so a tie is never stepped twice.
    """
    params: dict[str, Tensor] = {}
    gradient: dict[str, Tensor] = {}
    for canonical, names in alias_groups(weights).items():
        params[canonical] = weights[canonical]
        parts = [combined[name] for name in names if name in combined]
        if parts:
            gradient[canonical] = torch.stack(parts).mean(dim=0)
        else:
            gradient[canonical] = torch.zeros_like(weights[canonical])
    optimizer.step(params, gradient)
