"""The update codec on one model-sized update, measured side by side in one run.

    python bench/bench_ingest.py                       # the 125m model, 1 % density
    python bench/bench_ingest.py --model small --flat-numel 0

A random-normal pseudo-gradient with the shapes of the model's state dict (taken
from forge.model on the meta device, so the model itself is never allocated) is
encoded at the given density, as a worker does, and ingested, as the aggregator
does. The table puts each figure next to its baseline:

- selection on the largest tensor, and on one flat tensor of ``--flat-numel``
  entries: the codec's sampled threshold against exact ``torch.topk``;
- the frame against the dense fp32 update, and against the same entries with
  the bytes of each integer left interleaved (no byte planes);
- ingest (decode, validate every entry, ``index_add_`` into fp32 sums) against a
  bare zstd decompression of the same frame.

Times are medians over ``--repeat`` runs after one warm-up run, which pays for
the first touch of fresh memory.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import zstandard

from forge import codec, safefile
from forge.config import named_config
from forge.model import HRMSMoE


def model_spec(name: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the trainable state of a named model size."""
    with torch.device("meta"):
        model = HRMSMoE(named_config(name))
    return {key: tuple(t.shape) for key, t in model.state_dict().items()}


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def pseudo_gradient(
    spec: dict[str, tuple[int, ...]], seed: int
) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # 1e-3: the scale of one local round's weight change; the codec does not care.
    return {n: torch.randn(s, generator=generator) * 1e-3 for n, s in spec.items()}


def selection_times(
    flat: torch.Tensor, density: float, repeat: int
) -> tuple[float, float]:
    """(sampled, exact) seconds to pick the top entries of ``flat``."""
    k = codec.max_entries(flat.numel(), density)
    as_numpy = flat.numpy()
    chosen = torch.from_numpy(codec._select(as_numpy, k))
    exact = torch.topk(flat.abs(), k, sorted=False).values
    if not torch.equal(flat[chosen].abs().sort().values, exact.sort().values):
        raise SystemExit("sampled selection differs from torch.topk")
    sampled_s = median_seconds(lambda: codec._select(as_numpy, k), repeat)
    exact_s = median_seconds(lambda: torch.topk(flat.abs(), k, sorted=False), 1)
    return sampled_s, exact_s


def interleaved_bytes(frame: bytes, level: int) -> int:
    """zstd size of the frame's content with each integer's bytes kept together."""
    content = zstandard.ZstdDecompressor().decompress(frame)
    tensors, metadata = safefile.loads(content)
    repacked = {
        key: torch.from_numpy(np.ascontiguousarray(planes.numpy().T).reshape(-1))
        for key, planes in tensors.items()
    }
    plain = safefile.dumps(repacked, metadata)
    return len(zstandard.ZstdCompressor(level=level).compress(plain))


def row(label: str, ours: str, baseline: str, ratio: str) -> None:
    print(f"{label:<34} {ours:>14} {baseline:>16} {ratio:>9}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="125m", help="named model size")
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument(
        "--value-dtype", default="fp16", choices=["fp16", "bf16", "fp32"]
    )
    parser.add_argument("--zstd-level", type=int, default=3)
    parser.add_argument(
        "--flat-numel",
        type=int,
        default=125_000_000,
        help="entries of the extra flat tensor for the selection row; 0 skips it",
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    spec = model_spec(args.model)
    update = pseudo_gradient(spec, args.seed)
    dense = codec.dense_size_bytes(spec)
    largest = max(spec, key=lambda n: math.prod(spec[n]))
    print(
        f"model {args.model}: {len(spec)} tensors, {dense // 4:,} entries; "
        f"density {args.density}, {args.value_dtype} values, zstd {args.zstd_level}; "
        f"torch threads {torch.get_num_threads()}"
    )

    def encode() -> codec.EncodedUpdate:
        return codec.encode_update(
            update, None, args.density, args.value_dtype, zstd_level=args.zstd_level
        )

    encode_s = median_seconds(encode, args.repeat)
    encoded = encode()
    frame = encoded.frame

    accumulator = {n: torch.zeros(s) for n, s in spec.items()}

    def ingest() -> None:
        sparse = codec.decode_update(frame, spec, max_density=args.density)
        codec.accumulate(sparse, accumulator, 1.0)

    ingest_s = median_seconds(ingest, args.repeat + 2)
    decompressor = zstandard.ZstdDecompressor()
    unzstd_s = median_seconds(lambda: decompressor.decompress(frame), args.repeat + 2)

    row("", "codec", "baseline", "ratio")
    numel = math.prod(spec[largest])
    sampled_s, exact_s = selection_times(
        update[largest].view(-1), args.density, args.repeat
    )
    row(
        f"select, largest ({numel:,})",
        f"{sampled_s * 1e3:.1f} ms",
        f"topk {exact_s * 1e3:.1f} ms",
        f"{exact_s / sampled_s:.1f}x",
    )
    if args.flat_numel:
        flat = torch.randn(args.flat_numel, generator=torch.Generator().manual_seed(1))
        sampled_s, exact_s = selection_times(flat, args.density, args.repeat)
        del flat
        row(
            f"select, flat ({args.flat_numel:,})",
            f"{sampled_s:.3f} s",
            f"topk {exact_s:.3f} s",
            f"{exact_s / sampled_s:.1f}x",
        )
    row("encode whole update", f"{encode_s:.3f} s", "", "")
    row(
        "frame vs dense fp32",
        f"{len(frame) / 1e6:.2f} MB",
        f"{dense / 1e6:.1f} MB",
        f"{dense / len(frame):.0f}x",
    )
    plain = interleaved_bytes(frame, args.zstd_level)
    row(
        "byte planes vs interleaved",
        f"{len(frame) / 1e6:.2f} MB",
        f"{plain / 1e6:.2f} MB",
        f"{plain / len(frame):.2f}x",
    )
    row(
        "ingest vs zstd decompress",
        f"{ingest_s * 1e3:.1f} ms",
        f"{unzstd_s * 1e3:.1f} ms",
        f"{ingest_s / unzstd_s:.1f}x",
    )
    print(f"entries sent: {encoded.entry_count:,} of {dense // 4:,}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
