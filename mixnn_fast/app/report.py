"""What a run leaves for a person: ``label_issues.csv`` (the labels most likely wrong first, with
a suggested label), ``report.html`` (the page to open), ``summary.json``, ``label_record.npz``
and PNG plots — test accuracy per epoch, the label scores' histograms split by right/wrong given
labels, the confusion matrix of suggested vs true labels."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from mixnn_fast.app.report_html import (RunPage, audit_table, columns_html, figure_html, gallery_html, gallery_items,
                                        runs_table, section_html, write_html)
from mixnn_fast.audit.issues import RULES
from mixnn_fast.audit.run_folder import RECORD, RecordArrays, audit_record, issue_metrics, record_columns
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
    """One row per sample ordered by the run's clean probability (lowest first): sample id, path,
    given label, corrected label, clean probability (and the true label when known).

    The run's report no longer uses it: after label correction the clean probability is
    measured against the corrected labels and says little about the given ones (see
    :func:`write_issue_report` and ``mixnn_fast.audit``)."""
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


# right / wrong given labels: blue and orange stay apart for colour-blind readers and in greyscale
# (dashed vs solid), and step outlines never hide one another the way filled bars do
RIGHT, WRONG = "#1f77b4", "#e66100"


def _split_histogram(ax, values: np.ndarray, wrong: np.ndarray | None, title: str) -> None:
    """One panel: the histogram of ``values`` (in [0, 1]) for right and for wrong given labels —
    right as a light-blue area with a blue outline, wrong as a thick dashed orange outline only, so
    neither hides the other — on a log count scale (the ends of [0, 1] hold most samples)."""
    bins = np.linspace(0, 1, 26)
    if wrong is None:
        ax.hist(values, bins=bins, color=RIGHT, alpha=0.25, label=f"all samples ({len(values)})")
        ax.hist(values, bins=bins, color=RIGHT, histtype="step", linewidth=1.8)
    else:
        ax.hist(values[~wrong], bins=bins, color=RIGHT, alpha=0.22)
        ax.hist(values[~wrong], bins=bins, color=RIGHT, histtype="step", linewidth=1.8,
                label=f"given label right ({int((~wrong).sum())})")
        ax.hist(values[wrong], bins=bins, color=WRONG, histtype="step", linewidth=2.4, linestyle="--",
                label=f"given label wrong ({int(wrong.sum())})")
    ax.set_yscale("log")
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability")
    ax.set_ylabel("samples")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.25)


def plot_clean_probability(clean_prob: np.ndarray, clean_mask: np.ndarray | None, path: str | Path,
                           title: str = "", *, panels: dict[str, np.ndarray] | None = None) -> Path:
    """Histograms of per-sample probabilities (N,) in [0, 1] split by whether the given label is
    truly right (``clean_mask`` (N,) bool, or None where unknown): ``clean_prob`` in the first
    panel, then one panel per entry of ``panels`` (title -> (N,) values); one legend above them."""
    plt = _pyplot()
    series = {title or "clean probability": clean_prob, **(panels or {})}
    fig, axes = plt.subplots(1, len(series), figsize=(4.6 * len(series), 3.9), squeeze=False)
    wrong = None if clean_mask is None else ~np.asarray(clean_mask, dtype=bool)
    for ax, (name, values) in zip(axes[0], series.items()):
        values = np.asarray(values, dtype=np.float64)
        keep = np.isfinite(values)
        _split_histogram(ax, values[keep], None if wrong is None else wrong[keep], name)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), frameon=False, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_confusion(true: np.ndarray, predicted: np.ndarray, classes: Sequence[str], path: str | Path,
                   title: str = "", xlabel: str = "corrected label") -> Path:
    """Row-normalised confusion matrix of ``predicted`` (N,) int (e.g. suggested labels) against
    ``true`` (N,) int; cells show percentages of the true class."""
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
    ax.set_xlabel(xlabel)
    ax.set_ylabel("true label")
    ax.set_title(title or f"{xlabel} vs true label ({100 * np.trace(counts) / counts.sum():.1f}% right)", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def accuracy_curve(rows: Sequence[dict]) -> list[tuple[int, float]]:
    return [(r["epoch"], r["test_accuracy"]) for r in rows if "test_accuracy" in r]


def write_run_report(out_dir: str | Path, record: LabelRecord, summary: dict) -> dict:
    """Everything a finished run leaves for a person, in ``out_dir``, from what the run concluded
    about its labels (``Trainer.label_record()``): ``label_record.npz`` (those per-sample arrays,
    so the audit and the report can be rebuilt without the model), ``label_issues.csv``,
    ``summary.json``, the plots and ``report.html``.  Returns the summary with the file paths,
    and — where true labels are known — the label accuracy after correction, the clean-detection
    AUROC of the run's own clean probability (``final_clean_auroc``) and the audit's precision,
    recall, F1 and AUROC (``label_audit``)."""
    out = Path(out_dir)
    arrays = RecordArrays.from_label_record(record)
    arrays.save(out / RECORD)
    data = record.train
    if record.final_corrections is not None:  # MixNN+'s last correction: how many reported labels it changed
        summary = {**summary, "final_corrections": record.final_corrections}
    return write_issue_report(out, arrays, summary, rows=record.rows, paths=data.paths, images=data.images)


def _image_source(paths: Sequence[str] | None, images: np.ndarray | None):
    if images is not None:
        return lambda i: images[i]
    if paths is not None:
        return lambda i: paths[i]
    return None


def write_issue_report(out_dir: str | Path, record: RecordArrays, summary: dict, *, rows: Sequence[dict],
                       paths: Sequence[str] | None = None, images: np.ndarray | None = None,
                       audit: dict | None = None) -> dict:
    """``label_issues.csv``, the plots, ``report.html`` and ``summary.json`` of a run from its
    record (see :func:`write_run_report`).  ``images`` (N, H, W, C) uint8 or ``paths`` (N,) give
    the gallery its pictures; ``audit``: an ``audit.json`` content (ours vs cleanlab) to show."""
    out = Path(out_dir)
    given, true, classes = record.given, record.true, record.classes
    issues = audit_record(record, rule=(audit or {}).get("rule"))  # the rule mixnn audit was asked for
    files = {"label_record": str(out / RECORD),
             "label_issues": str(issues.to_csv(out / "label_issues.csv", classes=classes, paths=paths,
                                               true_labels=true, extra=record_columns(record)))}
    files["accuracy_plot"] = str(plot_accuracy({record.method: accuracy_curve(rows)}, out / "accuracy.png",
                                               title=f"{record.method}: test accuracy per epoch"))
    clean_mask = None if true is None else true == given
    panels = {"clean probability vs given labels (GMM on losses)": record.clean_prob_given}
    if record.corrects_labels:
        panels["clean probability vs current labels (last refresh)"] = record.clean_prob
    files["clean_probability_plot"] = str(plot_clean_probability(
        issues.components["p_given"], clean_mask, out / "clean_probability.png",
        title="audit: probability of the given label" + (" (model, soft targets)" if record.corrects_labels
                                                          else " (model)"), panels=panels))
    summary = {k: v for k, v in summary.items() if k not in ("files", "label_audit")}
    summary["classes"] = list(classes)
    scored = np.isfinite(record.clean_prob)
    if true is not None:
        summary["label_accuracy_after_correction"] = float((record.corrected == true).mean())
        summary["final_clean_auroc"] = auroc(record.clean_prob[scored], clean_mask[scored])
        summary["label_audit"] = {"rule": issues.rule, **issue_metrics(issues, ~clean_mask),
                                  "suggested_label_accuracy_on_flagged": float(
                                      (issues.suggested_label == true)[issues.is_label_issue].mean())
                                  if issues.num_issues else float("nan")}
        files["confusion_plot"] = str(plot_confusion(true, issues.suggested_label, classes, out / "confusion.png",
                                                     xlabel="suggested label"))
    else:
        summary["label_audit"] = {"rule": issues.rule, "flagged": issues.num_issues}
    files["report"] = str(write_run_html(out / "report.html", record, summary, issues, files, audit=audit,
                                         image_of=_image_source(paths, images)))
    summary = {**summary, "files": files}
    write_atomic(out / "summary.json", json.dumps(summary, indent=2).encode())
    return summary


def _pct(value) -> str:
    return "–" if value is None or value != value else f"{100 * value:.1f}%"


def run_page(record: RecordArrays, summary: dict, issues, files: dict, *, audit: dict | None = None,
             image_of=None, name: str | None = None) -> RunPage:
    """The report's section for one run."""
    audit_rows = None
    if audit and audit.get("methods") and "f1" in next(iter(audit["methods"].values())):
        audit_rows = {("ours (" + record.method + ")" if k == "ours" else k): v for k, v in audit["methods"].items()}
    elif "f1" in summary.get("label_audit", {}):
        audit_rows = {f"ours ({record.method})": {**summary["label_audit"],
                                                   "inputs": "final model" + (" + soft targets"
                                                                              if record.corrects_labels else "")}}
    cards = {"final test accuracy": _pct(summary.get("final_test_accuracy")),
             "best test accuracy": _pct(summary.get("best_test_accuracy")),
             "labels flagged": f"{issues.num_issues} of {len(issues)}"}
    if record.true is not None:
        cards["given labels wrong"] = f"{int(record.noise_mask.sum())} of {len(issues)}"
        cards["flags that are wrong labels"] = _pct(summary["label_audit"].get("precision"))
        cards["wrong labels flagged"] = _pct(summary["label_audit"].get("recall"))
    figures = {"test accuracy per epoch": files.get("accuracy_plot")}
    if "confusion_plot" in files:
        figures["suggested vs true labels (row-normalised %)"] = files["confusion_plot"]
    hist = "the scores split by whether the given label is right" if record.true is not None else "the scores"
    figures[hist] = files.get("clean_probability_plot")
    gallery = [] if image_of is None else gallery_items(issues, record.classes, image_of, true_labels=record.true)
    notes = [f"label_issues.csv in the run's folder lists every sample, most likely wrong first (flagging rule: "
             f"{issues.rule}; see mixnn_fast/audit/issues.py)."]
    return RunPage(name=name or record.method, cards=cards, audit=audit_rows,
                   figures={k: Path(v) for k, v in figures.items() if v}, gallery=gallery, notes=notes,
                   wide=(hist,), widths={hist: _histogram_width(record)})


