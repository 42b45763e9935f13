"""Benchmark: the wall time of a MixNN epoch vs a CE epoch — same model, data, loader, threads.

MixNN pays for the refresh (a forward pass over the pool, the GMM, the neighbour search) and
for mixing (partners decoded in-batch by the coherent plan, the fused mixer).  The table gives
medians over epochs of: training time, refresh time, their sum, and the ratio to CE.
Target: MixNN epoch (training + refresh) <= 1.35x CE.

    .venv/bin/python bench/epoch.py                 # Fashion-MNIST 10k, small CNN, 4 epochs each
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
from common import report  # noqa: E402

from mixnn_fast.train.config import TrainConfig  # noqa: E402
from mixnn_fast.train.trainer import Trainer  # noqa: E402


def run(method: str, args, out_dir: str, **overrides) -> list[dict]:
    cfg = TrainConfig(dataset="fashion_mnist", method=method, train_subset=args.subset, model="small_cnn",
                      model_widths=args.widths, epochs=args.epochs, warmup_epochs=0, correction_start=0,
                      batch_size=128, num_threads=args.threads, progress=False, tensorboard=False,
                      eval_every=10**6, out_dir=out_dir, **overrides)
    trainer = Trainer(cfg)
    for epoch in range(cfg.epochs):
        trainer.metrics.log(trainer.train_epoch(epoch))
    return trainer.metrics.rows[1:]  # the first epoch warms caches and builds pipelines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subset", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--widths", type=int, nargs=4, default=[16, 32, 64, 64])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.subset, args.epochs = 2000, 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        variants = [("ce", "CE (plain plan)", {}),
                    ("mixnn", "MixNN K=1, coherent plan", {}),
                    ("mixnn", "MixNN K=1, naive plan", {"plan": "naive"})]
        measured = {}
        for method, label, overrides in variants:
            epochs = run(method, args, f"{tmp}/{label}", **overrides)
            train = statistics.median(r["train_seconds"] for r in epochs)
            refresh = statistics.median(r.get("refresh_seconds") or 0.0 for r in epochs)
            measured[label] = train + refresh
            rows.append({"variant": label, "train s": train, "refresh s": refresh, "epoch s": train + refresh,
                         "train img/s": statistics.median(r["images_per_second"] for r in epochs),
                         "extra decode": statistics.median(r.get("extra_decode_fraction", 0.0) for r in epochs)})
        base = measured["CE (plain plan)"]
        for row in rows:
            row["ratio to CE"] = row["epoch s"] / base
    report("epoch", rows, ["variant", "train s", "refresh s", "epoch s", "train img/s", "extra decode",
                           "ratio to CE"], extra={"config": vars(args)})


if __name__ == "__main__":
    main()
