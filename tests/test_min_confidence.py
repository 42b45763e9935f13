"""MixNN+'s confidence condition (``--plus-min-confidence``): where the stability gate applies, a
target the GMM calls noisy is corrected only if the model gives its prediction at least that
probability.  Checked against a float64 reference of the EMA step on fresh random inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from mixnn_fast.refresh.pool_scores import PoolScores
from mixnn_fast.refresh.targets import soft_targets
from mixnn_fast.train.config import TrainConfig
from mixnn_fast.train.methods import correction_min_confidence
from pool_streaming import stream


@pytest.mark.parametrize("n,c,batch,storage", [(1, 3, 1, "float32"), (37, 5, 7, "float32"), (131, 10, 64, "float32"),
                                               (90, 7, 13, "topk")])
def test_only_marked_samples_with_a_confident_prediction_move(rng, n, c, batch, storage):
    """t <- t + (1 - m)(p - t) for the samples marked noisy whose largest probability reaches the
    threshold; every other target stays as it was (float64 reference)."""
    momentum = 0.9
    threshold = float(rng.uniform(0.3, 0.7))
    given_labels = torch.from_numpy(rng.integers(0, c, n))
    # logits of every scale, so that the largest probability falls on both sides of the threshold
    logits = torch.from_numpy(rng.normal(size=(n, c)) * rng.uniform(0.1, 6.0, size=(n, 1)))
    marked = torch.from_numpy(rng.uniform(size=n) < 0.6)
    targets = soft_targets(given_labels, c, start_epoch=0, momentum=momentum, storage=storage,
                           top_k=c if storage == "topk" else None)
    everyone = torch.arange(n)
    p = torch.softmax(logits, dim=1)
    confident = p.max(1).values >= threshold
    moves = marked & confident
    if n > 1:
        assert (marked & ~confident).any() or (marked & confident).all()  # the case that the condition holds back
    tolerance = 1e-6 if storage == "float32" else 2.0 ** -10
    for _ in range(2):  # the second step starts from soft targets
        before = targets.rows(everyone).double()
        scores = stream(everyone, targets, given_labels, logits=logits.float(), batch=batch, features_dtype=None,
                        correct_only=marked, min_confidence=threshold)
        assert scores.held_back == int((marked & ~confident).sum())
        expected = torch.where(moves.unsqueeze(1), before + (1 - momentum) * (p - before), before)
        after = targets.rows(everyone).double()
        assert torch.allclose(after, expected, rtol=0, atol=tolerance), float((after - expected).abs().max())
        assert torch.allclose(scores.confidence.double(), p.max(1).values, rtol=0, atol=1e-6)


def test_without_a_threshold_every_marked_sample_moves_and_a_graded_share_ignores_it(rng):
    """0 is off (the mask alone decides); the graded correction's float share is not gated."""
    n, c = 29, 4
    given_labels = torch.from_numpy(rng.integers(0, c, n))
    logits = torch.from_numpy(rng.normal(size=(n, c)) * 0.1).float()  # every prediction unsure
    marked = torch.ones(n, dtype=torch.bool)
    for share, threshold, moved in ((marked, 0.0, n), (marked, 0.9, 0), (torch.full((n,), 0.5), 0.9, n)):
        targets = soft_targets(given_labels, c, start_epoch=0, momentum=0.9, storage="float32")
        before = targets.rows(torch.arange(n)).clone()
        stream(torch.arange(n), targets, given_labels, logits=logits, batch=5, features_dtype=None,
               correct_only=share, min_confidence=threshold)
        assert int((targets.rows(torch.arange(n)) != before).any(1).sum()) == moved


def test_the_threshold_acts_only_where_the_stability_gate_applies():
    cfg = TrainConfig(method="mixnn_plus", plus_min_confidence=0.6, plus_consistent=2,
                      plus_consistent_min_agreement=0.5)
    assert correction_min_confidence(cfg, 0.5) == 0.6 and correction_min_confidence(cfg, 0.9) == 0.6
    assert correction_min_confidence(cfg, 0.4999) == 0.0  # high noise: the gate does not hold
    assert correction_min_confidence(cfg, None) == 0.0  # no refresh recorded yet
    always = TrainConfig(method="mixnn_plus", plus_min_confidence=0.6, plus_consistent=2,
                         plus_consistent_min_agreement=0.0)
    assert correction_min_confidence(always, None) == 0.6 and correction_min_confidence(always, 0.1) == 0.6
    assert correction_min_confidence(TrainConfig(method="mixnn_plus", plus_min_confidence=0.0), 0.9) == 0.0  # 0: off
    assert correction_min_confidence(TrainConfig(method="mixnn_plus", plus_consistent=0), 0.9) == 0.0  # no gate


