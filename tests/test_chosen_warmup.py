"""MixNN+'s warm-up chosen from the GMM's separation (``plus_warmup_max``): it ends at the first
refresh from ``warmup_epochs`` on whose GMM is separated, or at ``plus_warmup_max``; every
probe's separation is logged; the decision survives a resume.  Real training on digits: the
separations are measured, the threshold is moved around them (the rule's constant, Ashman's 2,
is the one thing patched)."""
from __future__ import annotations

import math

import pytest

import mixnn_fast.train.methods as methods
from mixnn_fast.train.config import TrainConfig
from mixnn_fast.train.trainer import Trainer

WARMUP, LATEST = 0, 4


def _config(out, **overrides) -> TrainConfig:
    values = dict(dataset="digits", train_subset=700, noise="symmetric_uniform", noise_rate=0.4, model="small_cnn",
                  model_widths=[8, 16, 16, 16], method="mixnn_plus", epochs=LATEST + 1, warmup_epochs=WARMUP,
                  correction_start=LATEST, plus_warmup_max=LATEST, restart_period=2, batch_size=64, progress=False,
                  tensorboard=False, out_dir=str(out), num_threads=1, seed=4)
    values.update(overrides)
    return TrainConfig(**values)


def _comparable(rows: list[dict]) -> list[dict]:
    """Metrics rows without what depends on the clock."""
    return [{k: v for k, v in row.items() if not (k.endswith("_seconds") or k.endswith("_fraction") and "wait" in k
                                                   or k == "images_per_second")} for row in rows]


def _train(cfg: TrainConfig, threshold: float, monkeypatch) -> list[dict]:
    monkeypatch.setattr(methods, "SEPARATED", threshold)
    trainer = Trainer(cfg)
    trainer.fit()
    return trainer.metrics.rows


@pytest.fixture(scope="module")
def never_separated(tmp_path_factory):
    """A run whose warm-up no separation ends: it probes at every epoch up to the bound."""
    with pytest.MonkeyPatch.context() as patch:
        return _train(_config(tmp_path_factory.mktemp("warmup") / "never"), math.inf, patch)


def test_without_separation_the_warmup_probes_every_epoch_and_ends_at_the_bound(never_separated):
    assert [r["phase"] for r in never_separated] == ["plain"] * LATEST + ["mixnn"]
    separations = [r["gmm_separation"] for r in never_separated[WARMUP:]]
    assert all(math.isfinite(d) and d >= 0 for d in separations)
    assert len(set(separations)) == len(separations)  # measured each epoch, not copied


def test_the_warmup_ends_at_the_first_epoch_whose_gmm_is_separated(tmp_path, never_separated, monkeypatch):
    probes = {r["epoch"]: r["gmm_separation"] for r in never_separated[WARMUP:LATEST]}
    # the threshold: the first probe after the first that beats every earlier one, so the warm-up
    # outlasts warmup_epochs and ends before the bound
    end = next((e for e in sorted(probes)[1:] if probes[e] > max(probes[p] for p in probes if p < e)), None)
    assert end is not None, f"no probe rises above the earlier ones ({probes}): this seed cannot test the rule"
    threshold = probes[end]
    rows = _train(_config(tmp_path / "run"), threshold, monkeypatch)
    assert [r["phase"] for r in rows] == ["plain"] * end + ["mixnn"] * (LATEST + 1 - end)
    # up to its end the run is the never-separated one: same probes, same decisions
    assert _comparable(rows[:end]) == _comparable(never_separated[:end])
    assert rows[end]["gmm_separation"] == probes[end]

    resumed = Trainer(_config(tmp_path / "run", epochs=LATEST + 2), resume=True)
    assert resumed.run.warmup_end == end  # the decision is in the checkpoint
    assert resumed.phase(LATEST + 1) == "mixnn"
    resumed.close()


def test_no_probe_before_warmup_epochs_and_none_after_the_end(tmp_path):
    cfg = _config(tmp_path / "run", warmup_epochs=2)
    assert [methods.probes_warmup(cfg, e, None) for e in range(5)] == [False, False, True, True, True]
    assert [methods.phase_of(cfg, e, None) for e in range(5)] == ["plain"] * 5
    assert not any(methods.probes_warmup(cfg, e, 3) for e in range(6))
    assert [methods.phase_of(cfg, e, 3) for e in range(5)] == ["plain"] * 3 + ["mixnn"] * 2
    fixed = _config(tmp_path / "run", warmup_epochs=2, plus_warmup_max=0)
    assert not any(methods.probes_warmup(fixed, e, None) for e in range(5))


def test_a_separated_first_probe_is_the_fixed_warmup(tmp_path, monkeypatch):
    """Threshold 0: the first probe ends the warm-up at warmup_epochs, and the run is the one
    with a fixed warm-up, refresh for refresh."""
    chosen = _train(_config(tmp_path / "chosen"), 0.0, monkeypatch)
    fixed = _train(_config(tmp_path / "fixed", plus_warmup_max=0), 0.0, monkeypatch)
    assert [r["phase"] for r in chosen] == ["plain"] * WARMUP + ["mixnn"] * (LATEST + 1 - WARMUP)
    assert _comparable(chosen) == _comparable(fixed)


def test_a_run_resumed_inside_the_chosen_warmup_keeps_probing(tmp_path, never_separated, monkeypatch):
    cfg = _config(tmp_path / "run", epochs=2)
    _train(cfg, math.inf, monkeypatch)
    trainer = Trainer(_config(tmp_path / "run"), resume=True)
    assert trainer.run.warmup_end is None
    trainer.fit()
    assert _comparable(trainer.metrics.rows) == _comparable(never_separated)