def _histogram_width(record: RecordArrays) -> float:
    """Percent of the page's width for a run's histogram figure: 3 panels for a run that corrected
    labels, 2 otherwise (see :func:`write_issue_report`)."""
    return 100.0 if record.corrects_labels else 200.0 / 3


def write_run_html(path: str | Path, record: RecordArrays, summary: dict, issues, files: dict, *,
                   audit: dict | None = None, image_of=None) -> Path:
    """One run's ``report.html``."""
    page = run_page(record, summary, issues, files, audit=audit, image_of=image_of)
    noise = summary.get("noise_rate_realised")
    subtitle = (f"{len(record.given)} training samples, {len(record.classes)} classes"
                + (f", {100 * noise:.0f}% of the given labels wrong" if noise is not None else "")
                + f", {summary.get('epochs', '?')} epochs. Folder: {Path(path).parent}")
    return write_html(path, f"Label audit: {record.method}", subtitle, [section_html(page, heading=False)])


def rebuild_run_report(run_dir: str | Path, *, train=None, audit: dict | None = None) -> dict:
    """Write a finished run's ``label_issues.csv``, plots, ``report.html`` and ``summary.json``
    again from the files it left (``label_record.npz``, ``summary.json``, ``metrics.jsonl``),
    with the current audit rule and ``audit`` (an ``audit.json`` content; default: the run's
    ``audit.json`` if any).  ``train``: the run's training set (default: rebuilt from its
    config.yaml), for the gallery's images."""
    from mixnn_fast.audit.run_folder import AUDIT, training_set
    from mixnn_fast.train.metrics import read_metrics

    run = Path(run_dir)
    summary_path = run / "summary.json"
    if not summary_path.exists() or not (run / RECORD).exists():
        raise FileNotFoundError(f"run_dir: {run} holds no finished run ({RECORD} and summary.json are written "
                                "when a run finishes)")
    if audit is None and (run / AUDIT).exists():
        audit = json.loads((run / AUDIT).read_text())
    train = train if train is not None else training_set(run)
    return write_issue_report(run, RecordArrays.load(run / RECORD), json.loads(summary_path.read_text()),
                              rows=read_metrics(run), paths=train.paths, images=train.images, audit=audit)


