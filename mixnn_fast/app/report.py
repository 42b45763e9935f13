"""What a run leaves for a person: ``label_issues.csv`` (the list to audit), ``summary.json``, and
PNG plots — test accuracy per epoch, the clean-probability histogram split by true clean/noisy,
the confusion matrix of corrected vs true labels."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from mixnn_fast.audit.scores import auroc
from mixnn_fast.train.atomic import write_atomic
from mixnn_fast.train.outcome import LabelRecord


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    return plt


def write_label_issues(path: str | Path, *, given: np.ndarray, corrected: np.ndarray, clean_prob: np.ndarray,
                       paths: Sequence[str] | None = None, true: np.ndarray | None = None,
                       classes: Sequence[str] | None = None) -> Path:
    """One row per sample, most suspicious first (lowest clean probability): sample id, path,
    given label, corrected label, clean probability (and the true label when known)."""
    path = Path(path)
    order = np.argsort(clean_prob, kind="stable")
    name = (lambda c: classes[c]) if classes is not None else str
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        header = ["sample_id", "path", "given_label", "corrected_label", "clean_probability", "given_name",
                  "corrected_name"]
        if true is not None:
            header += ["true_label"]
        writer.writerow(header)
        for i in order:
            row = [int(i), paths[i] if paths is not None else "", int(given[i]), int(corrected[i]),
                   f"{float(clean_prob[i]):.6f}", name(int(given[i])), name(int(corrected[i]))]
            if true is not None:
                row.append(int(true[i]))
            writer.writerow(row)
    return path


def plot_accuracy(curves: dict[str, Sequence[tuple[int, float]]], path: str | Path, title: str = "") -> Path:
    """Test accuracy per epoch, one line per run: ``curves[label] = [(epoch, accuracy), ...]``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, points in curves.items():
        if points:
            epochs, accuracy = zip(*points)
            ax.plot(np.asarray(epochs) + 1, 100 * np.asarray(accuracy), marker="o", markersize=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "test accuracy per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_clean_probability(clean_prob: np.ndarray, clean_mask: np.ndarray | None, path: str | Path,
                           title: str = "") -> Path:
    """Histogram of the clean probability, split by whether the given label is truly right."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    bins = np.linspace(0, 1, 41)
    if clean_mask is None:
        ax.hist(clean_prob, bins=bins, color="tab:blue", alpha=0.8, label="all samples")
    else:
        ax.hist(clean_prob[clean_mask], bins=bins, color="tab:green", alpha=0.6,
                label=f"given label right ({int(clean_mask.sum())})")
        ax.hist(clean_prob[~clean_mask], bins=bins, color="tab:red", alpha=0.6,
                label=f"given label wrong ({int((~clean_mask).sum())})")
    ax.set_yscale("log")
    ax.set_xlabel("clean probability (GMM posterior of the low-loss component)")
    ax.set_ylabel("samples")
    ax.set_title(title or "clean probability")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_confusion(true: np.ndarray, predicted: np.ndarray, classes: Sequence[str], path: str | Path,
                   title: str = "") -> Path:
    """Row-normalised confusion matrix of ``predicted`` (e.g. corrected labels) against ``true``."""
    plt = _pyplot()
    c = len(classes)
    counts = np.zeros((c, c), dtype=np.int64)
    np.add.at(counts, (true, predicted), 1)
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * c, 0.8 + 0.5 * c))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(c):
        for j in range(c):
            if counts[i, j]:
                ax.text(j, i, f"{100 * rates[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(c), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(c), classes, fontsize=8)
    ax.set_xlabel("corrected label")
    ax.set_ylabel("true label")
    ax.set_title(title or f"corrected vs true labels ({100 * np.trace(counts) / counts.sum():.1f}% right)")
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def accuracy_curve(rows: Sequence[dict]) -> list[tuple[int, float]]:
    return [(r["epoch"], r["test_accuracy"]) for r in rows if "test_accuracy" in r]


def write_run_report(out_dir: str | Path, record: LabelRecord, summary: dict) -> dict:
    """``label_issues.csv``, ``summary.json`` and the plots of a finished run in ``out_dir``, from
    what the run concluded about its labels (``Trainer.label_record()``).  Returns the summary
    with the file paths, and the label accuracy and clean-detection AUROC where true labels are
    known.

    For MixNN the corrected labels are the soft targets' argmax and the clean probability is the
    last refresh's.  For the baselines, which correct nothing, the corrected label is the model's
    prediction and the clean probability comes from the run's GMM fitted on the final losses
    against the given labels — so every method gets a comparable clean-detection AUROC."""
    out = Path(out_dir)
    data = record.train
    given, true, corrected, clean_prob = data.labels, data.clean_labels, record.corrected, record.clean_prob
    files = {"label_issues": str(write_label_issues(out / "label_issues.csv", given=given, corrected=corrected,
                                                    clean_prob=clean_prob, paths=data.paths, true=true,
                                                    classes=list(data.classes)))}
    files["accuracy_plot"] = str(plot_accuracy({record.method: accuracy_curve(record.rows)}, out / "accuracy.png"))
    scored = ~np.isnan(clean_prob)
    clean_mask = None if true is None else (true == given)[scored]
    files["clean_probability_plot"] = str(plot_clean_probability(clean_prob[scored], clean_mask,
                                                                 out / "clean_probability.png",
                                                                 title=f"{record.method}: clean probability"))
    if true is not None:
        summary["label_accuracy_after_correction"] = float((corrected == true).mean())
        summary["final_clean_auroc"] = auroc(clean_prob[scored], clean_mask)
        files["confusion_plot"] = str(plot_confusion(true, corrected, list(data.classes), out / "confusion.png"))
    summary = {**summary, "files": files}
    write_atomic(out / "summary.json", json.dumps(summary, indent=2).encode())
    return summary
