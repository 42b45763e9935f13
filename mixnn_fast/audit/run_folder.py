"""The audit of a training run's folder: what the run wrote about its labels
(``label_record.npz``), turned into ranked issues, and measured beside cleanlab.

This is the one audit module that knows the trainer's files; :mod:`mixnn_fast.audit.issues`
and :mod:`mixnn_fast.audit.reference` need no trainer.
"""
from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixnn_fast.audit.issues import LabelIssues, find_label_issues
from mixnn_fast.audit.scores import evaluate_issues

RECORD = "label_record.npz"
AUDIT = "audit.json"


@dataclass
class RecordArrays:
    """A run's per-sample view of its labels, as saved in ``label_record.npz`` (see
    ``mixnn_fast.train.outcome.LabelRecord``): all (N,), NaN / -1 where a sample could not be read.

    given, true (or None), corrected, predicted: int64.  clean_prob (the run's, against the labels
    it trained on last), clean_prob_given (a GMM on the losses against the given labels),
    prob_given, confidence, target_given: float64.  method: str; classes: list of C names."""

    method: str
    classes: list[str]
    given: np.ndarray
    true: np.ndarray | None
    corrected: np.ndarray
    clean_prob: np.ndarray
    clean_prob_given: np.ndarray
    prob_given: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray
    target_given: np.ndarray

    @classmethod
    def from_label_record(cls, record) -> "RecordArrays":
        from mixnn_fast.train.outcome import PER_SAMPLE_FIELDS

        data = record.train
        return cls(method=record.method, classes=list(data.classes), given=np.asarray(data.labels),
                   true=None if data.clean_labels is None else np.asarray(data.clean_labels),
                   **{name: np.asarray(getattr(record, name)) for name in PER_SAMPLE_FIELDS})

    @property
    def corrects_labels(self) -> bool:
        """Whether the run trained on labels other than the given ones (its soft targets moved)."""
        scored = np.isfinite(self.target_given)
        return bool(np.any(self.target_given[scored] < 1 - 1e-6))

    @property
    def noise_mask(self) -> np.ndarray | None:
        """(N,) bool, True where the given label is wrong; None where true labels are unknown."""
        return None if self.true is None else self.true != self.given

    def save(self, path: str | Path) -> Path:
        from mixnn_fast.train.atomic import write_atomic
        from mixnn_fast.train.outcome import PER_SAMPLE_FIELDS

        arrays = {k: getattr(self, k) for k in ("given", *PER_SAMPLE_FIELDS)}
        if self.true is not None:
            arrays["true"] = self.true
        buffer = io.BytesIO()
        np.savez(buffer, method=np.asarray(self.method), classes=np.asarray(self.classes, dtype=str), **arrays)
        write_atomic(path, buffer.getvalue())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "RecordArrays":
        """The record saved at ``path``; a ValueError naming the file when it is truncated, not
        an .npz, or lacks an array (a user's copy gone wrong is not a programming error)."""
        import zipfile

        from mixnn_fast.train.outcome import PER_SAMPLE_FIELDS

        try:
            with np.load(path, allow_pickle=False) as f:
                d = {k: f[k] for k in f.files}
            record = cls(method=str(d.pop("method")), classes=[str(c) for c in d.pop("classes")],
                         true=d.pop("true", None), **d)
        except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{path}: not a readable label record ({type(exc).__name__}: {exc}); "
                             "train the run again or restore the file") from None
        n = len(record.given)
        lengths = {k: len(getattr(record, k)) for k in PER_SAMPLE_FIELDS}
        if record.true is not None:
            lengths["true"] = len(record.true)
        wrong = {k: v for k, v in lengths.items() if v != n}
        if wrong:
            raise ValueError(f"{path}: arrays of different lengths ({n} given labels; {wrong}); the file is damaged")
        return record


