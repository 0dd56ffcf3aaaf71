"""The worker's training path against a bare PyTorch loop, side by side.

Both train the same model (same seed) on the same batches with the same AdamW
hyper-parameters:

    python bench/bench_worker.py --model tiny --steps 20 --trials 3

``bare loop`` is the plain loop anyone would write: forward, ``lm_loss``,
backward, clip, ``AdamW.step``. ``worker`` is what the daemon does for a lease:
``forge.train.train_lease`` in the daemon's training thread with its progress
callback, while the main thread polls and builds a heartbeat every interval,
then ``forge.codec.encode_update`` of the pseudo-gradient with the residual.
The table gives training tokens per second of each, their ratio, and the encode
time as a share of the whole lease. On a machine shared with other busy
processes pass ``--threads 1``: OpenMP teams spinning against each other make
multi-threaded timings swing by an order of magnitude.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from dragon.v1 import service_pb2

from dragon_worker.daemon import POLL_SECONDS, TrainingJob
from forge import codec
from forge.config import named_config
from forge.model import build_model, lm_loss
from forge.tokenizer import encode_document
from forge.train import TrainRecipe


@dataclass(frozen=True)
class Trial:
    """One timed run of either path."""

    train_seconds: float
    encode_seconds: float = 0.0
    frame_bytes: int = 0
    dense_bytes: int = 0
    heartbeats: int = 0


def corpus_tokens(sequences: int, length: int) -> torch.Tensor:
    """``[sequences, length + 1]`` int64 token ids from the stdlib's source."""
    ids: list[int] = []
    need = sequences * (length + 1)
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        ids.extend(encode_document(path.read_text(encoding="utf-8", errors="replace")))
        if len(ids) >= need:
            break
    return torch.tensor(ids[:need], dtype=torch.int64).view(sequences, length + 1)


def bare_loop(model_name: str, tokens: torch.Tensor, recipe: TrainRecipe) -> Trial:
    model = build_model(named_config(model_name), seed=recipe.seed)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=recipe.learning_rate,
        betas=(recipe.beta1, recipe.beta2),
        weight_decay=recipe.weight_decay,
    )
    started = time.perf_counter()
    for step in range(recipe.local_steps):
        rows = torch.arange(step * recipe.batch_size, (step + 1) * recipe.batch_size)
        batch = tokens[rows % tokens.shape[0]]
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(lm_loss(model, batch).loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip_norm)
        optimizer.step()
    return Trial(train_seconds=time.perf_counter() - started)


def worker_path(
    model_name: str,
    tokens: torch.Tensor,
    recipe: TrainRecipe,
    density: float,
    residual: dict[str, torch.Tensor] | None,
    heartbeat_seconds: float,
) -> tuple[Trial, dict[str, torch.Tensor]]:
    model = build_model(named_config(model_name), seed=recipe.seed)
    started = time.perf_counter()
    job = TrainingJob(model, tokens, recipe, torch.device("cpu"))
    job.start()
    heartbeats = 0
    next_beat = time.monotonic() + heartbeat_seconds
    while job.alive():
        # What the daemon's session thread does meanwhile: wait, read progress,
        # build a heartbeat message when one is due.
        job.join(POLL_SECONDS)
        if time.monotonic() >= next_beat:
            done, total, loss = job.progress
            service_pb2.Heartbeat(
                lease_id="b", steps_done=done, steps_total=total, loss=loss
            )
            heartbeats += 1
            next_beat = time.monotonic() + heartbeat_seconds
    if job.error is not None:
        raise job.error
    assert job.result is not None
    trained = time.perf_counter()
    encoded = codec.encode_update(job.result.pseudo_gradient, residual, density, "fp16")
    finished = time.perf_counter()
    trial = Trial(
        train_seconds=trained - started,
        encode_seconds=finished - trained,
        frame_bytes=len(encoded.frame),
        dense_bytes=encoded.dense_bytes,
        heartbeats=heartbeats,
    )
    return trial, encoded.residual


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=("tiny", "small", "125m"))
    parser.add_argument("--steps", type=int, default=20, help="local steps per lease")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--heartbeat-seconds", type=float, default=1.0)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads; 0 = keep"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    recipe = TrainRecipe(
        local_steps=args.steps,
        batch_size=args.batch_size,
        micro_batch_size=args.batch_size,
        learning_rate=1e-3,
        weight_decay=0.1,
        beta1=0.9,
        beta2=0.95,
        grad_clip_norm=1.0,
        seed=0,
    )
    tokens = corpus_tokens(args.steps * args.batch_size, args.sequence_length)
    trained_tokens = args.steps * args.batch_size * args.sequence_length

    # One untimed round of each warms up allocators and kernels.
    bare_loop(args.model, tokens[: 2 * args.batch_size], recipe)
    _, residual = worker_path(
        args.model, tokens, recipe, args.density, None, args.heartbeat_seconds
    )
    bare: list[Trial] = []
    worker: list[Trial] = []
    for _ in range(args.trials):  # interleaved, so drift hits both alike
        bare.append(bare_loop(args.model, tokens, recipe))
        trial, residual = worker_path(
            args.model, tokens, recipe, args.density, residual, args.heartbeat_seconds
        )
        worker.append(trial)

    bare_s = statistics.median(t.train_seconds for t in bare)
    train_s = statistics.median(t.train_seconds for t in worker)
    encode_s = statistics.median(t.encode_seconds for t in worker)
    last = worker[-1]
    rows = [
        ("bare loop", trained_tokens / bare_s, bare_s, 0.0),
        ("worker", trained_tokens / train_s, train_s, encode_s),
    ]
    print(
        f"model {args.model}, {args.steps} steps x {args.batch_size} sequences x "
        f"{args.sequence_length} tokens, density {args.density}, "
        f"{torch.get_num_threads()} torch threads, median of {args.trials}"
    )
    print(f"{'path':<10} {'tokens/s':>10} {'train s':>9} {'encode s':>9}")
    for name, rate, seconds, encode in rows:
        print(f"{name:<10} {rate:>10.0f} {seconds:>9.3f} {encode:>9.3f}")
    print(f"worker / bare tokens per second: {bare_s / train_s:.3f}")
    lease_s = train_s + encode_s
    print(f"encode share of the lease time: {100 * encode_s / lease_s:.2f}%")
    smaller = last.dense_bytes / last.frame_bytes
    print(
        f"update frame: {last.frame_bytes} bytes, {smaller:.0f}x smaller than "
        f"dense fp32; {last.heartbeats} heartbeats built"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
