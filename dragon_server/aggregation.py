"""Combining updates into the next model version.

An aggregation round has two steps. :func:`combine` turns the weighted sparse
updates into one dense pseudo-gradient (``theta_start - theta_end``, fp32): the
weighted mean by default, or a robust rule (norm clipping, rejection of outlying
norms, coordinate-wise trimmed mean or median, Krum / Multi-Krum) that a run's
config names. A *server optimizer* then applies it to the weights:

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
        if _usable_weight(item.weight) > 0:
            accumulate(item.update, combined, item.weight)
            total += item.weight
    if not total > 0 or not math.isfinite(total):
        raise AggregationRefused(
            f"the total weight of {count} updates is {total}; nothing to apply"
        )
    for tensor in combined.values():
        tensor.div_(total)
    return combined


@dataclass(frozen=True)
class RobustRule:
    """How a round is combined; the defaults are the plain weighted mean.

    ``clip_norm`` (0: off) scales each update down to that L2 norm at most;
    ``reject_sigma`` (0: off) drops updates whose norm lies further than that
    many standard deviations from the others'; then ``name`` combines what is
    left: ``mean`` (weighted), ``trimmed_mean`` (per coordinate, dropping
    ``trim_fraction`` of the values at each end), ``median`` (per coordinate),
    ``krum`` or ``multi_krum`` (Blanchard et al., for ``byzantine`` = f faulty
    workers; ``selected`` = m updates averaged, 0 meaning n - f).
    """

    name: str = "mean"
    clip_norm: float = 0.0
    reject_sigma: float = 0.0
    trim_fraction: float = 0.1
    byzantine: int = 0
    selected: int = 0

    @classmethod
    def from_config(cls, config: RunConfig) -> RobustRule:
        return cls(
            name=config.aggregation_rule,
            clip_norm=config.clip_update_norm,
            reject_sigma=config.reject_norm_sigma,
            trim_fraction=config.trim_fraction,
            byzantine=config.byzantine_workers,
            selected=config.multi_krum_selected,
        )

    @property
    def streams(self) -> bool:
        """True when the round can be combined one update at a time."""
        return self.name == "mean" and not self.clip_norm and not self.reject_sigma


def combine(
    updates: Iterable[WeightedUpdate], spec: Spec, rule: RobustRule | None = None
) -> dict[str, Tensor]:
    """The round's pseudo-gradient under ``rule`` (the weighted mean by default).

    Every rule but the plain mean holds the round as a dense [n, P] matrix: n
    copies of the model in memory. With top-k updates most coordinates of each
    row are zero, so the coordinate-wise rules (median, trimmed mean) shrink
    the step a lot; they suit dense updates or many workers best.
    """
    rule = rule or RobustRule()
    if rule.streams:
        return weighted_mean(updates, spec)
    items = [item for item in updates if _usable_weight(item.weight) > 0]
    if not items:
        raise AggregationRefused("no update of positive weight to combine")
    rows = torch.stack([_flatten(item.update, spec) for item in items])  # [n, P]
    weights = torch.tensor([item.weight for item in items], dtype=torch.float64)
    if rule.clip_norm > 0:
        rows = clip_norms(rows, rule.clip_norm)
    if rule.reject_sigma > 0:
        keep = norms_within(rows, rule.reject_sigma)
        rows, weights = rows[keep], weights[keep]
    return _unflatten(RULES[rule.name](rows, weights, rule), spec)


def _usable_weight(weight: float) -> float:
    if weight < 0 or not math.isfinite(weight):
        raise AggregationRefused(f"update weight {weight} is not usable")
    return weight


def _flatten(update: SparseUpdate, spec: Spec) -> Tensor:
    """One update as a dense fp32 vector over the spec's tensors in name order."""
    dense = {
        name: torch.zeros(shape, dtype=torch.float32) for name, shape in spec.items()
    }
    accumulate(update, dense)
    return torch.cat([dense[name].view(-1) for name in sorted(spec)])


