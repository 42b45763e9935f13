"""The results table: methods × label-noise settings on the same data, model, loader and budget.

``mixnn table`` trains every cell of a grid (CE, mixup, GCE, SCE, MixNN × symmetric 20/40/60/80%
and asymmetric 40% by default), one run per cell and seed, each exactly what the cell's printed
``mixnn train`` command does, and writes ``results.md`` (the table with the command per row),
``results.json`` and ``accuracy_<noise>.png`` (test accuracy per epoch of every method).  Finished
cells (a ``summary.json`` whose config matches) are not run again and interrupted ones resume from
their checkpoint, so the command can be stopped and restarted at will.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import shlex
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from mixnn_fast.train.config import REPORT_ONLY_FIELDS, TrainConfig, acting_settings, saved_settings
from mixnn_fast.train.run_lock import try_lock

TABLE_METHODS = ("ce", "mixup", "gce", "sce", "mixnn", "mixnn_plus")
# MixNN+'s ablation at sym-60 and sym-80: each of its changes switched off in turn
# (row label, folder suffix, config changes)
PLUS_ABLATIONS = (("correction of every sample", "_corrall", {"plus_correction": "all"}),
                  ("no label correction", "_nocorr", {"plus_correction": "none"}),
                  ("GCE instead of CE", "_gce", {"plus_loss": "gce"}),
                  ("no stability gate", "_nogate", {"plus_consistent": 0}),
                  ("no weight averaging", "_noavg", {"plus_average_last": 0.0}),
                  ("BatchNorm statistics averaged", "_bnavg", {"plus_average_bn": "averaged"}),
                  ("no trusted anchors", "_notrust", {"plus_symmetric_trust": False}),
                  ("no class-balance penalty", "_noprior", {"plus_prior": 0.0}))
# (noise kind, rate, label in the table).  symmetric_uniform is the paper's convention (uniform
# over all classes, so the realised rate is rate × (C−1)/C), which makes rows comparable with its Table I.
TABLE_NOISE = (("symmetric_uniform", 0.2, "sym-20"), ("symmetric_uniform", 0.4, "sym-40"),
               ("symmetric_uniform", 0.6, "sym-60"), ("symmetric_uniform", 0.8, "sym-80"),
               ("asymmetric_fashion_mnist", 0.4, "asym-40"))
# fields that only change how a run reports, never what it computes (plus where it writes)
_REPORTING_ONLY = ("progress", "tensorboard", "extra")
_COSMETIC = _REPORTING_ONLY + ("out_dir",)


class RunLocked(RuntimeError):
    """Another process is training this run folder now."""


@dataclass
class Cell:
    """One run of the table: its row label, noise label, and the full configuration."""

    noise: str
    method: str
    seed: int
    config: TrainConfig
    variant: str = ""  # e.g. "naive plan" for the plan-comparison pair

    @property
    def label(self) -> str:
        return self.method + (f" ({self.variant})" if self.variant else "")


def scaled_schedule(epochs: int, *, round_up: bool = False) -> dict:
    """The paper's 300-epoch schedule (warm-up 10, label correction from 60, warm restarts every
    10 epochs) with each length scaled by ``epochs / 300``, at least 1 (correction: at least 2),
    rounded to the nearest epoch or, with ``round_up``, up (the demo's: at 40 epochs it keeps
    warm-up and restarts at 2 instead of a restart every epoch; the same at whole lengths)."""
    def scaled(paper_epochs: int) -> int:
        if round_up:
            return -(-paper_epochs * epochs // 300)  # integer ceiling: no float rounding at exact multiples
        return round(paper_epochs * (epochs / 300))
    return {"warmup_epochs": max(1, scaled(10)), "correction_start": max(2, scaled(60)),
            "restart_period": max(1, scaled(10))}


def mid_cycle_note(epochs: int, *, round_up: bool = False) -> str | None:
    """Why runs of ``epochs`` epochs on :func:`scaled_schedule` (``round_up`` as there: the demo's)
    end with lower accuracies, when they do: their last epoch is not the end of a warm restart,
    so they stop at a high learning rate (measured with the demo at 45 epochs: CE 48.3% and
    MixNN+ 70.7% final, against 63.9% and 76.5% at 40).  None otherwise."""
    def ends_a_cycle(count: int) -> bool:
        return count % scaled_schedule(count, round_up=round_up)["restart_period"] == 0

    if ends_a_cycle(epochs):
        return None
    # the period scales with the epoch count, so the nearest counts that end a cycle are searched
    # for (one epoch always does: its period is 1)
    below = next(n for n in range(epochs - 1, 0, -1) if ends_a_cycle(n))
    above = next(n for n in itertools.count(epochs + 1) if ends_a_cycle(n))
    period = scaled_schedule(epochs, round_up=round_up)["restart_period"]
    return (f"{epochs} epochs is not a multiple of the warm-restart period ({period}): the runs end in the middle "
            f"of a cycle, at a high learning rate, and their final accuracies are lower than at its end; "
            f"{below} or {above} epochs end a cycle")


def table_cells(*, out_dir: str | Path, subset: int = 2000, epochs: int = 60, augment: bool = False, widths: Sequence[int] = (16, 32, 64, 64),
                seeds: Iterable[int] = (0,), methods: Sequence[str] = TABLE_METHODS,
                noises: Sequence[tuple[str, float, str]] = TABLE_NOISE, eval_every: int | None = None,
                plan_pair: bool = True, ablations: bool = True, **overrides) -> list[Cell]:
    """Every cell of the grid on Fashion-MNIST (Debian's files; ``dataset=...`` overrides it).  ``plan_pair`` adds MixNN at
    sym-40 with the naive plan (every partner decoded again), to set beside the coherent plan's
    row of the same seed; ``ablations`` adds MixNN at sym-60 with the GMM fitted on the losses
    against the soft targets instead of their argmax, MixNN at sym-80 with each sample's
    loss averaged over its last 5 refreshes (what the paper does at very high noise), and
    MixNN+ at sym-60 and sym-80 with each of its changes switched off (``PLUS_ABLATIONS``).  ``overrides`` are TrainConfig fields
    applied to every cell.

    The defaults are the budget where CE visibly memorises on this 2-core machine: 2,000 images,
    60 epochs, no augmentation (as Co-teaching's MNIST protocol), the small CNN (16-32-64-64);
    with random crops and flips CE did not memorise within 100 epochs (README, "Results").
    ``eval_every`` defaults to the restart period, so every test accuracy is taken at the same
    point of the learning-rate cycle (its lowest rate), not at random phases of it."""
    out_dir = Path(out_dir)
    schedule = scaled_schedule(epochs)
    eval_every = eval_every or schedule["restart_period"]
    cells = []
    for seed in seeds:
        for kind, rate, noise_label in noises:
            # (method, row label, folder suffix, config changes)
            variants = [(m, "", "", {}) for m in methods]
            if plan_pair and "mixnn" in methods and noise_label == "sym-40":
                variants.append(("mixnn", "naive plan", "_naive", {"plan": "naive"}))
            if ablations and "mixnn" in methods and noise_label == "sym-60":
                variants.append(("mixnn", "GMM on soft-target losses", "_softgmm", {"gmm_loss": "soft_targets"}))
            if ablations and "mixnn" in methods and noise_label == "sym-80":  # the paper's setting at 80%
                variants.append(("mixnn", "losses averaged over 5 refreshes", "_history5", {"gmm_history": 5}))
            if ablations and "mixnn_plus" in methods and noise_label in ("sym-60", "sym-80"):
                variants += [("mixnn_plus", label, suffix, extra) for label, suffix, extra in PLUS_ABLATIONS]
            for method, variant, suffix, extra in variants:
                name = f"{noise_label}_{method}{suffix}_s{seed}"
                values = dict(dataset="fashion_mnist", train_subset=subset, noise=kind, noise_rate=rate,
                              noise_seed=seed, seed=seed, method=method, model="small_cnn", model_widths=list(widths),
                              epochs=epochs, eval_every=eval_every, out_dir=str(out_dir / name), progress=False,
                              tensorboard=False, augment=augment, checkpoint_every=5)
                cfg = TrainConfig(**{**values, **schedule, **overrides, **extra})
                cells.append(Cell(noise=noise_label, method=method, seed=seed, config=cfg, variant=variant))
    return cells


def train_command(cfg: TrainConfig) -> str:
    """The ``mixnn train`` command line that trains exactly ``cfg`` (flags for the fields that differ
    from the defaults, plus --out-dir)."""
    defaults = TrainConfig()
    parts = [".venv/bin/mixnn", "train"]
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        if f.name in _REPORTING_ONLY or value == getattr(defaults, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, list):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def _config_differences(saved: dict, cfg: TrainConfig) -> list[str]:
    """The settings in which a saved run (its config.yaml) differs from ``cfg``, as
    "name: saved value, this cell's value" (empty: the same experiment)."""
    # a run written before a field existed ran with its old value; settings that cannot act with
    # the run's method do not make it another experiment
    written = saved_settings(saved)
    saved = acting_settings(written)
    mine = acting_settings(cfg.to_dict())
    # threads change only the order of float sums, not the experiment (config.RESUMABLE_FIELDS):
    # the demo's side-by-side runs (one thread each) are the table's cells.  A setting that acts
    # on one side only differs if its values differ (the setting it depends on is listed itself).
    return [f"{k}: saved {written.get(k)!r}, this cell {v!r}" for k, v in mine.items()
            if k not in _COSMETIC + ("num_threads",) + REPORT_ONLY_FIELDS and saved.get(k) != v and written.get(k) != v]


def _reported_otherwise(saved: dict, cfg: TrainConfig) -> list[str]:
    """The settings that change only a finished run's report (config.REPORT_ONLY_FIELDS) and that
    act for ``cfg`` with a value other than the saved run's: such a run is reported again, not
    retrained."""
    written, mine = saved_settings(saved), acting_settings(cfg.to_dict())
    return [k for k in REPORT_ONLY_FIELDS if k in mine and written.get(k) != mine[k]]


def run_cell(cell: Cell, *, log=print) -> dict:
    """Train one cell (or load its finished summary; or resume it from its checkpoint).  Raises
    RuntimeError when another process is training the same folder."""
    out = Path(cell.config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        return _run_cell_locked(cell, out, log)


@contextlib.contextmanager
def _exclusive(out: Path):
    """Hold ``out/.lock`` while a run is checked, trained or reported: two processes (table
    shards, a table and a demo) must never train the same folder at once, which would interleave
    their epochs in one metrics file."""
    # a lock file of its own: the Trainer inside takes the folder's writer lock (.train.lock)
    # for its epochs, and a second flock on one file from this process would refuse itself
    handle = try_lock(out / ".lock")
    if handle is None:
        raise RunLocked(f"{out}: another process is training this run now; wait for it to finish "
                        "(table shards: run the whole table once every shard is done)")
    try:
        yield
    finally:
        handle.close()


def _finished_run(cell: Cell) -> tuple[dict | None, bool]:
    """The summary of the run the cell's folder holds if it trained all the cell's epochs (else
    None), and whether its saved report-only settings differ from the cell's.  Raises ValueError
    when the folder holds a run of another configuration."""
    import yaml

    out = Path(cell.config.out_dir)
    summary_path, config_path = out / "summary.json", out / "config.yaml"
    saved = yaml.safe_load(config_path.read_text()) if config_path.exists() else None
    differences = [] if saved is None else _config_differences(saved, cell.config)
    if differences:
        raise ValueError(f"{out}: holds a run with a different configuration ({'; '.join(differences)}); "
                         f"remove it or choose another --out-dir")
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    if summary is not None and summary.get("epochs") != cell.config.epochs:
        summary = None
    return summary, saved is not None and bool(_reported_otherwise(saved, cell.config))


def finished_summary(cell: Cell) -> dict | None:
    """The summary of the cell's finished run, or None when its folder holds no finished run (or
    one to be reported with another report-only setting).  Raises ValueError when the folder
    holds a run of another configuration."""
    summary, reported_otherwise = _finished_run(cell)
    return None if reported_otherwise else summary


def reportable_again(cell: Cell) -> bool:
    """Whether the cell's folder holds a finished run, with its checkpoint, that differs from the
    cell only in settings that change its report (config.REPORT_ONLY_FIELDS): rebuilding it from
    the checkpoint reports it with the cell's settings and trains nothing.  Raises ValueError
    when the folder holds a run of another configuration."""
    from mixnn_fast.train.trainer import CHECKPOINT

    summary, reported_otherwise = _finished_run(cell)
    return summary is not None and reported_otherwise and (Path(cell.config.out_dir) / CHECKPOINT).exists()


def _run_cell_locked(cell: Cell, out: Path, log) -> dict:
    from mixnn_fast.app.report import write_run_report
    from mixnn_fast.train.trainer import CHECKPOINT, PREVIOUS, Trainer

    summary = finished_summary(cell)
    if summary is not None:
        log(f"[table] {cell.noise} {cell.label} seed {cell.seed}: done earlier ({out})")
        return summary
    resume = (out / CHECKPOINT).exists() or (out / PREVIOUS).exists()
    log(f"[table] {cell.noise} {cell.label} seed {cell.seed}: {'resuming' if resume else 'training'} -> {out}")
    start = time.perf_counter()
    # without a checkpoint, whatever an earlier attempt left (its config was checked above) is replaced
    trainer = Trainer(cell.config, resume=resume, overwrite=not resume)
    if trainer.data.note:
        log(f"[table] NOTE: {trainer.data.note}")
    summary = trainer.fit(keep_lock=True)
    # the epochs' own wall time (every attempt's, across resumes); this process's time only for
    # runs whose earlier epochs were written before rows carried it
    summary.setdefault("wall_seconds", time.perf_counter() - start)
    summary = write_run_report(trainer.out_dir, trainer.label_record(), summary)
    trainer.release_run_folder()  # only now: the report belongs to the run
    log(f"[table] {cell.noise} {cell.label} seed {cell.seed}: final {100 * summary['final_test_accuracy']:.2f}%, "
        f"best {100 * summary['best_test_accuracy']:.2f}% ({summary['wall_seconds'] / 60:.1f} min)")
    return summary


def _known(values: list[float | None]) -> list[float]:
    return [v for v in values if v is not None and not math.isnan(v)]


def _pct(values: list[float | None]) -> str:
    values = _known(values)
    if not values:
        return "–"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def _auroc(values: list[float | None]) -> str:
    values = _known(values)
    return f"{statistics.mean(values):.3f}" if values else "–"


def _minutes(seconds: list[float | None]) -> str:
    # runs whose metrics rows predate epoch_seconds, trained by `mixnn train` (the commands the
    # table prints), have no wall_seconds: their minutes are unknown ("–"), not NaN
    seconds = _known(seconds)
    return f"{statistics.mean(seconds) / 60:.1f}" if seconds else "–"


def format_table(cells: list[Cell], summaries: list[dict], missing: Sequence[Cell] = ()) -> str:
    """Markdown: one row per (noise, method), seeds averaged (mean ± sample std when several),
    the ``missing`` runs named, then the command of every run."""
    groups: dict[tuple[str, str], list[tuple[Cell, dict]]] = {}
    for cell, summary in zip(cells, summaries):
        groups.setdefault((cell.noise, cell.label), []).append((cell, summary))
    lines = ["| noise | method | final test acc % | best test acc % | best − final | label acc after correction % "
             "| clean AUROC, given labels | clean AUROC, current labels | label-audit F1 | seeds | minutes per run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (noise, label), runs in groups.items():
        finals = [s["final_test_accuracy"] for _, s in runs]
        bests = [s["best_test_accuracy"] for _, s in runs]
        drops = [b - f for b, f in zip(bests, finals)]
        lines.append(
            f"| {noise} | {label} | {_pct(finals)} | {_pct(bests)} | {_pct(drops)} | "
            f"{_pct([s.get('label_accuracy_after_correction') for _, s in runs])} | "
            f"{_auroc([s.get('final_clean_auroc') for _, s in runs])} | "
            f"{_auroc([s.get('clean_auroc_current_labels') for _, s in runs])} | "
            f"{_auroc([s.get('label_audit', {}).get('f1') for _, s in runs])} | "
            f"{', '.join(str(c.seed) for c, _ in runs)} | "
            f"{_minutes([s.get('wall_seconds') for _, s in runs])} |")
    if missing:
        lines += ["", f"Not finished, so not in the table ({len(missing)} of {len(cells) + len(missing)} runs): "
                  + ", ".join(Path(c.config.out_dir).name for c in missing) + "."]
    lines += ["", "Commands (one per run):", "", "```bash"]
    lines += [train_command(cell.config) for cell in cells]
    lines += ["```"]
    return "\n".join(lines)


def plot_table(cells: list[Cell], out_dir: str | Path) -> list[Path]:
    """One PNG per noise setting: test accuracy per epoch of every method (first seed)."""
    from mixnn_fast.train.metrics import read_metrics
    from mixnn_fast.app.report import accuracy_curve, plot_accuracy

    paths = []
    by_noise: dict[str, dict[str, list]] = {}
    for cell in cells:
        curves = by_noise.setdefault(cell.noise, {})
        if cell.label not in curves:
            curves[cell.label] = accuracy_curve(read_metrics(cell.config.out_dir))
    for noise, curves in by_noise.items():
        cfg = next(c.config for c in cells if c.noise == noise)
        paths.append(plot_accuracy(curves, Path(out_dir) / f"accuracy_{noise}.png",
                                   title=f"Fashion-MNIST {noise}, {cfg.train_subset} images, {cfg.epochs} epochs"))
    return paths


def run_table(cells: list[Cell], out_dir: str | Path, *, log=print, train: bool = True) -> str:
    """Run every cell (skipping finished ones), then write results.md/.json and the plots.  With
    ``train=False`` nothing is trained: the table holds the finished runs (a finished run saved
    with another report-only setting is reported again from its checkpoint, which trains no
    epoch), and lists the others (e.g. while shards still run, or after they ran on other machines)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done, missing = [], []
    for i, cell in enumerate(cells):
        if train:
            log(f"[table] run {i + 1} of {len(cells)}")
            summary = run_cell(cell, log=log)
        else:
            summary = finished_summary(cell)  # raises first on a run of another configuration
            if summary is None and reportable_again(cell):
                log(f"[table] {cell.noise} {cell.label} seed {cell.seed}: finished; reporting it with today's "
                    "report-only settings (no epoch is trained)")
                summary = run_cell(cell, log=log)
        if summary is None:
            missing.append(cell)
        else:
            done.append((cell, summary))
    cells, summaries = [c for c, _ in done], [s for _, s in done]
    table = format_table(cells, summaries, missing=missing)
    (out_dir / "results.md").write_text(table + "\n")
    (out_dir / "results.json").write_text(json.dumps(
        [{"noise": c.noise, "method": c.label, "seed": c.seed, "command": train_command(c.config), **s}
         for c, s in zip(cells, summaries)], indent=2, default=str))
    plot_table(cells, out_dir)
    return table
