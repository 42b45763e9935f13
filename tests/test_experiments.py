"""The results-table runner: every cell's printed command trains exactly that cell's config, a
finished table is not trained again, and the table holds every cell."""
from __future__ import annotations

import shlex
from pathlib import Path
from fractions import Fraction
from math import ceil

import pytest

from mixnn_fast.app.cli import _config_from_args, build_parser
from mixnn_fast.app import experiments
from mixnn_fast.app.experiments import run_table, scaled_schedule, table_cells, train_command


def _cells(tmp_path, **overrides):
    options = dict(out_dir=tmp_path / "table", subset=300, epochs=2, widths=(8, 8, 16, 16), seeds=(0,),
                   methods=("ce", "mixnn"), noises=(("symmetric_uniform", 0.4, "sym-40"),),
                   dataset="digits", num_threads=2, batch_size=64, ablations=False)
    options.update(overrides)
    return table_cells(**options)


def test_the_grid_has_every_method_noise_and_the_plan_pair(tmp_path):
    cells = table_cells(out_dir=tmp_path, seeds=(0, 1))
    assert len(cells) == 2 * (6 * 5 + 3 + 2 * 8)  # 6 methods x 5 noises, MixNN's 3 extra rows, MixNN+'s ablations
    labels = {(c.noise, c.label) for c in cells}
    assert ("sym-40", "mixnn (naive plan)") in labels and ("asym-40", "gce") in labels
    assert len({c.config.out_dir for c in cells}) == len(cells)  # no two runs share a folder
    assert ("sym-60", "mixnn (GMM on soft-target losses)") in labels
    assert ("sym-80", "mixnn (losses averaged over 5 refreshes)") in labels
    for noise in ("sym-60", "sym-80"):
        full = next(c for c in cells if c.noise == noise and c.label == "mixnn_plus" and c.seed == 1)
        for label, changes in (("correction of every sample", {"plus_correction"}),
                               ("no label correction", {"plus_correction"}), ("GCE instead of CE", {"plus_loss"}),
                               ("no stability gate", {"plus_consistent"}),
                               ("no weight averaging", {"plus_average_last"}),
                               ("BatchNorm statistics averaged", {"plus_average_bn"}),
                               ("no trusted anchors", {"plus_symmetric_trust"}),
                               ("no class-balance penalty", {"plus_prior"})):
            ablated = next(c for c in cells if c.noise == noise and c.label == f"mixnn_plus ({label})" and c.seed == 1)
            differences = {k for k, v in ablated.config.to_dict().items() if full.config.to_dict()[k] != v}
            assert differences == changes | {"out_dir"}  # each ablation switches one change off
    naive = next(c for c in cells if c.variant == "naive plan")
    coherent = next(c for c in cells if c.noise == "sym-40" and c.label == "mixnn" and c.seed == naive.seed)
    differences = {k for k, v in naive.config.to_dict().items() if coherent.config.to_dict()[k] != v}
    assert differences == {"plan", "out_dir"}  # the pair differs in the plan only


@pytest.mark.parametrize("epochs", [1, 30, 100, 300])
def test_scaled_schedule_keeps_the_papers_proportions(epochs):
    s = scaled_schedule(epochs)
    if epochs == 300:
        assert s == {"warmup_epochs": 10, "correction_start": 60, "restart_period": 10}
    assert 1 <= s["warmup_epochs"] < s["correction_start"] or epochs < 30


def test_each_command_reproduces_its_config(tmp_path):
    for cell in table_cells(out_dir=tmp_path, seeds=(3,)):
        argv = shlex.split(train_command(cell.config))[1:]
        args = build_parser().parse_args(argv)
        parsed = _config_from_args(args)
        mine = cell.config.to_dict()
        theirs = parsed.to_dict()
        for key in ("progress", "tensorboard"):  # reporting only
            mine.pop(key), theirs.pop(key)
        assert theirs == mine, train_command(cell.config)


def test_run_table_trains_once_then_reuses_the_runs(tmp_path, monkeypatch):
    cells = _cells(tmp_path)
    table = run_table(cells, tmp_path / "table", log=lambda *_: None)
    assert "| sym-40 | ce |" in table and "| sym-40 | mixnn (naive plan) |" in table
    assert (tmp_path / "table" / "accuracy_sym-40.png").stat().st_size > 0
    assert table.count(".venv/bin/mixnn train") == len(cells)

    class NoTraining:
        def __init__(self, *args, **kwargs):
            raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr("mixnn_fast.train.trainer.Trainer", NoTraining)
    assert run_table(cells, tmp_path / "table", log=lambda *_: None) == table


