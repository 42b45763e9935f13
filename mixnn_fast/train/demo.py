"""The embedded demo (the README's first command): CE vs MixNN on the real Fashion-MNIST with
40% symmetric label noise (uniform over all classes, the paper's convention), side by side,
on a budget that fits a 2-core machine in about ten minutes.

The paper trains 300 epochs with warm-up E_w = 10, label correction from E_s = 60 and warm
restarts every 10 epochs.  The demo keeps those proportions: each is scaled by
``epochs / 300`` (at least one epoch), and the EMA momentum α = 0.9 per epoch is kept.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from mixnn_fast.train.config import TrainConfig
from mixnn_fast.train.report import accuracy_curve, plot_accuracy, write_run_report
from mixnn_fast.train.trainer import Trainer

DEMO_EPOCHS = 30
DEMO_SUBSET = 4000
DEMO_WIDTHS = [16, 32, 64, 64]  # the small CNN of the calibration runs: ~850 train img/s on 2 busy cores
DEMO_EVAL_EVERY = 2             # a 10,000-image test pass costs ~6 s here: every other epoch
QUICK_EPOCHS = 4
QUICK_SUBSET = 1000


def scaled_schedule(epochs: int) -> dict:
    """The paper's 300-epoch schedule scaled to ``epochs``."""
    scale = epochs / 300
    return {
        "warmup_epochs": max(1, round(10 * scale)),
        "correction_start": max(2, round(60 * scale)),
        "restart_period": max(1, round(10 * scale)),
    }


def demo_configs(*, epochs: int, subset: int, out_dir: str, seed: int = 0, noise_rate: float = 0.4,
                 progress: bool = True) -> dict[str, TrainConfig]:
    common = dict(dataset="fashion_mnist", noise="symmetric_uniform", noise_rate=noise_rate, train_subset=subset,
                  model="small_cnn", model_widths=DEMO_WIDTHS, epochs=epochs, batch_size=128, seed=seed,
                  noise_seed=seed, progress=progress, tensorboard=False, eval_every=DEMO_EVAL_EVERY,
                  **scaled_schedule(epochs))
    return {method: TrainConfig(method=method, out_dir=str(Path(out_dir) / method), **common)
            for method in ("ce", "mixnn")}


def format_results(results: dict[str, dict]) -> str:
    lines = ["| method | final test acc | best test acc | label acc after correction | clean AUROC | minutes |",
             "|---|---|---|---|---|---|"]
    for method, s in results.items():
        lines.append(f"| {method} | {100 * s['final_test_accuracy']:.2f}% | {100 * s['best_test_accuracy']:.2f}% | "
                     f"{100 * s.get('label_accuracy_after_correction', float('nan')):.2f}% | "
                     f"{s.get('final_clean_auroc', float('nan')):.3f} | {s['wall_seconds'] / 60:.1f} |")
    return "\n".join(lines)


def run_demo(*, quick: bool = False, epochs: int | None = None, subset: int | None = None,
             out_dir: str = "runs/demo", seed: int = 0, progress: bool = True) -> dict[str, dict]:
    """Train CE and MixNN with the same data, noise, model and loader; print a table, write plots."""
    epochs = epochs or (QUICK_EPOCHS if quick else DEMO_EPOCHS)
    subset = subset or (QUICK_SUBSET if quick else DEMO_SUBSET)
    configs = demo_configs(epochs=epochs, subset=subset, out_dir=out_dir, seed=seed, progress=progress)
    results: dict[str, dict] = {}
    curves = {}
    for method, cfg in configs.items():
        print(f"\n[demo] {method}: {subset} Fashion-MNIST training images, 40% symmetric noise, {epochs} epochs "
              f"(warm-up {cfg.warmup_epochs}, label correction from epoch {cfg.correction_start})", flush=True)
        start = time.perf_counter()
        trainer = Trainer(cfg)
        if trainer.data.note:
            print(f"[demo] NOTE: {trainer.data.note}", flush=True)
        summary = trainer.fit()
        summary["wall_seconds"] = time.perf_counter() - start
        results[method] = write_run_report(trainer, summary)
        curves[method] = accuracy_curve(trainer.metrics.rows)
        print(f"[demo] {method}: final test accuracy {100 * summary['final_test_accuracy']:.2f}%", flush=True)
    plot_path = plot_accuracy(curves, Path(out_dir) / "accuracy_ce_vs_mixnn.png",
                              title=f"Fashion-MNIST, 40% symmetric noise, {subset} images")
    table = format_results(results)
    print("\n" + table)
    print(f"\nplots and label_issues.csv per method under {out_dir}/<method>/; comparison plot: {plot_path}")
    (Path(out_dir) / "results.md").write_text(table + "\n")
    (Path(out_dir) / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return results
