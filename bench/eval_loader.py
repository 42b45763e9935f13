"""Benchmark: evaluation-batch throughput (the refresh pass, the test set) on the CPU, same run.

Data: the web-like JPEGs of bench/loader.py (500×400, quality 90, cut from scikit-learn's
sample photographs), read from the page cache. Every variant yields what a model consumes:
float32 NCHW batches of 64 normalised 224×224 views (shorter side resized to 256, central
224×224 crop), in data-set order.

    (a) torchvision ImageFolder + DataLoader (PIL Resize(256) + CenterCrop(224)), 2 workers
    (b) EvalLoader, resize_backend="dali": DALI decodes the whole image, resizes it with
        fn.resize and crops; the loader's batch.mix(ones) normalises and transposes
    (c) EvalLoader, resize_backend="torch" (the CPU default): DALI decodes only the central
        window (ROI decoding), the loader resizes it to 224×224 with torch's uint8
        antialiased bilinear kernel; then the same normalisation

The variants run one pass each per round, in an order rotated every round, for ``--repeats``
rounds after a warm-up round. The table gives each variant's median img/s and the median
over rounds of its ratio to (a) and to (b) measured in the same round (robust to load swings),
plus CPU seconds per image (this process, and (a)'s DataLoader workers, from /proc).

    .venv/bin/python -m bench.eval_loader            # 512 images, 7 rounds; writes bench/results/eval_loader.json
    .venv/bin/python -m bench.eval_loader --quick    # 128 images, 2 rounds, for a smoke run
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_rounds, paired_median, report  # noqa: E402
from loader import IMAGENET_MEAN, IMAGENET_STD, make_web_like_jpegs, worker_cpu_seconds  # noqa: E402

from mixnn_fast.data.description import DatasetDescription  # noqa: E402
from mixnn_fast.pipeline import EvalLoader, LoaderOptions  # noqa: E402

A = "(a) torchvision ImageFolder + DataLoader (PIL), 2 workers"
B = "(b) EvalLoader, DALI resize"
C = "(c) EvalLoader, DALI central-window decode + torch resize (CPU default)"


def torchvision_eval_loader(root: Path, batch: int, workers: int):
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                             transforms.Normalize([m / 255 for m in IMAGENET_MEAN], [s / 255 for s in IMAGENET_STD])])
    dataset = datasets.ImageFolder(str(root), transform=tf)
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=workers,
                                       persistent_workers=True)


def pass_torchvision(loader) -> int:
    n = 0
    for x, y in loader:
        assert x.shape[1:] == (3, 224, 224)
        n += len(y)
    return n


def pass_ours(loader) -> int:
    n = 0
    for batch in loader:
        x, _ = batch.mix()  # what the refresh's forward pass does: K = 0, weight 1
        assert x.shape[1:] == (3, 224, 224) and x.dtype == torch.float32
        n += len(batch)
        batch.release()  # once the forward pass is done: the pool reuses its buffers
    return n


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="DALI threads and DataLoader workers")
    parser.add_argument("--repeats", type=int, default=7, help="measured rounds (after one warm-up round)")
    parser.add_argument("--quick", action="store_true", help="128 images, 2 rounds")
    parser.add_argument("--name", default="eval_loader")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.repeats = 128, 2
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(f"writing {args.images} web-like JPEGs ...", flush=True)
        paths, labels = make_web_like_jpegs(root, args.images)
        # ImageFolder sorts by class folder then name: give our loaders the same order
        order = sorted(range(len(paths)), key=lambda i: paths[i])
        desc = DatasetDescription("web", [f"class_{k:02d}" for k in range(10)], labels[order],
                                  paths=[paths[i] for i in order])
        common = LoaderOptions(mean=IMAGENET_MEAN, std=IMAGENET_STD, num_threads=args.threads, device="cpu",
                               copy=False)
        view = dict(crop=224, resize=256)
        variants = {
            A: (torchvision_eval_loader(root, args.batch, args.threads), pass_torchvision),
            B: (EvalLoader(desc, args.batch, common.replace(resize_backend="dali"), **view), pass_ours),
            C: (EvalLoader(desc, args.batch, common.replace(resize_backend="torch"), **view), pass_ours),
        }
        rates, cpu_ms = interleaved_rounds(
            {name: (lambda ld=loader, run=run: run(ld)) for name, (loader, run) in variants.items()},
            repeats=args.repeats, expected=args.images,
            cpu_seconds=lambda name: time.process_time() + worker_cpu_seconds(variants[name][0]))

    rows = [{"variant": name, "img_per_s": statistics.median(rates[name]),
             "vs_a": paired_median(rates[name], rates[A]), "vs_b": paired_median(rates[name], rates[B]),
             "cpu_ms_per_img": statistics.median(cpu_ms[name]),
             "cpu_a_over_this": statistics.median(cpu_ms[A]) / statistics.median(cpu_ms[name])} for name in rates]
    report(args.name, rows, ["variant", "img_per_s", "vs_a", "vs_b", "cpu_ms_per_img", "cpu_a_over_this"],
           extra={"images": args.images, "batch": args.batch, "threads": args.threads, "repeats": args.repeats})


if __name__ == "__main__":
    main()