def test_a_folder_with_another_config_is_refused(tmp_path):
    cells = _cells(tmp_path, methods=("ce",), plan_pair=False)
    run_table(cells, tmp_path / "table", log=lambda *_: None)
    other = _cells(tmp_path, methods=("ce",), plan_pair=False, lr=0.05)
    with pytest.raises(ValueError, match=r"different configuration \(lr: saved 0\.\d+, this cell 0\.05\)"):
        experiments.run_cell(other[0], log=lambda *_: None)


def test_a_run_saved_before_a_setting_existed_counts_with_its_old_value(tmp_path):
    """A finished run whose config.yaml predates ``plus_freeze`` ran without a freeze: it is the
    cell with ``plus_freeze=0`` (reused, not retrained) and not a cell with a freeze."""
    import yaml

    from mixnn_fast.train.config import ADDED_AFTER_SAVED_RUNS

    cells = _cells(tmp_path, methods=("ce",), plan_pair=False)
    run_table(cells, tmp_path / "table", log=lambda *_: None)
    config = tmp_path / "table" / "sym-40_ce_s0" / "config.yaml"
    saved = yaml.safe_load(config.read_text())
    for name in ADDED_AFTER_SAVED_RUNS:
        del saved[name]
    config.write_text(yaml.safe_dump(saved))
    assert experiments.finished_summary(cells[0]) is not None
    frozen = _cells(tmp_path, methods=("ce",), plan_pair=False)
    frozen[0].config.plus_freeze = 3
    with pytest.raises(ValueError, match="different configuration"):
        experiments.finished_summary(frozen[0])


@pytest.mark.parametrize("shard", ["0/2", "3/2", "a/b", "1"])
def test_a_bad_shard_is_refused(shard, capsys):
    from mixnn_fast.app.cli import main

    assert main(["table", "--shard", shard, "--out-dir", "/nonexistent/never-written"]) == 2
    assert "--shard" in capsys.readouterr().err