@given(value=st.one_of(st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not 0 <= v <= 1),
                       st.floats(0.01, 1.0)),
       method=st.sampled_from(["mixnn_plus", "mixnn", "gce"]), consistent=st.sampled_from([0, 2]),
       correction=st.sampled_from(["selective", "graded", "all"]))
def test_config_accepts_a_threshold_only_where_it_can_act(value, method, consistent, correction):
    """A value outside [0, 1] (NaN, infinities) or a threshold without MixNN+'s selective
    correction and stability gate is a ValueError naming the setting, never a silent no-op; the
    default is accepted anywhere (it acts only where it can, and saved runs read 0)."""
    options = dict(method=method, plus_min_confidence=value, plus_consistent=consistent, plus_correction=correction)
    acts = math.isfinite(value) and 0 <= value <= 1 and method == "mixnn_plus" and consistent > 0 \
        and correction == "selective"
    if acts or value == TrainConfig().plus_min_confidence:
        assert TrainConfig(**options).plus_min_confidence == value
    else:
        with pytest.raises(ValueError, match="plus_min_confidence|plus_consistent"):
            TrainConfig(**options)


def _train_recording_thresholds(tmp_path, monkeypatch, **settings):
    """Real MixNN+ training on 300 digits at 40% symmetric noise (tiny model, the stability gate
    after one stable refresh, threshold 0.35) with ``settings`` on top; returns the trainer and
    the ``min_confidence`` each refresh's PoolScores was handed, in order."""
    import mixnn_fast.train.trainer as trainer_module
    from mixnn_fast.train.trainer import Trainer

    handed = []

    class Recording(PoolScores):
        def __init__(self, *args, **kwargs):
            handed.append(kwargs.get("min_confidence"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "PoolScores", Recording)
    cfg = TrainConfig(**{**dict(dataset="digits", train_subset=300, noise="symmetric_uniform", noise_rate=0.4,
                                model="small_cnn", model_widths=[8, 8, 8, 8], method="mixnn_plus", warmup_epochs=1,
                                correction_start=1, restart_period=2, batch_size=64, progress=False,
                                tensorboard=False, out_dir=str(tmp_path / "run"), num_threads=1, seed=3,
                                plus_min_confidence=0.35, plus_consistent=1), **settings})
    trainer = Trainer(cfg)
    trainer.fit()
    return trainer, handed


@pytest.mark.parametrize("min_agreement, acts", [(0.0, True), (1.0, False)])
def test_the_trainer_hands_the_threshold_to_each_refresh_where_the_gate_applies(tmp_path, monkeypatch,
                                                                               min_agreement, acts):
    """Real training on digits: each refresh's PoolScores gets the threshold while the gate
    applies (always, with minimum agreement 0) and 0 when it never does (agreement 1 is not
    reached at 40% noise), and the share it held back is logged where it acts."""
    trainer, handed = _train_recording_thresholds(tmp_path, monkeypatch, epochs=4, plus_symmetric_confidence=0.0,
                                                  plus_consistent_min_agreement=min_agreement)
    refreshes = [h for h in handed if h is not None]
    assert len(refreshes) >= 3
    assert refreshes == [0.35 if acts else 0.0] * len(refreshes)
    # each refresh where it acts logs the share of the pool it held back
    logged = [r["held_back_by_confidence"] for r in trainer.metrics.rows if "held_back_by_confidence" in r]
    assert len(logged) == (len(refreshes) if acts else 0)
    assert all(0 <= share <= 1 for share in logged)


def test_a_symmetric_spread_switches_to_its_own_threshold():
    """``plus_symmetric_confidence``: where the gate applies and the last refresh's disagreement
    spread reached SYMMETRIC_SPREAD, its threshold replaces plus_min_confidence (0 included)."""
    from mixnn_fast.train.methods import SYMMETRIC_SPREAD

    cfg = TrainConfig(method="mixnn_plus", plus_min_confidence=0.5, plus_symmetric_confidence=0.8)
    assert correction_min_confidence(cfg, 0.7, SYMMETRIC_SPREAD) == 0.8
    assert correction_min_confidence(cfg, 0.7, 1.0) == 0.8
    assert correction_min_confidence(cfg, 0.7, math.nextafter(SYMMETRIC_SPREAD, 0)) == 0.5  # class-pair noise
    assert correction_min_confidence(cfg, 0.7, None) == 0.5  # no spread recorded yet
    assert correction_min_confidence(cfg, 0.3, 1.0) == 0.0  # the gate does not hold
    only_symmetric = TrainConfig(method="mixnn_plus", plus_min_confidence=0.0, plus_symmetric_confidence=0.8)
    assert correction_min_confidence(only_symmetric, 0.7, 0.9) == 0.8
    assert correction_min_confidence(only_symmetric, 0.7, 0.1) == 0.0
    default = TrainConfig(method="mixnn_plus")  # both on by default (docs/mixnn_plus.md)
    assert correction_min_confidence(default, 0.7, 1.0) == default.plus_symmetric_confidence == 0.8
    assert correction_min_confidence(default, 0.7, 0.2) == default.plus_min_confidence == 0.5


@given(value=st.one_of(st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not 0 <= v <= 1),
                       st.floats(0.01, 1.0)),
       method=st.sampled_from(["mixnn_plus", "mixnn", "gce"]), consistent=st.sampled_from([0, 2]),
       correction=st.sampled_from(["selective", "graded", "all"]))