def _audit_rows(record: RecordArrays, summary: dict, audit: dict | None) -> dict[str, dict]:
    """The run's rows of the audit table: ours (and cleanlab's, from ``audit.json``)."""
    if audit and audit.get("methods") and "f1" in next(iter(audit["methods"].values())):
        return dict(audit["methods"])
    if "f1" in summary.get("label_audit", {}):
        inputs = "final model" + (" + soft targets" if record.corrects_labels else "") + f" of the {record.method} run"
        return {"ours": {"seconds": float("nan"), **summary["label_audit"], "inputs": inputs}}
    return {}


def write_comparison_report(path: str | Path, run_dirs: Sequence[str | Path], *, title: str | None = None,
                            accuracy_plot: str | Path | None = None, gallery_size: int = 12) -> Path:
    """One self-contained page setting finished runs side by side (e.g. the demo's CE and MixNN):
    their test accuracy and audit (with cleanlab's row where ``mixnn audit`` computed it), test
    accuracy per epoch in one plot (``accuracy_plot``, default: drawn next to ``path``), and per
    run, in columns, the top ``gallery_size`` suspected label errors and the suggested-vs-true
    confusion; the score histograms follow, one run under the other (they have 2-3 panels each).
    Returns ``path``."""
    from mixnn_fast.audit.run_folder import AUDIT, training_set
    from mixnn_fast.train.metrics import read_metrics

    path = Path(path)
    runs = [Path(r) for r in run_dirs]
    if not runs:
        raise ValueError("run_dirs: expected at least one finished run")
    names = [r.name for r in runs]
    overview, audits, references, galleries, confusions, histograms, curves = {}, {}, {}, [], [], [], {}
    trains: dict[str, object] = {}
    cleanlab_labels = None
    for run, name in zip(runs, names):
        summary_path = run / "summary.json"
        if not summary_path.exists() or not (run / RECORD).exists():
            raise FileNotFoundError(f"run_dirs: {run} holds no finished run ({RECORD} and summary.json are written "
                                    "when a run finishes)")
        record = RecordArrays.load(run / RECORD)
        summary = json.loads(summary_path.read_text())
        audit = json.loads((run / AUDIT).read_text()) if (run / AUDIT).exists() else None
        issues = audit_record(record, rule=(audit or {}).get("rule"))
        config_text = (run / "config.yaml").read_text() if (run / "config.yaml").exists() else ""
        # runs of one data set (same subset, noise and seed) share one rebuilt training set
        key = "\n".join(line for line in config_text.splitlines()
                        if line.split(":")[0] in ("dataset", "data_root", "train_subset", "noise", "noise_rate",
                                                  "noise_seed", "validation_split", "seed"))
        if key not in trains or not np.array_equal(trains[key].labels, record.given):
            trains[key] = training_set(run)
        train = trains[key]
        if not np.array_equal(train.labels, record.given):
            raise ValueError(f"run_dirs: the training labels rebuilt from {run / 'config.yaml'} differ from the "
                             f"run's {RECORD}; the data set changed since the run")
        curves[name] = accuracy_curve(read_metrics(run))
        overview[name] = {"method": record.method,
                          "final test accuracy": _pct(summary.get("final_test_accuracy")),
                          "best test accuracy": _pct(summary.get("best_test_accuracy")),
                          "labels flagged": f"{issues.num_issues} of {len(issues)}"}
        if record.true is not None:
            overview[name]["given labels wrong"] = f"{int(record.noise_mask.sum())} of {len(issues)}"
        for key_row, row in _audit_rows(record, summary, audit).items():
            if key_row == "ours":
                audits[f"ours ({name})"] = row
            elif cleanlab_labels is None or not np.array_equal(cleanlab_labels, record.given):
                # one cleanlab row per distinct set of given labels (it does not depend on the run)
                references[key_row if cleanlab_labels is None else f"{key_row} ({name})"] = row
                cleanlab_labels = record.given
        items = gallery_items(issues, record.classes, _image_source(train.paths, train.images), k=gallery_size,
                              true_labels=record.true)
        galleries.append((name, gallery_html(items)))
        confusions.append((name, figure_html("suggested label vs true label (row-normalised %)", run / "confusion.png")))
        histograms.append(figure_html(f"{name}: the scores split by whether the given label is right",
                                      run / "clean_probability.png", wide=True, width=_histogram_width(record)))
    if accuracy_plot is None:
        accuracy_plot = plot_accuracy(curves, path.parent / "accuracy_comparison.png",
                                      title="test accuracy per epoch")
    audits.update(references)  # ours first, then cleanlab's
    if all(row["method"] == name for name, row in overview.items()):
        for row in overview.values():  # the folder names say it already
            del row["method"]
    sections = [runs_table(overview)]
    if audits:
        sections += ["<h2>Finding the wrong labels</h2>", audit_table(audits),
                     "<p class='note'>Precision: the share of flagged labels that are wrong; recall: the share of "
                     "wrong labels flagged; AUROC: how well the score ranks wrong labels above right ones. "
                     "label_issues.csv in each run folder lists every sample, most likely wrong first.</p>"]
    sections += ["<h2>Test accuracy</h2>", "<div class='figs'>" + figure_html("test accuracy per epoch",
                                                                             accuracy_plot) + "</div>",
                 f"<h2>Top {gallery_size} suspected label errors</h2>",
                 "<p class='note'>Red: the given label; green: the suggested label and the model's probability for "
                 "it; score: how likely the given label is wrong (0.5: it gets the average probability of labels "
                 "of its class, 1: none).</p>", columns_html(galleries)]
    if any(c for _, c in confusions):
        sections += ["<h2>Suggested vs true labels</h2>", columns_html(confusions)]
    sections += ["<h2>Scores of right and wrong given labels</h2>", "<div class='figs'>" + "".join(histograms)
                 + "</div>"]
    first = RecordArrays.load(runs[0] / RECORD)
    subtitle = (f"{len(first.given)} training samples, {len(first.classes)} classes. Runs: "
                + ", ".join(str(r) for r in runs))
    return write_html(path, title or "Label audit: " + " vs ".join(names), subtitle, sections)


