"""The embedded demo (the README's first command): CE, MixNN and MixNN+ on the real
Fashion-MNIST with 40% symmetric label noise (uniform over all classes, the paper's
convention), side by side, on a budget that fits a 2-core machine in about five minutes.

The three runs train at once, one process each, with the machine's cores shared among them: each
run spends much of an epoch in work that does not spread over two threads (small batches through
a small CNN, the refresh's GMM and search), so three single-thread runs side by side finish
sooner than the same runs one after the other on both cores.

The budget is the results table's sym-40 cell (mixnn_fast.app.experiments: 2,000 training
images, no augmentation, the small CNN, where plain CE visibly memorises the noisy labels) cut
from 60 epochs to 40.  The work is the convolutions (the three runs at 60 epochs are 32.8 TFLOP,
docs/mixnn_plus.md), which a 2-core AMD EPYC runs in 6.7 to 7.5 minutes; 40 epochs is what fits
in five.  CE still peaks near epoch 28 and falls by the end.  The paper's 300-epoch schedule
(warm-up 10, label correction from 60, warm restarts every 10) is scaled by ``epochs / 300`` as
the table scales it, but rounded up (``scaled_schedule(..., round_up=True)``); the EMA momentum α = 0.9 per epoch is
kept.

The demo tests the model at every second warm restart (every 4th epoch), the table at every
restart: the 10,000 test images cost as much as a third of a run tested every 2nd epoch.
Testing does not change training; only the best test accuracy is taken over fewer epochs.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import queue
import time
from pathlib import Path

from mixnn_fast.app.experiments import Cell, finished_summary, mid_cycle_note, run_cell, scaled_schedule, table_cells
from mixnn_fast.train.metrics import read_metrics
from mixnn_fast.app.report import accuracy_curve, plot_accuracy, write_comparison_report

DEMO_EPOCHS = 40
DEMO_SUBSET = 2000
QUICK_EPOCHS = 6
QUICK_SUBSET = 1000
DEMO_METHODS = ("ce", "mixnn", "mixnn_plus")
STATUS_EVERY_SECONDS = 30.0


class RunProcessEnded(RuntimeError):
    """A side-by-side run's process ended without a result (killed, out of memory)."""


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, e.g. a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def demo_cells(*, epochs: int, subset: int, out_dir: str, seed: int = 0, progress: bool = True) -> dict[str, Cell]:
    """CE, MixNN and MixNN+: the results table's sym-40 cells at this budget, the schedule rounded up,
    each written to ``out_dir/<method>`` and tested at every second warm restart instead of every one."""
    schedule = scaled_schedule(epochs, round_up=True)
    cells = table_cells(out_dir=out_dir, subset=subset, epochs=epochs, seeds=(seed,), methods=DEMO_METHODS,
                        eval_every=2 * schedule["restart_period"],
                        noises=(("symmetric_uniform", 0.4, "sym-40"),), plan_pair=False, ablations=False,
                        progress=progress, **schedule)
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
    cfg = next(iter(cells.values())).config
    print(f"[demo] {', '.join(cells)}: {subset} Fashion-MNIST training images, 40% symmetric noise, {epochs} epochs, "
          f"no augmentation (warm-up {cfg.warmup_epochs}, label correction from epoch {cfg.correction_start}, "
          f"warm restarts every {cfg.restart_period})", flush=True)
    note = mid_cycle_note(epochs, round_up=True)
    if note:
        print(f"[demo] note: {note}", flush=True)
    # a finished run is reported again, not retrained; an interrupted one resumes
    results = {method: finished_summary(cell) for method, cell in cells.items()}
    for method in (m for m, summary in results.items() if summary is not None):
        _log(f"[table] {method}: done earlier ({cells[method].config.out_dir})")
    to_train = {method: cell for method, cell in cells.items() if results[method] is None}
    results.update(train_side_by_side(to_train, progress=progress))
    curves = {method: accuracy_curve(read_metrics(cell.config.out_dir)) for method, cell in cells.items()}
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


def _log(message: str) -> None:
    print(message.replace("[table]", "[demo]"), flush=True)


