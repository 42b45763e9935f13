"""MixNN+'s correction gates between refreshes (train/correction_gates.py): what one refresh
leaves in the run's state is what the next refresh's plan reads, checked against the rules
written out sample by sample in plain Python on random pools."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mixnn_fast.train.config import TrainConfig
from mixnn_fast.train.correction_gates import plan_correction, record_refresh
from mixnn_fast.train.distributed import Distributed
from mixnn_fast.train.state import RunState


def _refresh(ids, clean_prob, predicted, agreement, spread, held_back=0):
    """The parts of a refresh's result and scores that the gates read."""
    ids = torch.as_tensor(ids, dtype=torch.int64)
    result = SimpleNamespace(ids=ids, clean_prob=torch.as_tensor(clean_prob, dtype=torch.float64),
                             stats={"given_label_agreement": agreement, "disagreement_spread": spread},
                             given_label_supported=None)
    scores = SimpleNamespace(ids=ids, predicted=torch.as_tensor(predicted, dtype=torch.int64),
                             current_labels=torch.zeros(len(ids), dtype=torch.int64), held_back=held_back)
    return result, scores


def test_before_any_refresh_nothing_is_corrected():
    cfg = TrainConfig(method="mixnn_plus")
    plan = plan_correction(cfg, RunState(), torch.arange(7), 7)
    assert plan.only is not None and not plan.only.any()
    assert plan.min_confidence == 0.0  # the gate needs a refresh's agreement first
    assert plan.row == {"stability_gate_applied": 0.0}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("agreement, spread", [(0.7, 0.6), (0.7, 0.2), (0.3, 0.6)])
def test_two_refreshes_then_a_plan_follow_the_rules_sample_by_sample(seed, agreement, spread):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(11, 40))  # odd sizes too
    cfg = TrainConfig(method="mixnn_plus")
    run, dist = RunState(), Distributed()
    pools, predictions, clean = [], [], []
    for _ in range(2):
        pool = np.sort(rng.choice(n, size=int(rng.integers(n // 2, n + 1)), replace=False))
        predicted = rng.integers(0, 3, size=len(pool))
        prob = rng.random(len(pool))
        held = int(rng.integers(0, len(pool)))
        result, scores = _refresh(pool, prob, predicted, agreement, spread, held_back=held)
        plan = plan_correction(cfg, run, torch.as_tensor(pool), n)
        row = record_refresh(cfg, run, plan, result, scores, dist, n, epoch=12)
        if plan.min_confidence:
            assert row["held_back_by_confidence"] == held / len(pool)
        pools.append(pool), predictions.append(dict(zip(pool.tolist(), predicted.tolist())))
        clean.append(dict(zip(pool.tolist(), prob.tolist())))

    # the rules, one sample at a time: the last clean probability each sample got; how many
    # refreshes in a row (ending at its last one) predicted the same class
    last_clean, streak = {}, {}
    for refresh_no in range(2):
        last_clean.update(clean[refresh_no])
        for i, p in predictions[refresh_no].items():
            before = predictions[refresh_no - 1].get(i) if refresh_no else None
            streak[i] = streak.get(i, 0) + 1 if before == p and i in streak else 1
    gate = agreement >= 0.5
    plan = plan_correction(cfg, run, torch.arange(n), n)
    for i in range(n):
        expected = i in last_clean and math.isfinite(last_clean[i]) and last_clean[i] < 0.5
        if gate:
            expected = expected and streak.get(i, 0) >= cfg.plus_consistent
        assert bool(plan.only[i]) == expected, i
        assert math.isnan(run.clean_prob[i]) == (i not in last_clean)
    assert plan.min_confidence == (0.0 if not gate else 0.8 if spread >= 0.35 else 0.5)
    assert plan.row["stability_gate_applied"] == float(gate)
    stable_share = np.mean([streak[i] >= cfg.plus_consistent for i in pools[1].tolist()])
    assert row["predictions_stable"] == pytest.approx(stable_share, abs=1e-7)


def test_the_freeze_counter_is_kept_and_logged():
    cfg = TrainConfig(method="mixnn_plus", plus_freeze=2, plus_consistent=0)
    run = RunState()
    result, scores = _refresh([0, 2], [0.1, 0.2], [0, 1], 0.6, 0.5)
    plan = plan_correction(cfg, run, torch.tensor([0, 2]), 4)
    row = record_refresh(cfg, run, plan, result, scores, Distributed(), 4, epoch=12)
    assert run.agreement is not None and run.agreement.dtype == torch.int16
    assert "targets_frozen" in row and "predictions_stable" not in row
    assert 0.0 <= row["targets_frozen"] <= 1.0


def test_no_share_held_back_is_logged_where_targets_do_not_move():
    """Before ``correction_start`` no target moves, so nothing was held back by the confidence
    condition, whatever the pass counted."""
    cfg = TrainConfig(method="mixnn_plus", plus_consistent_min_agreement=0.0)
    run = RunState()
    for updates in (False, True):
        result, scores = _refresh([0, 1, 2], [0.1, 0.2, 0.9], [0, 1, 1], 0.6, 0.5, held_back=2)
        plan = plan_correction(cfg, run, torch.tensor([0, 1, 2]), 3, updates=updates)
        row = record_refresh(cfg, run, plan, result, scores, Distributed(), 3, epoch=12)
        assert plan.min_confidence > 0
        assert ("held_back_by_confidence" in row) == updates
        assert ("correction_min_confidence" in row) == updates
    assert row["held_back_by_confidence"] == 2 / 3