def audit_record(record: RecordArrays, *, rule: str | None = None) -> LabelIssues:
    """The run's ranked issues, over all N samples.  Inputs to :func:`find_label_issues`: the final
    model's probability of the given label, its prediction and confidence, and — for runs that
    corrected labels — the soft target's probability of the given label.  Samples the final pass
    could not read get score NaN, are never flagged, and come last."""
    scored = np.isfinite(record.prob_given) & (record.predicted >= 0)
    n = len(record.given)
    idx = np.flatnonzero(scored)
    kwargs = {} if rule is None else {"rule": rule}
    sub = find_label_issues(record.given[idx], prob_given=record.prob_given[idx], suggested=record.predicted[idx],
                            confidence=record.confidence[idx], num_classes=len(record.classes),
                            soft_target_given=record.target_given[idx] if record.corrects_labels else None,
                            **kwargs)
    score = np.full(n, np.nan)
    score[idx] = sub.score
    flags = np.zeros(n, dtype=bool)
    flags[idx] = sub.is_label_issue
    suggested = record.given.copy()
    suggested[idx] = sub.suggested_label
    confidence = np.full(n, np.nan)
    confidence[idx] = sub.suggested_confidence
    components = {}
    for key, values in sub.components.items():
        full = np.full(n, np.nan)
        full[idx] = values
        components[key] = full
    order = np.concatenate([idx[sub.order], np.flatnonzero(~scored)])
    return LabelIssues(given_label=record.given, score=score, is_label_issue=flags, suggested_label=suggested,
                       suggested_confidence=confidence, order=order, components=components, rule=sub.rule)


def record_columns(record: RecordArrays) -> dict[str, np.ndarray]:
    """The CSV's extra columns from a record, each named by what it is measured against:
    clean_prob_given_labels (a GMM on the final losses against the given labels) and, for a run
    that corrected labels, clean_prob_current_labels (its last refresh's GMM, against the labels
    it trained on) and corrected_label (its soft targets' argmax)."""
    columns = {"clean_prob_given_labels": record.clean_prob_given}
    if record.corrects_labels:
        columns["clean_prob_current_labels"] = record.clean_prob
        columns["corrected_label"] = record.corrected
    return columns


def issue_metrics(issues: LabelIssues, noise_mask: np.ndarray) -> dict[str, float]:
    """:func:`evaluate_issues` over the scored samples."""
    scored = np.isfinite(issues.score)
    return evaluate_issues(issues.is_label_issue[scored], issues.score[scored], noise_mask[scored])


def training_set(run_dir: str | Path):
    """The run's training set (a DatasetDescription with the given labels, and the true labels
    where known), rebuilt from its config.yaml exactly as the trainer built it (the subset and
    the simulated noise are seeded)."""
    import yaml

    from mixnn_fast.train.config import TrainConfig
    from mixnn_fast.train.datasets import prepare_data

    config = Path(run_dir) / "config.yaml"
    if not config.exists():
        raise FileNotFoundError(f"run_dir: {run_dir} has no config.yaml (give a training run's --out-dir)")
    cfg = TrainConfig.from_saved(yaml.safe_load(config.read_text()), source=str(config))
    return prepare_data(cfg).train


def pixels_of(train) -> np.ndarray:
    """(N, H, W, C) uint8 pixels for the reference's model: the images when held in memory, else
    each file decoded to a 32x32 thumbnail."""
    return train.images if train.in_memory else load_thumbnails(train.paths, size=32)


def load_thumbnails(paths, size: int = 32) -> np.ndarray:
    """(N, size, size, 3) uint8: each encoded image decoded and resized (for the pixel model of
    data sets that are not held in memory; slow for millions of files)."""
    from PIL import Image

    out = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                out[i] = np.asarray(im.convert("RGB").resize((size, size)))
        except OSError:
            pass  # unreadable: a black thumbnail, as the run skipped it too
    return out