def test_config_accepts_a_symmetric_threshold_only_where_it_can_act(value, method, consistent, correction):
    options = dict(method=method, plus_symmetric_confidence=value, plus_consistent=consistent,
                   plus_correction=correction)
    acts = math.isfinite(value) and 0 <= value <= 1 and method == "mixnn_plus" and consistent > 0 \
        and correction == "selective"
    if acts or value == TrainConfig().plus_symmetric_confidence:  # the default: accepted anywhere
        assert TrainConfig(**options).plus_symmetric_confidence == value
    else:
        with pytest.raises(ValueError, match="plus_symmetric_confidence|plus_consistent"):
            TrainConfig(**options)


@pytest.mark.parametrize("spread_from", ["default", 0.0])
def test_the_trainer_hands_the_symmetric_threshold_after_a_spread_refresh(tmp_path, monkeypatch, spread_from):
    """Real training on digits at symmetric noise: the first refresh has no spread yet and gets
    plus_min_confidence; every later one gets the symmetric threshold exactly when the refresh
    before it logged a spread of at least SYMMETRIC_SPREAD (the tiny model's first refreshes
    predict few classes and stay under 0.4, so it is also lowered to 0, where every later refresh
    must get it); a resumed run carries the spread."""
    import mixnn_fast.train.methods as methods_module
    from mixnn_fast.train.trainer import Trainer

    if spread_from != "default":
        monkeypatch.setattr(methods_module, "SYMMETRIC_SPREAD", spread_from)
    SYMMETRIC_SPREAD = methods_module.SYMMETRIC_SPREAD

    trainer, handed = _train_recording_thresholds(tmp_path, monkeypatch, epochs=5, plus_symmetric_confidence=0.45,
                                                  plus_consistent_min_agreement=0.0)
    refreshes = [h for h in handed if h is not None]
    spreads = [r["disagreement_spread"] for r in trainer.metrics.rows if "disagreement_spread" in r]
    assert len(refreshes) == len(spreads) >= 3
    expected = [0.35] + [0.45 if s >= SYMMETRIC_SPREAD else 0.35 for s in spreads[:-1]]
    assert refreshes == expected
    if spread_from != "default":
        assert refreshes[1:] == [0.45] * (len(refreshes) - 1)
    assert trainer.run.disagreement_spread == spreads[-1]
    resumed = Trainer(trainer.cfg, resume=True)
    assert resumed.run.disagreement_spread == spreads[-1]