def _unflatten(vector: Tensor, spec: Spec) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    offset = 0
    for name in sorted(spec):
        numel = math.prod(spec[name])
        out[name] = vector[offset : offset + numel].reshape(spec[name]).clone()
        offset += numel
    return out


def clip_norms(rows: Tensor, max_norm: float) -> Tensor:
    """Rows [n, P] scaled so that none has an L2 norm above ``max_norm``."""
    norms = rows.norm(dim=1, keepdim=True)
    scale = torch.clamp(max_norm / torch.clamp(norms, min=1e-30), max=1.0)
    return rows * scale


def norms_within(rows: Tensor, sigmas: float) -> Tensor:
    """Mask [n] of rows whose norm is within ``sigmas`` deviations of the others'.

    The centre and spread are the median and the scaled median absolute
    deviation: with the mean and standard deviation an outlier inflates the
    spread it is judged by, and among n <= 10 values no z-score can exceed 3.
    When the spread is zero nothing is rejected.
    """
    norms = rows.double().norm(dim=1)
    centre = norms.median()
    spread = 1.4826 * float((norms - centre).abs().median())
    if len(norms) < 3 or spread == 0:
        return torch.ones(len(norms), dtype=torch.bool)
    keep: Tensor = (norms - centre).abs() <= sigmas * spread
    return keep


def _mean_rows(rows: Tensor, weights: Tensor, rule: RobustRule) -> Tensor:
    total = float(weights.sum())
    if not total > 0:
        raise AggregationRefused("every update of the round was rejected")
    return (rows.double() * weights[:, None]).sum(dim=0).float() / total


def _trimmed_mean(rows: Tensor, weights: Tensor, rule: RobustRule) -> Tensor:
    n = len(rows)
    cut = math.floor(rule.trim_fraction * n)
    if n - 2 * cut < 1:
        raise AggregationRefused(
            f"trimming {cut} of {n} updates at each end leaves none"
        )
    ordered = rows.sort(dim=0).values
    return ordered[cut : n - cut].mean(dim=0)


def _median(rows: Tensor, weights: Tensor, rule: RobustRule) -> Tensor:
    n = len(rows)
    if n == 0:
        raise AggregationRefused("every update of the round was rejected")
    ordered = rows.sort(dim=0).values
    if n % 2:
        return ordered[n // 2].clone()
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def krum_scores(rows: Tensor, byzantine: int) -> Tensor:
    """Krum score of each row [n]: the sum of squared distances to its n - f - 2
    nearest other rows. Refused unless n > 2f + 2."""
    n = len(rows)
    if n <= 2 * byzantine + 2:
        raise AggregationRefused(
            f"Krum with f = {byzantine} needs more than {2 * byzantine + 2} "
            f"updates; the round has {n}"
        )
    distances = torch.cdist(rows.double(), rows.double()).pow(2)  # [n, n]
    nearest = n - byzantine - 2
    # Column 0 of each sorted row is the distance to itself (zero).
    return distances.sort(dim=1).values[:, 1 : 1 + nearest].sum(dim=1)


def _krum(rows: Tensor, weights: Tensor, rule: RobustRule) -> Tensor:
    scores = krum_scores(rows, rule.byzantine)
    return rows[int(scores.argmin())].clone()


def _multi_krum(rows: Tensor, weights: Tensor, rule: RobustRule) -> Tensor:
    scores = krum_scores(rows, rule.byzantine)
    count = rule.selected or len(rows) - rule.byzantine
    chosen = scores.argsort()[: max(1, min(count, len(rows)))]
    return _mean_rows(rows[chosen], weights[chosen], rule)


# A rule maps the round's rows [n, P] and weights [n] to one vector [P].
RULES: dict[str, Callable[[Tensor, Tensor, RobustRule], Tensor]] = {
    "mean": _mean_rows,
    "trimmed_mean": _trimmed_mean,
    "median": _median,
    "krum": _krum,
    "multi_krum": _multi_krum,
}


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