def audit_run(run_dir: str | Path, *, pixels: np.ndarray | None = None, reference: bool = True,
              reference_result=None, folds: int = 5, seed: int = 0, rule: str | None = None, log=print) -> dict:
    """Audit a finished run: its issues (from ``label_record.npz``, with the current rule)
    measured against the true noise mask where the data set knows it, beside cleanlab on
    out-of-sample probabilities of a ``folds``-fold cross-validated logistic regression on the
    same training images (``reference``).  ``pixels`` (N, H, W, C) uint8: the training images
    (default: rebuilt from the run's config); ``reference_result``: a ReferenceAudit already
    computed for the same images and labels; ``rule``: the flagging rule (default: find_label_issues's).
    Writes ``audit.json`` in the run folder and returns its content."""
    run_dir = Path(run_dir)
    if not (run_dir / RECORD).exists():
        raise FileNotFoundError(f"run_dir: {run_dir} has no {RECORD}; it is written when a run finishes "
                                "(runs finished before the audit existed: train them again)")
    start = time.perf_counter()
    record = RecordArrays.load(run_dir / RECORD)
    issues = audit_record(record, rule=rule)
    ours_seconds = time.perf_counter() - start
    result: dict = {"run": str(run_dir), "method": record.method, "samples": len(record.given),
                    "rule": issues.rule, "flagged": issues.num_issues}
    noise = record.noise_mask
    rows = {}
    inputs = "final model" + (" + soft targets" if record.corrects_labels else "") + f" of the {record.method} run"
    summary_path = run_dir / "summary.json"
    trained = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    trained = trained.get("wall_seconds") or trained.get("train_seconds")
    if trained:  # the audit itself is a pass over saved arrays; the run is what it costs
        inputs += f" (trained in {trained / 60:.1f} min)"
    rows["ours"] = ({**issue_metrics(issues, noise), "seconds": ours_seconds, "inputs": inputs} if noise is not None
                    else {"flagged": issues.num_issues, "seconds": ours_seconds, "inputs": inputs})
    if reference:
        from mixnn_fast.audit.reference import reference_audit

        ref = reference_result
        if ref is None:
            if pixels is None:
                train = training_set(run_dir)
                if not np.array_equal(train.labels, record.given):
                    raise ValueError(f"run_dir: the training labels rebuilt from {run_dir / 'config.yaml'} differ "
                                     f"from the run's {RECORD}; the data set changed since the run")
                pixels = pixels_of(train)
            log(f"[audit] {run_dir}: cleanlab on {folds}-fold cross-validated logistic regression on the pixels")
            ref = reference_audit(pixels, record.given, folds=folds, seed=seed, num_classes=len(record.classes))
        if not np.array_equal(ref.issues.given_label, record.given):
            raise ValueError("reference_result: computed for other labels than this run's")
        result["reference_model"] = ref.model
        rows["cleanlab"] = ({**evaluate_issues(ref.issues.is_label_issue, ref.issues.score, noise),
                             "seconds": ref.seconds, "inputs": "cleanlab on " + ref.model} if noise is not None
                            else {"flagged": ref.issues.num_issues, "seconds": ref.seconds,
                                  "inputs": "cleanlab on " + ref.model})
        both = issues.is_label_issue & ref.issues.is_label_issue
        result["agreement"] = {"flagged_by_both": int(both.sum()),
                               "flagged_by_ours_only": int((issues.is_label_issue & ~both).sum()),
                               "flagged_by_cleanlab_only": int((ref.issues.is_label_issue & ~both).sum())}
    result["methods"] = rows
    from mixnn_fast.train.atomic import write_atomic

    write_atomic(run_dir / AUDIT, json.dumps(result, indent=2).encode())
    return result


def format_audit(result: dict) -> str:
    """A text table of :func:`audit_run`'s result: ours vs cleanlab."""
    lines = [f"{result['run']} ({result['method']}, {result['samples']} samples, rule {result['rule']})"]
    rows = result.get("methods", {})
    if not rows or "f1" not in next(iter(rows.values())):
        lines.append("true labels unknown: flagged " + ", ".join(f"{k} {v['flagged']}" for k, v in rows.items()))
        return "\n".join(lines)
    lines.append(f"{'':10s} {'precision':>9s} {'recall':>7s} {'F1':>6s} {'AUROC':>6s} {'flagged':>8s} "
                 f"{'wrong':>6s} {'seconds':>8s}  inputs")
    for name, m in rows.items():
        seconds = "< 0.1" if m["seconds"] < 0.05 else f"{m['seconds']:.1f}"  # a pass over saved arrays
        lines.append(f"{name:10s} {m['precision']:9.3f} {m['recall']:7.3f} {m['f1']:6.3f} {m['auroc']:6.3f} "
                     f"{m['flagged']:8d} {m['wrong']:6d} {seconds:>8s}  {m['inputs']}")
    return "\n".join(lines)
