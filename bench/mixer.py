"""Benchmark: the fused mixer's default call vs a reused out= buffer, plain torch, and the copy bandwidth.

Same run, same data, 2 threads: B anchors of 224×224×3 uint8 NHWC images, K partners each,
ImageNet-normalised output in float32 and bfloat16 NCHW.  The headline row is the **default
call**, the way a user calls it: ``x = mix_images(images, anchors, partners, weights, mean=...,
std=...)`` in a loop, the previous batch held until the new one replaces it (as a training
loop's ``x`` is).  Per (K, dtype):

- default ms: that call's median (its output comes from the pooled huge-page buffers of
  ``mixnn_fast/mix/outputs.py`` once a batch has been released);
- out= ms: the same call writing into a reused ``torch.empty`` buffer; default/out= is the
  median of per-round ratios (default, out= and a copy run interleaved, rotated each round);
- pool-miss ms: the default call when the pool keeps nothing (every call maps a new buffer,
  advised huge pages: the cost of the first call of a size);
- torch.empty ms: the call into a fresh ``torch.empty`` output (the default before the pool:
  4 KiB pages faulted on first touch);
- torch ms: plain torch (index, float, multiply-add, normalise, permute; float32 compute);
- fraction of copy: the default call's GB/s (bytes read + written once) over torch's
  ``dst.copy_(src)`` of a float32 buffer the size of the output, median of per-round ratios.

    .venv/bin/python bench/mixer.py            # full table, writes bench/results/mixer.json
    .venv/bin/python bench/mixer.py --quick    # smaller, for a smoke run
    .venv/bin/python bench/mixer.py --isa avx2 # another compiled CPU kernel (default: the best)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import paired_median, report, rotated, time_call  # noqa: E402

from mixnn_fast import build_info, mix_images  # noqa: E402
from mixnn_fast._native import native  # noqa: E402
from mixnn_fast.mix.outputs import configure_output_pool, output_pool_stats  # noqa: E402
from mixnn_fast.mix.reference import mix_images_reference  # noqa: E402

IMAGENET_MEAN = [123.675, 116.28, 103.53]
IMAGENET_STD = [58.395, 57.12, 57.375]
TARGETS = {"default / out=": 1.3, "speed-up vs torch": 20.0, "fraction of copy": 0.5}


def plain_torch_mix(images, anchors, partners, weights, out_dtype):
    """The baseline: what one writes with torch ops, computing in float32."""
    return mix_images_reference(images, anchors, partners, weights, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                out_dtype=out_dtype, compute_dtype=torch.float32)


def interleaved(runs: dict, repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each variant, one call of each per round in rotated order (so that all
    see the same machine load and none always follows the same one); ``warmup`` rounds untimed."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for index in range(warmup + repeats):
        for name in rotated(list(runs), index):
            start = time.perf_counter()
            runs[name]()
            if index >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def pool_miss_time(call, repeats: int) -> dict:
    """The default call with nothing cached: each call maps (and faults in) a new buffer."""
    saved = output_pool_stats()
    configure_output_pool(max_cached_blocks=0)
    try:
        return time_call(call, repeats=repeats, warmup=1)
    finally:
        configure_output_pool(max_cached_blocks=saved["max_cached_blocks"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--baseline-repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="B=64, 112×112, K=1, few repeats")
    parser.add_argument("--name", default="mixer")
    parser.add_argument("--isa", default="auto", help="CPU kernel: auto (best), or one of _C.cpu_isas()")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.size, args.ks, args.repeats, args.baseline_repeats = 64, 112, [1], 5, 2
    torch.set_num_threads(args.threads)
    native().select_cpu_isa(args.isa)
    load_before = os.getloadavg()
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    thp_mode = thp.read_text().strip() if thp.exists() else "n/a"
    print(f"CPU kernel: {native().selected_cpu_isa()} (available: {', '.join(native().cpu_isas())}); "
          f"THP: {thp_mode}; load average {load_before[0]:.2f}", flush=True)
    gen = torch.Generator().manual_seed(0)
    b, s, c = args.batch, args.size, 3
    # The decoded batch of a neighbour-coherent plan: every partner is also in the batch (M = B).
    images = torch.randint(0, 256, (b, s, s, c), dtype=torch.uint8, generator=gen)
    elems = b * c * s * s
    src = torch.rand(elems)
    dst = torch.empty_like(src)

    rows = []
    for k in args.ks:
        anchors = torch.randperm(b, generator=gen)
        partners = torch.randint(0, b, (b, k), generator=gen)
        weights = torch.rand(b, k + 1, generator=gen) + 0.05
        weights /= weights.sum(1, keepdim=True)
        for out_dtype in (torch.float32, torch.bfloat16):
            kw = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, out_dtype=out_dtype)
            out = torch.empty(b, c, s, s, dtype=out_dtype)
            moved = elems * (k + 1) + elems * out.element_size()  # bytes read + written
            held = [None]

            def default_call():  # noqa: E306 - the previous batch stays alive until replaced
                held[0] = mix_images(images, anchors, partners, weights, **kw)

            times = interleaved({"default": default_call,
                                 "out=": lambda: mix_images(images, anchors, partners, weights, out=out, **kw),
                                 "copy": lambda: dst.copy_(src)}, args.repeats)
            held[0] = None
            default_s, out_s = statistics.median(times["default"]), statistics.median(times["out="])
            copy_s = statistics.median(times["copy"])
            fraction = statistics.median(moved * tc / (td * 2 * src.nbytes)
                                         for td, tc in zip(times["default"], times["copy"]))
            miss = pool_miss_time(lambda: mix_images(images, anchors, partners, weights, **kw),
                                  max(3, args.repeats // 3))
            empty = time_call(lambda: mix_images(images, anchors, partners, weights, out=torch.empty_like(out), **kw),
                              repeats=max(3, args.repeats // 3), warmup=1)
            torch_t = time_call(lambda: plain_torch_mix(images, anchors, partners, weights, out_dtype),
                                repeats=args.baseline_repeats, warmup=1)
            row = {
                "K": k,
                "out": str(out_dtype).replace("torch.", ""),
                "default ms": default_s * 1e3,
                "default GB/s": moved / default_s / 1e9,
                "img/s": b / default_s,
                "out= ms": out_s * 1e3,
                "default / out=": paired_median(times["default"], times["out="]),
                "pool-miss ms": miss["median"] * 1e3,
                "torch.empty ms": empty["median"] * 1e3,
                "torch ms": torch_t["median"] * 1e3,
                "speed-up vs torch": torch_t["median"] / default_s,
                "copy GB/s": 2 * src.nbytes / copy_s / 1e9,
                "fraction of copy": fraction,
            }
            rows.append(row)
            print(f"K={k} {out_dtype}: default {row['default ms']:.1f} ms, out= {row['out= ms']:.1f} ms, "
                  f"pool miss {row['pool-miss ms']:.1f} ms, torch.empty {row['torch.empty ms']:.1f} ms, "
                  f"torch {row['torch ms']:.0f} ms", flush=True)

    load_after = os.getloadavg()
    met = {name: all((r[name] <= bound) if name == "default / out=" else (r[name] >= bound) for r in rows)
           for name, bound in TARGETS.items()}
    print("targets: " + ", ".join(f"{name} {'<=' if name == 'default / out=' else '>='} {bound}: "
                                  f"{'met' if met[name] else 'MISSED'}" for name, bound in TARGETS.items()))
    print(f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    report(args.name, rows, ["K", "out", "default ms", "default GB/s", "img/s", "out= ms", "default / out=",
                             "pool-miss ms", "torch.empty ms", "torch ms", "speed-up vs torch", "copy GB/s",
                             "fraction of copy"],
           extra={"config": vars(args), "build": build_info(), "thp": thp_mode, "targets": TARGETS,
                  "targets_met": met, "load_average": {"before": load_before, "after": load_after},
                  "pool": output_pool_stats()})


if __name__ == "__main__":
    main()
