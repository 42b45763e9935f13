"""Benchmark: the fused mixer vs a plain torch implementation and vs torch's copy bandwidth.

Same run, same data, 2 threads: B anchors of 224×224×3 uint8 NHWC images, K partners each,
normalised output in float32 and bfloat16 NCHW.  Reported per row: our median time with a
preallocated output (how a loader uses it: a reused buffer) and with a fresh one (page faults
included), effective GB/s (bytes read + written), the speed-up over plain torch (index, float,
multiply-add, normalise, permute), and our bandwidth as a fraction of torch's tensor copy
(timed in adjacent pairs, median of the per-pair fractions: the machine's load swings).

    .venv/bin/python bench/mixer.py            # full table, writes bench/results/mixer.json
    .venv/bin/python bench/mixer.py --quick    # smaller, for a smoke run
    .venv/bin/python bench/mixer.py --isa avx2 # another compiled CPU kernel (default: the best)
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report, time_call  # noqa: E402

from mixnn_fast import build_info, mix_images  # noqa: E402
from mixnn_fast._native import native  # noqa: E402
from mixnn_fast.mix.reference import mix_images_reference  # noqa: E402

IMAGENET_MEAN = [123.675, 116.28, 103.53]
IMAGENET_STD = [58.395, 57.12, 57.375]


def plain_torch_mix(images, anchors, partners, weights, out_dtype):
    """The baseline: what one writes with torch ops, computing in float32."""
    return mix_images_reference(images, anchors, partners, weights, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                out_dtype=out_dtype, compute_dtype=torch.float32)


def paired_copy_fraction(ours, num_bytes_moved: int, copy_bytes: int, repeats: int) -> tuple[float, float]:
    """Our bandwidth as a fraction of torch's tensor copy (read + write of a float32 buffer of
    ``copy_bytes``), timed in adjacent pairs so that both see the same machine load; returns
    (median copy bytes/s, median of the per-pair fractions)."""
    src = torch.rand(copy_bytes // 4)
    dst = torch.empty_like(src)
    copies, fractions = [], []
    for _ in range(repeats):
        t_ours = time_call(ours, repeats=1, warmup=0)["median"]
        t_copy = time_call(lambda: dst.copy_(src), repeats=1, warmup=0)["median"]
        copies.append(2 * copy_bytes / t_copy)
        fractions.append((num_bytes_moved / t_ours) / copies[-1])
    return statistics.median(copies), statistics.median(fractions)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--baseline-repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="B=64, 112×112, K=1, few repeats")
    parser.add_argument("--name", default="mixer")
    parser.add_argument("--isa", default="auto", help="CPU kernel: auto (best), or one of _C.cpu_isas()")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.size, args.ks, args.repeats, args.baseline_repeats = 64, 112, [1], 5, 2
    torch.set_num_threads(args.threads)
    native().select_cpu_isa(args.isa)
    print(f"CPU kernel: {native().selected_cpu_isa()} (available: {', '.join(native().cpu_isas())})", flush=True)
    gen = torch.Generator().manual_seed(0)
    b, s, c = args.batch, args.size, 3
    # The decoded batch of a neighbour-coherent plan: every partner is also in the batch (M = B).
    images = torch.randint(0, 256, (b, s, s, c), dtype=torch.uint8, generator=gen)

    rows = []
    for k in args.ks:
        anchors = torch.randperm(b, generator=gen)
        partners = torch.randint(0, b, (b, k), generator=gen)
        weights = torch.rand(b, k + 1, generator=gen) + 0.05
        weights /= weights.sum(1, keepdim=True)
        for out_dtype in (torch.float32, torch.bfloat16):
            out = torch.empty(b, c, s, s, dtype=out_dtype)
            elems = b * c * s * s
            moved = elems * (k + 1) + elems * out.element_size()  # bytes read + written
            kw = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, out_dtype=out_dtype)
            run_ours = lambda: mix_images(images, anchors, partners, weights, out=out, **kw)  # noqa: E731
            ours = time_call(run_ours, repeats=args.repeats)
            fresh = time_call(lambda: mix_images(images, anchors, partners, weights, **kw), repeats=args.repeats)
            torch_t = time_call(lambda: plain_torch_mix(images, anchors, partners, weights, out_dtype),
                                repeats=args.baseline_repeats, warmup=1)
            copy_bw, fraction = paired_copy_fraction(run_ours, moved, elems * 4, args.repeats)
            ours_bw = moved / ours["median"]
            rows.append({
                "K": k,
                "out": str(out_dtype).replace("torch.", ""),
                "ours ms": ours["median"] * 1e3,
                "ours GB/s": ours_bw / 1e9,
                "img/s": b / ours["median"],
                "ours fresh-out ms": fresh["median"] * 1e3,
                "torch ms": torch_t["median"] * 1e3,
                "torch GB/s": moved / torch_t["median"] / 1e9,
                "speed-up vs torch": torch_t["median"] / ours["median"],
                "copy GB/s": copy_bw / 1e9,
                "fraction of copy (paired)": fraction,
            })
            print(f"K={k} {out_dtype}: ours {ours['median']*1e3:.1f} ms, torch {torch_t['median']*1e3:.0f} ms",
                  flush=True)
    report(args.name, rows, ["K", "out", "ours ms", "ours GB/s", "img/s", "ours fresh-out ms", "torch ms",
                             "torch GB/s", "speed-up vs torch", "copy GB/s", "fraction of copy (paired)"],
           extra={"config": vars(args), "build": build_info()})


if __name__ == "__main__":
    main()
