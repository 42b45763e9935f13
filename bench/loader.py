"""Benchmark: training-batch throughput of the DALI loader vs torchvision, same run, 2 CPU threads.

Data: a folder of web-like JPEGs (500×400, quality 90) cut from scikit-learn's two sample
photographs: crops at varied offsets and scales, flips, colour shifts (real picture
content, not noise), written to a temporary directory and read from the page cache.
Every variant yields what a model consumes: float32 NCHW batches of 64 normalised
224×224 random-resized crops with random flips.

    (a) torchvision ImageFolder + DataLoader (PIL), 2 workers
    (b) our plain plan through the loader (DALI decodes on 2 threads; normalised float NCHW)
    (c) our MixNN neighbour-coherent plan, K = 1, + the fused mixer: anchors/s, mixing included.
        The partners and weights come from one PartnerTable, carried by the plan into each
        batch; ``batch.mix(targets)`` mixes them through the trusted path (no per-batch
        validation), and each batch is released after use, as the trainer does
    (d) the naive MixNN plan (every partner decoded again) + the same mixer: anchors/s

The loader's CPU default (``resize_backend="torch"``): DALI decodes each random window
(ROI decoding) and draws the flips; the loader resizes the windows to 224×224 with torch's
uint8 antialiased bilinear kernel (the same filter as DALI's ``fn.resize``, equal within
rounding) in the training thread, and (b) then normalises and transposes with the fused
mixer at K = 0.  (b-dali) and (c-dali) are (b) and (c) with everything in DALI
(``resize_backend="dali"``: ``fn.resize`` + ``crop_mirror_normalize``), as before.

(b), (c), (d) use ``copy=False`` (each batch is consumed before the next is asked for:
the loader reuses its output buffers, or hands out views of DALI's) and (c), (d) mix into
one reused output buffer (a fresh 38 MB float tensor per batch costs page faults on the
CPU).  Three more rows show the defaults and the ceiling: (b-copy) and (c-copy) use the
defaults (``copy=True``: every batch copied into a buffer of the loader's pool, and for
(c-copy) the mixer output taken from the pool too), each batch released after use, as the
trainer does, so the next batches reuse the buffers; (b-u8) is the loader's uint8 NHWC
output alone, not normalised (not model-ready).

A last table splits (c) and (c-dali) into CPU time per anchor (load-independent, unlike
wall time): the training thread's share (reading the files for DALI's external source,
the host resize, the rest of ``next()``, the mixer) and DALI's worker threads (the
process's CPU time minus the training thread's).  The mixer runs in the training thread
with ``--mix-threads`` OpenMP threads (default 1: DALI's 2 threads already fill the 2
cores, and more threads only contend).

Neighbours: the exact 1-NN graph of 16×16 grey thumbnails of the images (a real
neighbour structure).  Timing on a shared, loaded machine: the variants run one short
epoch each per round, in an order rotated every round, for ``--repeats`` rounds after a
warm-up round.  The table gives each variant's median img/s and, more robust to load
swings, the median over rounds of its ratio to (a) and to (b) measured in the same round.
It also gives the CPU time each variant spends per image (this process plus, for (a), its
DataLoader workers, from /proc) and the per-round ratio of (a)'s CPU time to it: on a
machine shared with other jobs the scheduler gives each runnable thread its share, so a
variant with more busy threads gets more of the cores; CPU time per image does not depend
on that, and on an idle 2-core machine where both fill the cores, throughput follows it.
A second table times ``plan_epoch`` alone for 1,000,000 anchors.

In-memory arrays (``--in-memory`` runs this part alone; writes bench/results/loader_in_memory.json):
the host path (``LoaderOptions(backend="host")``, the CPU default: NumPy shift + flip, no
DALI) against the DALI path (``backend="dali"``: the same host-drawn shifts and flips applied
by ``fn.slice`` + ``fn.flip``; the same batches, bit for bit), on Fashion-MNIST-sized
(28×28×1) and CIFAR-sized (32×32×3) arrays, batches of 128, pad 4 + flips, DALI on
``--threads`` threads.  Two variants of each: the loader alone (uint8 NHWC batches, released
after use), and what the trainer does (coherent plan, K = 1, ``batch.mix(targets)`` into a
pooled float32 NCHW output, released).  The arrays are random bytes (the work does not depend
on the pixel values), ``--array-images`` of each shape.  Same round-robin timing as above;
"vs DALI path, paired" is the median over rounds of the ratio of a variant's rate to its DALI
twin's in the same round, "DALI CPU / own CPU" the same for CPU time per image (this process,
DALI's threads included).

    .venv/bin/python -m bench.loader            # 640 images, 10 rounds; writes bench/results/loader.json
    .venv/bin/python -m bench.loader --quick    # 192 images, 2 rounds, for a smoke run
    .venv/bin/python -m bench.loader --in-memory  # the in-memory table alone
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, interleaved_rounds, paired_median, report  # noqa: E402

from mixnn_fast.data.description import DatasetDescription  # noqa: E402
from mixnn_fast.pipeline import LoaderOptions, MixNNLoader, plan_epoch  # noqa: E402
from mixnn_fast.refresh.partners import PartnerTable  # noqa: E402

A = "(a) torchvision ImageFolder + DataLoader (PIL), 2 workers"
B = "(b) plain plan, normalised float NCHW"
C = "(c) MixNN coherent plan K=1 + fused mixer"
D = "(d) MixNN naive plan K=1 + fused mixer"
B_COPY = "(b-copy) plain plan, pooled batch buffers, released (default copy=True)"
C_COPY = "(c-copy) coherent + mixer, pooled buffers and mixer output, released (defaults)"
IMAGENET_MEAN = [123.675, 116.28, 103.53]
IMAGENET_STD = [58.395, 57.12, 57.375]


def make_web_like_jpegs(root: Path, n: int, *, width: int = 500, height: int = 400, classes: int = 10,
                        seed: int = 0) -> tuple[list[str], np.ndarray]:
    """``n`` JPEGs (quality 90) in ``root/class_k/``: scaled crops of the two sample photos at
    varied offsets, flipped at random, with per-channel colour gains; returns (paths, labels)."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(p) for p in load_sample_images().images]  # 640×427 each
    paths, labels = [], []
    for i in range(n):
        photo = photos[i % 2]
        scale = rng.uniform(max(width / photo.width, height / photo.height), 1.6)
        big = photo.resize((int(np.ceil(photo.width * scale)), int(np.ceil(photo.height * scale))), Image.BILINEAR)
        x0 = int(rng.integers(0, big.width - width + 1))
        y0 = int(rng.integers(0, big.height - height + 1))
        img = np.asarray(big.crop((x0, y0, x0 + width, y0 + height)), dtype=np.float32)
        if rng.random() < 0.5:
            img = img[:, ::-1]
        img = img * rng.uniform(0.8, 1.2, size=3) + rng.uniform(-20, 20)
        label = i % classes
        path = root / f"class_{label:02d}" / f"img_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, format="JPEG", quality=90)
        paths.append(str(path))
        labels.append(label)
    return paths, np.asarray(labels, dtype=np.int64)