def test_a_run_being_trained_elsewhere_is_not_touched(tmp_path):
    """A second process (here: a held lock) must not resume the same folder concurrently."""
    import fcntl

    cell = _cells(tmp_path, methods=("ce",), plan_pair=False)[0]
    out = tmp_path / "table" / "sym-40_ce_s0"
    out.mkdir(parents=True)
    with (out / ".lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match="another process"):
            experiments.run_cell(cell, log=lambda *_: None)
    assert not (out / "metrics.jsonl").exists()


def test_report_only_tables_the_finished_runs_and_names_the_rest(tmp_path, monkeypatch):
    cells = _cells(tmp_path, plan_pair=False)  # ce and mixnn at sym-40
    finished = run_table(cells[:1], tmp_path / "table", log=lambda *_: None)

    class NoTraining:
        def __init__(self, *args, **kwargs):
            raise AssertionError("--report-only trained a run")

    monkeypatch.setattr("mixnn_fast.train.trainer.Trainer", NoTraining)
    table = run_table(cells, tmp_path / "table", log=lambda *_: None, train=False)
    assert "| sym-40 | ce |" in table and "| sym-40 | mixnn |" not in table
    assert table.splitlines()[2] == finished.splitlines()[2]  # the finished run's row, unchanged
    assert "Not finished, so not in the table (1 of 2 runs): sym-40_mixnn_s0." in table
    assert (tmp_path / "table" / "results.md").read_text() == table + "\n"


def test_report_only_through_the_cli_trains_nothing(tmp_path, capsys, monkeypatch):
    from mixnn_fast.app.cli import main

    class NoTraining:
        def __init__(self, *args, **kwargs):
            raise AssertionError("--report-only trained a run")

    monkeypatch.setattr("mixnn_fast.train.trainer.Trainer", NoTraining)
    out = tmp_path / "t"
    assert main(["table", "--out-dir", str(out), "--noise", "sym-40", "--methods", "ce", "gce",
                 "--no-ablations", "--report-only"]) == 0
    printed = capsys.readouterr().out
    assert "Not finished, so not in the table (2 of 2 runs): sym-40_ce_s0, sym-40_gce_s0." in printed
    assert not any(p.is_dir() for p in out.iterdir())  # no run folder was made
    assert main(["table", "--out-dir", str(out), "--shard", "1/2", "--report-only"]) == 2
    assert "--report-only" in capsys.readouterr().err


@pytest.mark.parametrize("epochs, period, below, above", [(45, 2, 44, 46), (105, 4, 102, 108)])
def test_a_table_whose_runs_end_inside_a_warm_restart_says_so(epochs, period, below, above, tmp_path, capsys,
                                                              monkeypatch):
    """The note names the nearest epoch counts whose own schedule ends a cycle: at 105 the period
    is 4 (105/30 rounded), but 104 has a period of 3 and ends mid-cycle too."""
    from mixnn_fast.app.cli import main

    class NoTraining:
        def __init__(self, *args, **kwargs):
            raise AssertionError("--report-only trained a run")

    monkeypatch.setattr("mixnn_fast.train.trainer.Trainer", NoTraining)
    command = ["table", "--out-dir", str(tmp_path / "t"), "--noise", "sym-40", "--methods", "ce", "--no-ablations",
               "--report-only"]
    assert main(command + ["--epochs", str(epochs)]) == 0
    printed = capsys.readouterr().out
    assert (f"[table] note: {epochs} epochs is not a multiple of the warm-restart period ({period})" in printed
            and f"{below} or {above} epochs end a cycle" in printed)
    for count in (below, above):
        assert main(command + ["--epochs", str(count)]) == 0
        assert "note:" not in capsys.readouterr().out


@pytest.mark.parametrize("round_up", [False, True])
def test_the_counts_a_mid_cycle_note_suggests_are_the_nearest_that_end_a_cycle(round_up):
    import re

    from mixnn_fast.app.experiments import mid_cycle_note

    def ends_a_cycle(count):  # the restart period by the paper's 10 of 300 epochs, rounded as the schedule says
        exact = Fraction(10 * count, 300)
        period = max(1, ceil(exact) if round_up else round(exact))
        return count % period == 0

    for epochs in range(1, 400):
        note = mid_cycle_note(epochs, round_up=round_up)
        assert (note is None) == ends_a_cycle(epochs), epochs
        if note is not None:
            below, above = map(int, re.search(r"; (\d+) or (\d+) epochs end a cycle", note).groups())
            assert ends_a_cycle(below) and ends_a_cycle(above), epochs
            assert not any(ends_a_cycle(n) for n in range(below + 1, above) if n != epochs), epochs


def test_a_mixnn_plus_run_saved_before_the_stability_gate_is_the_ungated_cell(tmp_path):
    """MixNN+ corrects through the stability gate by default; a run saved before the gate existed
    ran without it: it is the cell with ``plus_consistent=0``, not the default cell (nor did it
    average its weights, trust its anchors, add the class-balance penalty or correct its reported
    labels once more, in either way)."""
    import dataclasses

    import yaml

    from mixnn_fast.train.config import ADDED_AFTER_SAVED_RUNS

    ungated = _cells(tmp_path, methods=("mixnn_plus",), plan_pair=False)[0]
    ungated = dataclasses.replace(ungated, config=dataclasses.replace(ungated.config, plus_consistent=0,
                                                                      plus_consistent_min_agreement=0.0,
                                                                      plus_average_last=0.0,
                                                                      plus_symmetric_trust=False, plus_prior=0.0,
                                                                      plus_final_correction="off",
                                                                      plus_final_correction_symmetric=False,
                                                                      plus_final_clean_confidence=0.0))
    run_table([ungated], tmp_path / "table", log=lambda *_: None)
    config = tmp_path / "table" / "sym-40_mixnn_plus_s0" / "config.yaml"
    saved = yaml.safe_load(config.read_text())
    for name in ADDED_AFTER_SAVED_RUNS:
        del saved[name]
    config.write_text(yaml.safe_dump(saved))
    assert experiments.finished_summary(ungated) is not None
    default = _cells(tmp_path, methods=("mixnn_plus",), plan_pair=False)[0]
    assert default.config.plus_consistent == 2
    with pytest.raises(ValueError, match="plus_consistent: saved 0, this cell 2; plus_consistent_min_agreement: "
                                         "saved 0.0, this cell 0.5"):
        experiments.finished_summary(default)


def test_runs_without_a_wall_time_show_unknown_minutes_not_nan(tmp_path):
    """A run whose rows carry no epoch_seconds (trained before they existed) has no wall time:
    the table says its minutes are unknown rather than printing NaN, and averages the runs that
    have one."""
    cells = _cells(tmp_path, plan_pair=False)  # ce and mixnn at sym-40
    summary = dict(final_test_accuracy=0.7, best_test_accuracy=0.75, label_accuracy_after_correction=0.8)
    table = experiments.format_table(cells, [dict(summary, wall_seconds=150.0), dict(summary)])
    rows = {line.split(" | ")[1]: line for line in table.splitlines() if line.startswith("| sym-40 |")}
    assert rows["ce"].endswith("| 2.5 |") and rows["mixnn"].endswith("| – |")
    assert "nan" not in table.lower()


def test_a_finished_run_saved_with_another_report_only_setting_is_reported_again_not_retrained(tmp_path):
    """MixNN+'s last correction (``plus_final_correction``) changes only what a finished run
    reports: a cell saved before it existed (read as "off") is resumed with no epoch to train and
    its report rewritten with today's value."""
    import yaml

    from mixnn_fast.train.metrics import read_metrics

    cells = _cells(tmp_path, methods=("mixnn_plus",), plan_pair=False, epochs=3)
    cell = cells[0]
    run_table(cells, tmp_path / "table", log=lambda *_: None)
    out = Path(cell.config.out_dir)
    config = out / "config.yaml"
    saved = yaml.safe_load(config.read_text())
    assert saved["plus_final_correction"] == "class_pair"  # today's default
    del saved["plus_final_correction"]
    config.write_text(yaml.safe_dump(saved))
    rows = read_metrics(out)
    assert experiments.finished_summary(cell) is None  # to be reported again
    logged = []
    experiments.run_cell(cell, log=logged.append)
    assert "resuming" in logged[0]
    assert read_metrics(out) == rows  # no epoch trained again
    assert yaml.safe_load(config.read_text())["plus_final_correction"] == "class_pair"
    assert experiments.finished_summary(cell) is not None
    # for a method it cannot act on, the saved "off" and today's default are one experiment
    ce = _cells(tmp_path, methods=("ce",), plan_pair=False)
    run_table(ce, tmp_path / "table", log=lambda *_: None)
    ce_config = Path(ce[0].config.out_dir) / "config.yaml"
    ce_saved = yaml.safe_load(ce_config.read_text())
    ce_saved["plus_final_correction"] = "off"
    ce_config.write_text(yaml.safe_dump(ce_saved))
    assert experiments.finished_summary(ce[0]) is not None


def test_report_only_reports_a_finished_run_of_other_report_only_settings_again_and_trains_no_epoch(tmp_path):
    """``mixnn table --report-only`` on a finished MixNN+ run saved before the last corrections
    existed: it is rebuilt from its checkpoint and reported with today's settings (no epoch is
    trained); a run without its checkpoint cannot be, and stays listed as not finished."""
    import shutil

    import yaml

    from mixnn_fast.train.metrics import read_metrics

    cells = _cells(tmp_path, methods=("mixnn_plus",), plan_pair=False, epochs=3)
    run_table(cells, tmp_path / "table", log=lambda *_: None)
    out = Path(cells[0].config.out_dir)
    config = out / "config.yaml"
    saved = yaml.safe_load(config.read_text())
    for name in ("plus_final_correction", "plus_final_correction_symmetric", "plus_final_clean_confidence"):
        del saved[name]  # as written before they existed: read as off
    config.write_text(yaml.safe_dump(saved))
    rows = read_metrics(out)
    kept = tmp_path / "kept"
    shutil.copytree(out, kept)
    assert experiments.finished_summary(cells[0]) is None and experiments.reportable_again(cells[0])
    logged = []
    table = run_table(cells, tmp_path / "table", log=logged.append, train=False)
    assert "| sym-40 | mixnn_plus |" in table and "Not finished" not in table
    assert any("reporting it with today's report-only settings" in line for line in logged)
    assert read_metrics(out) == rows  # no epoch trained
    assert yaml.safe_load(config.read_text())["plus_final_clean_confidence"] == 0.7
    # without its checkpoint the run cannot be rebuilt: listed, not retrained
    shutil.rmtree(out)
    shutil.copytree(kept, out)
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (out / name).unlink(missing_ok=True)
    assert not experiments.reportable_again(cells[0])
    table = run_table(cells, tmp_path / "table", log=lambda *_: None, train=False)
    assert "Not finished, so not in the table (1 of 1 runs): sym-40_mixnn_plus_s0." in table
    assert not (out / "checkpoint.pt").exists() and read_metrics(out) == rows
