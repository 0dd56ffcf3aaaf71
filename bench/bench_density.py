"""Update density against accuracy: the same short training at several densities.

Each configuration trains from the same initial model on the same batches (same
seed, same tokens, same number of rounds) through the server's own domain code:
leases from ``TrainingRun``, local training with ``forge.train.train_lease``,
updates encoded with ``forge.codec.encode_update`` and each worker's own residual,
submitted with ``TrainingRun.submit_update`` and combined by
``TrainingRun.aggregate``. The gRPC transport is left out: it moves the same bytes.

The baseline sends dense, uncompressed updates (density 1, fp32 values). For each
density the table shows the upload bytes relative to dense fp32 tensors and the
final validation loss relative to the baseline's.

    python bench/bench_density.py --rounds 12 --densities 0.1,0.01,0.001
"""

from __future__ import annotations

import argparse
import hashlib
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dragon_server.home import init_home
from dragon_server.run import LeaseGrant, TrainingRun, UpdateMeta
from dragon_server.settings import RunConfig
from forge.checkpoint import load_checkpoint, model_from_checkpoint
from forge.codec import ValueDtype, encode_update
from forge.train import train_lease


@dataclass(frozen=True)
class Outcome:
    """What one configuration of the benchmark ended with."""

    label: str
    uploaded_bytes: int
    dense_bytes: int
    first_loss: float
    final_loss: float
    seconds: float


def _train_and_submit(
    run: TrainingRun,
    worker_id: str,
    grant: LeaseGrant,
    residual: dict[str, torch.Tensor],
    value_dtype: ValueDtype,
) -> tuple[int, int]:
    checkpoint = load_checkpoint(run.version(grant.model_version).checkpoint_path)
    model = model_from_checkpoint(checkpoint)
    r = grant.recipe
    recipe = r.train_recipe()
    tokens = torch.from_numpy(grant.tokens.astype("int64"))
    result = train_lease(model, tokens, recipe, device=torch.device("cpu"))
    encoded = encode_update(result.pseudo_gradient, residual, r.density, value_dtype)
    residual.clear()
    residual.update(encoded.residual)
    meta = UpdateMeta(
        base_version=grant.model_version,
        sample_count=result.sample_count,
        token_count=result.token_count,
        loss_before=result.loss_before,
        loss_after=result.loss_after,
        train_seconds=result.seconds,
        sha256=hashlib.sha256(encoded.frame).digest(),
        size_bytes=len(encoded.frame),
    )
    run.submit_update(worker_id, grant.lease_id, encoded.frame, meta)
    return len(encoded.frame), encoded.dense_bytes


def run_configuration(
    label: str,
    density: float,
    value_dtype: ValueDtype,
    args: argparse.Namespace,
    root: Path,
) -> Outcome:
    home = root / label.replace(" ", "-").replace("%", "pct")
    config = RunConfig().replace(
        model=args.model,
        seed=args.seed,
        max_corpus_bytes=args.corpus_bytes,
        density=density,
        value_dtype=value_dtype,
        local_steps=args.local_steps,
        min_updates=args.workers,
        pow_difficulty_bits=0,
    )
    init_home(home, [], config, progress=False)
    run = TrainingRun.open(home)
    started = time.perf_counter()
    try:
        workers = [
            run.register(secrets.token_hex(32), f"bench-{i}", b"", 0).worker_id
            for i in range(args.workers)
        ]
        residuals: list[dict[str, torch.Tensor]] = [{} for _ in workers]
        uploaded = dense = 0
        first_loss = run.latest_version().validation_loss
        for _ in range(args.rounds):
            for worker_id, residual in zip(workers, residuals, strict=True):
                grant = run.grant_lease(worker_id)
                if grant is None:
                    raise RuntimeError("the run has no free batch")
                sent, full = _train_and_submit(
                    run, worker_id, grant, residual, value_dtype
                )
                uploaded += sent
                dense += full
            if run.aggregate() is None:
                raise RuntimeError("aggregation published no version")
        final_loss = run.latest_version().validation_loss
    finally:
        run.close()
    elapsed = time.perf_counter() - started
    return Outcome(label, uploaded, dense, first_loss, final_loss, elapsed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--densities", default="0.1,0.01,0.001")
    parser.add_argument("--corpus-bytes", type=int, default=2 * 2**20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    densities = [float(d) for d in args.densities.split(",")]
    with tempfile.TemporaryDirectory(prefix="dragon-bench-") as folder:
        root = Path(folder)
        baseline = run_configuration("dense fp32", 1.0, "fp32", args, root)
        outcomes = [baseline]
        for density in densities:
            label = f"top-k {density:.3g} fp16"
            outcomes.append(run_configuration(label, density, "fp16", args, root))

    print(
        f"\n{args.rounds} rounds x {args.workers} workers x {args.local_steps} local "
        f"steps, model {args.model}; validation loss at version 0: "
        f"{baseline.first_loss:.4f}"
    )
    header = (
        f"{'updates':<16}{'upload bytes':>14}{'vs dense fp32':>15}"
        f"{'final loss':>12}{'vs dense run':>14}{'seconds':>9}"
    )
    print(header)
    print("-" * len(header))
    for o in outcomes:
        share = o.uploaded_bytes / o.dense_bytes
        relative = o.final_loss / baseline.final_loss
        print(
            f"{o.label:<16}{o.uploaded_bytes:>14,}{share:>15.4f}"
            f"{o.final_loss:>12.4f}{relative:>14.3f}{o.seconds:>9.1f}"
        )


if __name__ == "__main__":
    main()