def _train_in_process(method: str, cell: Cell, results) -> None:
    """One demo run, in a process of its own: puts (method, summary, None) or (method, None,
    the exception) on ``results``."""
    try:
        results.put((method, run_cell(cell, log=_log), None))
    except KeyboardInterrupt:  # Ctrl-C reaches every process of the terminal: the parent reports it
        pass
    except Exception as exc:  # noqa: BLE001 - handed to the parent, which raises it
        results.put((method, None, exc))


def train_side_by_side(cells: dict[str, Cell], *, progress: bool = True, cores: int | None = None) -> dict[str, dict]:
    """Train ``cells`` (method -> cell) at once, one process each, ``cores`` (default: the usable
    ones) shared among them (each gets ``max(1, cores // len(cells))`` threads; a setting already
    in a cell's config is kept).  Returns method -> summary, in the order of ``cells``.  With one
    cell, or one core, the runs train here, one after another.  ``progress``: a status line every
    30 s (each run's epoch and latest test accuracy).

    A run's error is raised here once the others have finished; an interrupt (Ctrl-C) stops every
    run, each keeping its last checkpoint, so the same call resumes them."""
    cores = cores or usable_cores()
    if len(cells) <= 1 or cores == 1:
        return {method: run_cell(cell, log=_log) for method, cell in cells.items()}
    threads = max(1, cores // len(cells))
    cells = {method: _side_by_side(cell, threads) for method, cell in cells.items()}
    _log(f"[demo] training {len(cells)} runs side by side on {cores} cores, {threads} thread(s) each")
    start = time.perf_counter()
    # spawn, not fork: a forked copy of a process that has started torch's thread pools can hang
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = {method: context.Process(target=_train_in_process, args=(method, cell, results), name=f"demo {method}")
                 for method, cell in cells.items()}
    summaries: dict[str, dict] = {}
    errors: dict[str, BaseException] = {}
    try:
        for process in processes.values():
            process.start()
        while len(summaries) + len(errors) < len(cells):
            try:
                method, summary, error = results.get(timeout=STATUS_EVERY_SECONDS)
            except queue.Empty:
                ended = [m for m, p in processes.items() if m not in summaries and m not in errors and not p.is_alive()]
                try:  # a result sent just before its process ended may still be on its way
                    method, summary, error = results.get(timeout=5.0) if ended else results.get_nowait()
                except queue.Empty:
                    for method in ended:  # ended without a word (killed, out of memory): its checkpoint is kept
                        errors[method] = RunProcessEnded(f"the {method} run's process ended with code "
                                                         f"{processes[method].exitcode} before finishing; run the "
                                                         f"demo again to resume it from its last checkpoint")
                    if progress:
                        _log(status_line(cells, time.perf_counter() - start))
                    continue
            if error is None:
                summaries[method] = summary
            else:
                errors[method] = error
    finally:
        for process in processes.values():
            if process.is_alive():
                process.terminate()  # an interrupt or an error here: the runs resume from their checkpoints
            process.join()
    if errors:
        raise next(iter(errors.values()))
    return {method: summaries[method] for method in cells}


def _side_by_side(cell: Cell, threads: int) -> Cell:
    """The cell with ``threads`` threads (unless it sets its own) and without the trainer's
    progress bars, which would interleave: the status line replaces them."""
    config = dataclasses.replace(cell.config, num_threads=cell.config.num_threads or threads, progress=False)
    return dataclasses.replace(cell, config=config)


def status_line(cells: dict[str, Cell], seconds: float) -> str:
    """``[demo] 2.5 min: ce epoch 24/60 (test 71.2%) · mixnn epoch 20/60 ...``, read from each
    run's metrics file (a line being written is skipped)."""
    parts = []
    for method, cell in cells.items():
        rows = read_metrics(cell.config.out_dir, while_writing=True)
        tested = [r["test_accuracy"] for r in rows if r.get("test_accuracy") is not None]
        epoch = rows[-1]["epoch"] + 1 if rows else 0
        parts.append(f"{method} epoch {epoch}/{cell.config.epochs}"
                     + (f" (test {100 * tested[-1]:.1f}%)" if tested else ""))
    return f"[demo] {seconds / 60:.1f} min: " + " · ".join(parts)