def run_folders(paths: Sequence[str | Path]) -> list[Path]:
    """The finished runs named by ``paths``: each a run folder, or a folder whose sub-folders are
    runs (e.g. the demo's ``runs/demo``)."""
    runs = []
    for p in map(Path, paths):
        if (p / RECORD).exists():
            runs.append(p)
        elif p.is_dir() and any((c / RECORD).exists() for c in p.iterdir()):
            runs += sorted(c for c in p.iterdir() if (c / RECORD).exists())
        else:
            raise FileNotFoundError(f"run_dir: {p} holds no finished run (no {RECORD}; runs write it when they "
                                    "finish, since the label audit exists)")
    return runs


def audit_runs(paths: Sequence[str | Path], *, reference: bool = True, folds: int = 5, seed: int = 0,
               rule: str | None = None, log=print) -> list[dict]:
    """``mixnn audit``: audit each run (:func:`mixnn_fast.audit.run_folder.audit_run`), computing
    cleanlab's reference once per distinct training set, and rewrite each run's report with the
    comparison (and the comparison page of each folder of runs named), flagging by ``rule`` (default:
    find_label_issues's).  Every path is checked before anything is written.  Returns the
    audit.json contents."""
    import hashlib

    from mixnn_fast.audit.reference import reference_audit
    from mixnn_fast.audit.run_folder import audit_run, pixels_of, training_set

    if rule is not None and rule not in RULES:
        raise ValueError(f"rule: expected one of {', '.join(RULES)}, got {rule!r}")
    if reference:
        from mixnn_fast.audit.reference import import_cleanlab

        import_cleanlab()  # an ImportError saying how to install it, before any work
    # every run is read and checked before anything is written: a bad folder among several
    # leaves all of them as they were
    checked = []
    for run in run_folders(paths):
        if not (run / "summary.json").exists():
            raise FileNotFoundError(f"run_dir: {run} has no summary.json; the run did not finish")
        train = training_set(run)
        record = RecordArrays.load(run / RECORD)
        if not np.array_equal(train.labels, record.given):
            raise ValueError(f"run_dir: the training labels rebuilt from {run / 'config.yaml'} differ from the "
                             f"run's {RECORD}; the data set changed since the run")
        checked.append((run, train, record))
    cache: dict[str, object] = {}
    results = []
    for run, train, record in checked:
        ref = None
        if reference:
            pixels = pixels_of(train)
            key = hashlib.sha256(pixels.tobytes() + record.given.tobytes()).hexdigest()
            if key not in cache:
                log(f"[audit] cleanlab on {folds}-fold cross-validated logistic regression on the pixels of "
                    f"{len(pixels)} images ...")
                cache[key] = reference_audit(pixels, record.given, folds=folds, seed=seed,
                                             num_classes=len(record.classes))
            ref = cache[key]
        result = audit_run(run, reference=reference, reference_result=ref, folds=folds, seed=seed, rule=rule,
                           log=log)
        rebuild_run_report(run, train=train, audit=result)
        results.append(result)
    for folder in map(Path, paths):  # a folder of runs (the demo's) gets its comparison page again
        if not (folder / RECORD).exists():
            page = write_comparison_report(folder / "report.html", run_folders([folder]))
            log(f"[audit] comparison page: {page}")
    return results
