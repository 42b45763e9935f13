"""The embedded demo (the README's first command): CE, MixNN and MixNN+ on the real
Fashion-MNIST with 40% symmetric label noise (uniform over all classes, the paper's
convention), side by side, on a budget that fits a 2-core machine in about six minutes.

The budget is the results table's (mixnn_fast.app.experiments): 2,000 training images, 60
epochs, no augmentation, the small CNN — where plain CE visibly memorises the noisy labels (its
test accuracy falls from an early peak), the regime MixNN is meant for.  The paper's 300-epoch
schedule (warm-up 10, label correction from 60, warm restarts every 10) is scaled by
``epochs / 300``; the EMA momentum α = 0.9 per epoch is kept.
"""
from __future__ import annotations

import json
from pathlib import Path

from mixnn_fast.app.experiments import Cell, run_cell, table_cells
from mixnn_fast.train.metrics import read_metrics
from mixnn_fast.app.report import accuracy_curve, plot_accuracy, write_comparison_report

DEMO_EPOCHS = 60
DEMO_SUBSET = 2000
QUICK_EPOCHS = 6
QUICK_SUBSET = 1000
DEMO_METHODS = ("ce", "mixnn", "mixnn_plus")


def demo_cells(*, epochs: int, subset: int, out_dir: str, seed: int = 0, progress: bool = True) -> dict[str, Cell]:
    """CE, MixNN and MixNN+: the results table's sym-40 cells at this budget, each written to
    ``out_dir/<method>``."""
    cells = table_cells(out_dir=out_dir, subset=subset, epochs=epochs, seeds=(seed,), methods=DEMO_METHODS,
                        noises=(("symmetric_uniform", 0.4, "sym-40"),), plan_pair=False, ablations=False,
                        progress=progress)
    for cell in cells:
        cell.config.out_dir = str(Path(out_dir) / cell.method)
    return {cell.method: cell for cell in cells}


def format_results(results: dict[str, dict]) -> str:
    """The demo's table.  MixNN's clean AUROC is given against the given labels and against its
    current (corrected) labels, which is what its GMM detects once correction has started."""
    lines = ["| method | final test acc | best test acc | label acc after correction | clean AUROC, given labels "
             "| clean AUROC, current labels | minutes |",
             "|---|---|---|---|---|---|---|"]
    for method, s in results.items():
        current = s.get("clean_auroc_current_labels")
        lines.append(f"| {method} | {100 * s['final_test_accuracy']:.2f}% | {100 * s['best_test_accuracy']:.2f}% | "
                     f"{100 * s.get('label_accuracy_after_correction', float('nan')):.2f}% | "
                     f"{s.get('final_clean_auroc', float('nan')):.3f} | "
                     f"{'–' if current is None else f'{current:.3f}'} | {s.get('wall_seconds', float('nan')) / 60:.1f} |")
    return "\n".join(lines)


def run_demo(*, quick: bool = False, epochs: int | None = None, subset: int | None = None,
             out_dir: str | None = None, seed: int = 0, progress: bool = True) -> dict[str, dict]:
    """Train CE, MixNN and MixNN+ with the same data, noise, model and loader; print a table, write
    plots and ``out_dir/report.html``, the page setting the runs' label audits side by side."""
    epochs = epochs or (QUICK_EPOCHS if quick else DEMO_EPOCHS)
    subset = subset or (QUICK_SUBSET if quick else DEMO_SUBSET)
    out_dir = out_dir or ("runs/demo_quick" if quick else "runs/demo")
    cells = demo_cells(epochs=epochs, subset=subset, out_dir=out_dir, seed=seed, progress=progress)
    results: dict[str, dict] = {}
    curves = {}
    for method, cell in cells.items():
        cfg = cell.config
        print(f"\n[demo] {method}: {subset} Fashion-MNIST training images, 40% symmetric noise, {epochs} epochs, "
              f"no augmentation (warm-up {cfg.warmup_epochs}, label correction from epoch {cfg.correction_start}, "
              f"warm restarts every {cfg.restart_period})", flush=True)
        # a finished run is reported again, not retrained; an interrupted one resumes
        results[method] = run_cell(cell, log=lambda message: print(message.replace("[table]", "[demo]"), flush=True))
        curves[method] = accuracy_curve(read_metrics(cfg.out_dir))
    plot_path = plot_accuracy(curves, Path(out_dir) / "accuracy_by_method.png",
                              title=f"Fashion-MNIST, 40% symmetric noise, {subset} images")
    page = write_comparison_report(Path(out_dir) / "report.html", [cell.config.out_dir for cell in cells.values()],
                                   title=f"Label audit: {' vs '.join(cells)} on Fashion-MNIST, 40% symmetric noise",
                                   accuracy_plot=plot_path)
    table = format_results(results)
    print("\n" + table)
    print(f"\nopen {page}: the runs side by side (test accuracy, the labels most likely wrong, with suggestions)")
    print(f"report.html, plots and label_issues.csv per method under {out_dir}/<method>/; comparison plot: {plot_path}")
    print(f"beside cleanlab: .venv/bin/mixnn audit {out_dir}")
    print(f"(a second run reports these runs again; remove {out_dir} to train from scratch)")
    (Path(out_dir) / "results.md").write_text(table + "\n")
    (Path(out_dir) / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return results
