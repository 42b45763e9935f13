"""Benchmark: the wall time of a MixNN epoch vs a CE epoch — same model, data, loader, threads.

MixNN pays for the refresh (a forward pass over the pool, the GMM, the neighbour search) and
for mixing (partners decoded in-batch by the coherent plan, the fused mixer).  The table gives
medians over epochs of: training time, refresh time, their sum, and the ratio to CE, paired
within rounds (every round runs one epoch of each variant, in rotated order).
Target: MixNN epoch (training + refresh) <= 1.35x CE.

    .venv/bin/python bench/epoch.py                 # Fashion-MNIST 10k, small CNN, 6 rounds
    .venv/bin/python bench/epoch.py --quick
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mixnn_fast  # noqa: E402,F401  (sets OMP_WAIT_POLICY before torch loads)
from common import paired_median, report, rotated  # noqa: E402

from mixnn_fast.train.config import TrainConfig  # noqa: E402
from mixnn_fast.train.trainer import Trainer  # noqa: E402


def make_trainer(method: str, args, out_dir: str, **overrides) -> Trainer:
    cfg = TrainConfig(dataset="fashion_mnist", method=method, train_subset=args.subset, model="small_cnn",
                      model_widths=args.widths, epochs=args.epochs + 1, warmup_epochs=0, correction_start=0,
                      batch_size=128, num_threads=args.threads, progress=False, tensorboard=False,
                      eval_every=10**6, out_dir=out_dir, **overrides)
    return Trainer(cfg)


def epoch_seconds(row: dict) -> float:
    """An epoch's wall time: training plus the refresh before it."""
    return row["train_seconds"] + (row.get("refresh_seconds") or 0.0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subset", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=6, help="measured epochs per variant (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--widths", type=int, nargs=4, default=[16, 32, 64, 64])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.subset, args.epochs = 2000, 2
    rows = []
    variants = [("ce", "CE (plain plan)", {}),
                ("mixnn", "MixNN K=1, coherent plan", {}),
                ("mixnn", "MixNN K=1, naive plan", {"plan": "naive"})]
    with tempfile.TemporaryDirectory() as tmp:
        trainers = [make_trainer(method, args, f"{tmp}/{i}", **overrides)
                    for i, (method, _, overrides) in enumerate(variants)]
        for trainer in trainers:  # the first epoch warms caches and builds pipelines
            trainer.train_epoch(0)
        # This machine's speed drifts with other jobs: each round runs one epoch of every
        # variant, in rotated order, and ratios are taken within a round (paired).
        measured: list[list[dict]] = [[] for _ in variants]
        for epoch in range(1, args.epochs + 1):
            for i in rotated(range(len(variants)), epoch):
                measured[i].append(trainers[i].train_epoch(epoch))
    base = [epoch_seconds(r) for r in measured[0]]
    for (_, label, _), epochs in zip(variants, measured):
        total = [epoch_seconds(r) for r in epochs]
        rows.append({"variant": label,
                     "train s": statistics.median(r["train_seconds"] for r in epochs),
                     "refresh s": statistics.median(r.get("refresh_seconds") or 0.0 for r in epochs),
                     "refresh forward s": statistics.median(r.get("refresh_forward_seconds") or 0.0 for r in epochs),
                     "epoch s": statistics.median(total),
                     "train img/s": statistics.median(r["images_per_second"] for r in epochs),
                     "extra decode": statistics.median(r.get("extra_decode_fraction", 0.0) for r in epochs),
                     "ratio to CE (paired)": paired_median(total, base),
                     "min ratio": min(t / b for t, b in zip(total, base)),
                     "max ratio": max(t / b for t, b in zip(total, base))})
    report("epoch", rows, ["variant", "train s", "refresh s", "refresh forward s", "epoch s", "train img/s",
                           "extra decode", "ratio to CE (paired)", "min ratio", "max ratio"],
           extra={"config": vars(args)})


if __name__ == "__main__":
    main()