def thumbnail_neighbours(paths: list[str]) -> np.ndarray:
    """(N, 1) exact nearest other image by 16×16 grey thumbnails."""
    feats = []
    for p in paths:
        with Image.open(p) as im:
            im.draft("L", (64, 64))  # JPEG DCT scaling: a cheap small decode
            feats.append(np.asarray(im.convert("L").resize((16, 16), Image.BILINEAR), dtype=np.float32).ravel())
    x = np.stack(feats)
    sq = (x * x).sum(1)
    d = sq[:, None] + sq[None] - 2 * x @ x.T
    np.fill_diagonal(d, np.inf)
    return d.argmin(1)[:, None].astype(np.int64)


def torchvision_loader(root: Path, batch: int, workers: int):
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(),
                             transforms.Normalize([m / 255 for m in IMAGENET_MEAN], [s / 255 for s in IMAGENET_STD])])
    dataset = datasets.ImageFolder(str(root), transform=tf)
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                       persistent_workers=True, drop_last=False)


def worker_cpu_seconds(loader) -> float:
    """CPU seconds used so far by a DataLoader's (persistent) worker processes, 0 before they start."""
    iterator = getattr(loader, "_iterator", None)
    total = 0.0
    for worker in getattr(iterator, "_workers", None) or []:
        with open(f"/proc/{worker.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def epoch_torchvision(loader) -> int:
    n = 0
    for x, y in loader:
        n += len(y)
    return n


def epoch_dali(loader) -> int:
    n = 0
    for b in loader:
        n += len(b)
        b.release()  # as the trainer does after its step: the buffers serve the next batches
    return n


def epoch_mixnn(loader, targets: torch.Tensor, threads: int, out: torch.Tensor | None) -> int:
    """One epoch of ``batch.mix(targets)`` (the plan's weights, the trusted path), each batch
    released after use."""
    n = 0
    for b in loader:
        reuse = {"out": out} if out is not None and len(b) == len(out) else {}
        x, y = b.mix(targets, num_threads=threads, **reuse)
        n += len(x)
        b.release()
    return n


def cpu_breakdown(name: str, loader, targets, threads: int, out, epochs: int) -> dict:
    """CPU milliseconds per anchor of a MixNN loader + mixer epoch (median over ``epochs``
    after a warm-up): the training thread's parts and DALI's threads (process - training thread)."""
    import mixnn_fast.pipeline.feeder as feeder_module
    import mixnn_fast.pipeline.host_resize as host_resize

    parts: dict[str, float] = {}
    resize = host_resize.resize_windows
    feeder_call = feeder_module.Feeder.__call__

    def timed_resize(*args, **kwargs):
        start = time.thread_time()
        try:
            return resize(*args, **kwargs)
        finally:
            parts["resize"] = parts.get("resize", 0.0) + time.thread_time() - start

    def timed_feeder(self):
        start = time.thread_time()
        try:
            return feeder_call(self)
        finally:
            parts["read"] = parts.get("read", 0.0) + time.thread_time() - start

    host_resize.resize_windows, feeder_module.Feeder.__call__ = timed_resize, timed_feeder
    rows = []
    try:
        for epoch in range(epochs + 1):
            parts.clear()
            n, nxt, mix = 0, 0.0, 0.0
            wall, proc, main = time.perf_counter(), time.process_time(), time.thread_time()
            it = iter(loader)
            while True:
                start = time.thread_time()
                try:
                    b = next(it)
                except StopIteration:
                    break
                nxt += time.thread_time() - start
                start = time.thread_time()
                reuse = {"out": out} if len(b) == len(out) else {}
                b.mix(targets, num_threads=threads, **reuse)
                b.release()
                mix += time.thread_time() - start
                n += len(b)
            main = time.thread_time() - main
            proc = time.process_time() - proc
            wall = time.perf_counter() - wall
            ms = 1e3 / n
            rows.append({"variant": name, "read files": parts.get("read", 0.0) * ms,
                         "host resize": parts.get("resize", 0.0) * ms,
                         "rest of next()": (nxt - parts.get("read", 0.0) - parts.get("resize", 0.0)) * ms,
                         "mixer": mix * ms, "training thread": main * ms, "DALI threads": (proc - main) * ms,
                         "process": proc * ms, "wall": wall * ms})
    finally:
        host_resize.resize_windows, feeder_module.Feeder.__call__ = resize, feeder_call
    return {k: (v if k == "variant" else statistics.median(r[k] for r in rows[1:])) for k, v in rows[0].items()}


def in_memory_rounds(args) -> list[dict]:
    """The host path against the DALI path on in-memory arrays (module docstring); returns the rows."""
    rng = np.random.default_rng(0)
    n, batch = args.array_images, 128
    runs, loaders, pairs = {}, [], []
    for shape, name, tag in (((28, 28, 1), "28x28x1", "f"), ((32, 32, 3), "32x32x3", "c")):
        images = rng.integers(0, 256, (n,) + shape, dtype=np.uint8)
        labels = rng.integers(0, 10, n)
        desc = DatasetDescription(f"arrays {name}", [str(k) for k in range(10)], labels, images=images)
        nbrs = (np.arange(n)[:, None] + rng.integers(1, n, (n, 1))) % n
        lam = rng.uniform(0.5, 1.0, n).astype(np.float32)
        table = PartnerTable.build(np.arange(n), nbrs, np.stack([lam, 1 - lam], axis=1), n)
        targets = torch.nn.functional.one_hot(torch.from_numpy(labels), 10).float()
        options = LoaderOptions(device="cpu", pad=4, num_threads=args.threads, mean=[128.0] * shape[2],
                                std=[64.0] * shape[2], seed=0)
        names = {}
        for backend, suffix in (("host", ""), ("dali", "-dali")):
            plain = MixNNLoader(desc, batch, options.replace(backend=backend), mode="plain")
            mixing = MixNNLoader(desc, batch, options.replace(backend=backend), mode="coherent", partners=table)
            loaders += [plain, mixing]
            names[backend] = (f"({tag}1{suffix}) {name}, {backend} path, uint8 batches",
                              f"({tag}2{suffix}) {name}, {backend} path, coherent K=1 + mix")
            runs[names[backend][0]] = lambda ld=plain: epoch_dali(ld)
            runs[names[backend][1]] = lambda ld=mixing, t=targets: epoch_mixnn(ld, t, args.mix_threads, None)
        pairs += list(zip(names["host"], names["dali"]))
    rates, cpu_ms = interleaved_rounds(runs, repeats=args.repeats, expected=n, cpu_seconds=lambda _: time.process_time())
    for loader in loaders:
        loader.close()
    rows = []
    for host, dali in pairs:
        for name in (host, dali):
            rows.append({"variant": name, "img/s (median)": statistics.median(rates[name]),
                         "ms/batch (median)": 1e3 * batch / statistics.median(rates[name]),
                         "CPU ms/batch": statistics.median(cpu_ms[name]) * batch,
                         "vs DALI path, paired": paired_median(rates[name], rates[dali]),
                         "DALI CPU / own CPU": paired_median(cpu_ms[dali], cpu_ms[name])})
    return rows


def plan_timing(n: int, repeats: int) -> list[dict]:
    """plan_epoch on n anchors: a shallow 1-NN-like forest (mutual pairs, 40 % of nodes hung off them)."""
    rng = np.random.default_rng(0)
    f = np.arange(n) ^ 1
    hang = rng.random(n) < 0.4
    f[hang] = rng.integers(0, n, hang.sum()) & ~1
    nbrs = f[:, None].astype(np.int64)
    rows = []
    for mode in ("coherent", "naive", "plain"):
        times = []
        for epoch in range(repeats + 1):
            start = time.perf_counter()
            plan = plan_epoch(np.arange(n), nbrs, 64, mode=mode, seed=0, epoch=epoch)
            times.append(time.perf_counter() - start)
        rows.append({"mode": mode, "anchors": n, "median s": statistics.median(times[1:]),
                     "extra decode": plan.stats.extra_decode_fraction})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="DALI threads and DataLoader workers")
    parser.add_argument("--mix-threads", type=int, default=1, help="the mixer's OpenMP threads")
    parser.add_argument("--repeats", type=int, default=10, help="measured rounds (after one warm-up round)")
    parser.add_argument("--plan-size", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="192 images, 2 rounds, 100k-anchor plan")
    parser.add_argument("--name", default="loader")
    parser.add_argument("--in-memory", action="store_true", help="only the in-memory table (host path vs DALI)")
    parser.add_argument("--array-images", type=int, default=10_240, help="images of each in-memory array")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.repeats, args.plan_size, args.array_images = 192, 2, 100_000, 2_560
    torch.set_num_threads(args.threads)
    if args.in_memory:
        in_memory_main(args)
        return
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="mixnn_bench_loader_") as tmp:
        root = Path(tmp) / "train"
        start = time.perf_counter()
        paths, labels = make_web_like_jpegs(root, args.images)
        nbrs = thumbnail_neighbours(paths)
        print(f"built {len(paths)} JPEGs 500x400 q90 ({sum(os.path.getsize(p) for p in paths) / len(paths) / 1024:.0f} "
              f"KiB each) and their 1-NN graph in {time.perf_counter() - start:.1f}s")
        desc = DatasetDescription("web-like", [f"class_{k:02d}" for k in range(10)], labels, paths=paths)
        n = len(desc)
        rng = np.random.default_rng(1)
        lam = rng.uniform(0.5, 1.0, n).astype(np.float32)
        weights = torch.from_numpy(np.stack([lam, 1 - lam], axis=1))  # (N, 2): λ, β
        table = PartnerTable.build(torch.arange(n), torch.from_numpy(nbrs), weights, n)  # checked once, here
        targets = torch.nn.functional.one_hot(torch.from_numpy(labels), 10).float()

        common = LoaderOptions(size=224, num_threads=args.threads, device="cpu", mean=IMAGENET_MEAN,
                               std=IMAGENET_STD, seed=0)
        views = common.replace(copy=False)
        out = torch.empty(args.batch, 3, 224, 224)  # the reused mixer output
        mix = lambda ld, buf: epoch_mixnn(ld, targets, args.mix_threads, buf)  # noqa: E731
        in_dali = dict(normalize_in_pipeline=True, layout="NCHW")

        def loader(options: LoaderOptions, mode: str) -> MixNNLoader:
            return MixNNLoader(desc, args.batch, options, mode=mode, partners=None if mode == "plain" else table)

        variants = {
            A: (torchvision_loader(root, args.batch, args.threads), epoch_torchvision),
            B: (loader(views.replace(**in_dali), "plain"), epoch_dali),
            C: (loader(views, "coherent"), lambda ld: mix(ld, out)),
            D: (loader(views, "naive"), lambda ld: mix(ld, out)),
            B_COPY: (loader(common.replace(**in_dali), "plain"), epoch_dali),
            C_COPY: (loader(common, "coherent"), lambda ld: mix(ld, None)),
            "(b-u8) plain plan, uint8 NHWC, not normalised":
                (loader(views.replace(mean=None, std=None), "plain"), epoch_dali),
            "(b-dali) plain plan, resize + normalise in DALI":
                (loader(views.replace(resize_backend="dali", **in_dali), "plain"), epoch_dali),
            "(c-dali) coherent + mixer, resize in DALI":
                (loader(views.replace(resize_backend="dali"), "coherent"), lambda ld: mix(ld, out)),
        }
        rates, cpu_ms = interleaved_rounds(
            {name: (lambda ld=loader, run=run: run(ld)) for name, (loader, run) in variants.items()},
            repeats=args.repeats, expected=n,
            cpu_seconds=lambda name: time.process_time() + worker_cpu_seconds(variants[name][0]))
        coherent_plan = variants[C][0].plan
        stats = coherent_plan.stats
        cpu_rows = [cpu_breakdown(name, variants[name][0], targets, args.mix_threads, out,
                                  max(2, args.repeats // 2))
                    for name in (C, "(c-dali) coherent + mixer, resize in DALI")]
        for loader, _ in variants.values():
            if isinstance(loader, MixNNLoader):
                loader.close()
        del variants

    med = {name: statistics.median(r) for name, r in rates.items()}

    def paired(name: str, base: str) -> float:
        return paired_median(rates[name], rates[base])

    rows = []
    for name, r in rates.items():
        rows.append({"variant": name, "img/s (median)": med[name], "min": min(r), "max": max(r),
                     "vs (a), paired": paired(name, A), "vs (b), paired": paired(name, B),
                     "CPU ms/img": statistics.median(cpu_ms[name]),
                     "(a) CPU / own CPU": paired_median(cpu_ms[A], cpu_ms[name])})
    report(args.name, rows, ["variant", "img/s (median)", "min", "max", "vs (a), paired", "vs (b), paired",
                             "CPU ms/img", "(a) CPU / own CPU"],
           extra={"images": n, "batch": args.batch, "threads": args.threads, "mix_threads": args.mix_threads,
                  "repeats": args.repeats,
                  "coherent_plan": stats.as_dict(), "mixer": "LoaderBatch.mix: trusted path (mix.trusted), fused",
                  "cpu_ms_per_anchor": cpu_rows, "loadavg_before": load_before, "loadavg_after": os.getloadavg()})
    print("load average (1, 5, 15 min) before: " + ", ".join(f"{x:.2f}" for x in load_before)
          + "; after: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    c_b, c_a, c_d = paired(C, B), paired(C, A), paired(C, D)
    copies = paired(C_COPY, B_COPY)
    print(f"\ncoherent plan (K=1, batch {args.batch}, {n} anchors): extra-decode fraction "
          f"{stats.extra_decode_fraction:.3f} ({stats.decoded} decoded), partners already in batch "
          f"{stats.partners_in_batch_fraction:.3f}, {stats.components} components (largest {stats.largest_component})")
    print(f"targets (paired medians): (c)/(b) = {c_b:.3f} (>= 0.9: {'met' if c_b >= 0.9 else 'MISSED'}); "
          f"(c)/(a) = {c_a:.3f} (>= 1.6: {'met' if c_a >= 1.6 else 'MISSED'}); (c)/(d) = {c_d:.2f}; "
          f"defaults (c-copy)/(b-copy) = {copies:.3f}")
    print(f"ratios of the medians: (c)/(b) = {med[C] / med[B]:.3f}, (c)/(a) = {med[C] / med[A]:.3f}")

    print("\n## CPU ms per anchor, (c) and (c-dali), split by thread (median over epochs)\n")
    print(format_table(cpu_rows, list(cpu_rows[0])))

    plan_rows = plan_timing(args.plan_size, 3)
    print(f"\n## plan_epoch alone, {args.plan_size:,} anchors, batch 64, K=1 (median of 3 after a warm-up)\n")
    print(format_table(plan_rows, ["mode", "anchors", "median s", "extra decode"]))
    in_memory_main(args)


def in_memory_main(args) -> None:
    load_before = os.getloadavg()
    print(f"\n## in-memory arrays: host path vs DALI path ({args.array_images} images of each shape, batch 128)\n")
    rows = in_memory_rounds(args)
    report(f"{args.name}_in_memory", rows, ["variant", "img/s (median)", "ms/batch (median)", "CPU ms/batch",
                                            "vs DALI path, paired", "DALI CPU / own CPU"],
           extra={"images": args.array_images, "batch": 128, "pad": 4, "flip": True, "threads": args.threads,
                  "mix_threads": args.mix_threads, "repeats": args.repeats, "loadavg_before": load_before,
                  "loadavg_after": os.getloadavg()})
    print("load average (1, 5, 15 min) before: " + ", ".join(f"{x:.2f}" for x in load_before)
          + "; after: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
