"""MixNN+'s last corrections from the final pass (``plus_final_correction``, ``class_pair`` by
default, and ``plus_final_correction_symmetric``, on by default): the samples they relabel against
plain-numpy statements of the rules on random run states, and what a real run reports with them
(the corrected labels change exactly there; nothing trained does)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_symmetric_trust import gates_opening_config  # pytest puts tests/ on sys.path

from mixnn_fast.train.config import TrainConfig
from mixnn_fast.train.correction_gates import final_correction, final_symmetric_correction
from mixnn_fast.train.methods import SYMMETRIC_SPREAD, symmetric_share
from mixnn_fast.train.state import RunState


def _reference(cfg, clean_prob, stable, last_predicted, supported, given_agreement, spread, ids, predicted,
               confidence, n):
    """The rule of docs/mixnn_plus/final_correction.md, written out in numpy."""
    gate = cfg.plus_consistent > 0 and given_agreement >= cfg.plus_consistent_min_agreement
    symmetric = spread >= SYMMETRIC_SPREAD
    noisy = np.zeros(n, dtype=bool)
    noisy[:] = clean_prob < 0.5  # NaN: False
    if gate:
        counts = stable.astype(np.int64).copy()
        counts[ids] = np.where(last_predicted[ids] == predicted, counts[ids] + 1, 1)
        noisy &= counts >= cfg.plus_consistent
    guarded = cfg.plus_neighbour_guard > 0 and gate and symmetric and supported is not None
    if guarded:
        noisy &= ~supported
    if not gate:
        threshold = 0.0
    elif guarded:
        threshold = cfg.plus_min_confidence
    elif cfg.plus_symmetric_confidence and symmetric:
        threshold = cfg.plus_symmetric_confidence
    else:
        threshold = cfg.plus_min_confidence
    threshold = max(threshold, cfg.plus_min_confidence)
    out = np.zeros(n, dtype=bool)
    out[ids] = noisy[ids] & (confidence >= np.float32(threshold))
    if cfg.plus_final_clean_confidence:  # and the labels the GMM called clean, at their own threshold
        with np.errstate(invalid="ignore"):
            out[ids] |= (clean_prob[ids] >= 0.5) & (confidence >= np.float32(cfg.plus_final_clean_confidence))
    return out


@pytest.mark.parametrize("n, c", [(1, 2), (7, 3), (61, 10), (500, 14)])
@pytest.mark.parametrize("given_agreement", [0.3, 0.5, 0.9])
@pytest.mark.parametrize("spread", [0.1, SYMMETRIC_SPREAD, 0.8])
@pytest.mark.parametrize("guard", [0, 5])
@pytest.mark.parametrize("clean_confidence", [0.0, 0.7])
def test_the_relabelled_samples_match_the_rule_written_out(rng, n, c, given_agreement, spread, guard,
                                                           clean_confidence):
    cfg = TrainConfig(method="mixnn_plus", plus_final_correction="always", plus_neighbour_guard=guard,
                      plus_final_clean_confidence=clean_confidence)
    clean_prob = rng.random(n).astype(np.float32)
    clean_prob[rng.random(n) < 0.1] = np.nan  # outside the last refresh's pool
    stable = rng.integers(0, 4, size=n).astype(np.int16)
    last_predicted = rng.integers(-1, c, size=n).astype(np.int16)
    supported = rng.random(n) < 0.5
    ids = np.sort(rng.choice(n, size=max(1, n - n // 5), replace=False))  # a few unreadable samples
    predicted = rng.integers(0, c, size=len(ids))
    confidence = rng.uniform(1 / c, 1, size=len(ids)).astype(np.float32)
    confidence[: len(ids) // 4] = rng.choice([0.5, 0.7, 0.8], size=len(ids) // 4)  # exactly at the thresholds
    run = RunState(clean_prob=torch.from_numpy(clean_prob.copy()), stable=torch.from_numpy(stable.copy()),
                   last_predicted=torch.from_numpy(last_predicted.copy()),
                   given_supported=torch.from_numpy(supported.copy()), given_agreement=given_agreement,
                   disagreement_spread=spread)
    got = final_correction(cfg, run, torch.from_numpy(ids), torch.from_numpy(predicted),
                           torch.from_numpy(confidence), n)
    want = _reference(cfg, clean_prob, stable, last_predicted, supported, given_agreement, spread, ids, predicted,
                      confidence, n)
    assert got.dtype == torch.bool and got.shape == (n,)
    np.testing.assert_array_equal(got.numpy(), want)
    # the run's state is read, never changed (it is what the checkpoint holds)
    np.testing.assert_array_equal(run.stable.numpy(), stable)
    np.testing.assert_array_equal(run.last_predicted.numpy(), last_predicted)


def test_it_does_not_act_off_by_default_for_other_corrections_or_before_any_refresh():
    run = RunState(clean_prob=torch.zeros(3), given_agreement=0.9, disagreement_spread=0.9)
    args = (torch.arange(3), torch.zeros(3, dtype=torch.int64), torch.ones(3), 3)
    assert final_correction(TrainConfig(method="mixnn_plus"), run, *args) is None
    assert final_correction(TrainConfig(method="mixnn_plus", plus_final_correction="always"), RunState(), *args) is None
    on = TrainConfig(method="mixnn_plus", plus_final_correction="always", plus_consistent=0)
    assert final_correction(on, run, *args).tolist() == [True, True, True]  # no gate: the floor, 0.5


@settings(max_examples=20, deadline=None)
@given(method=st.sampled_from(["ce", "mixnn", "gce"]), correction=st.sampled_from(["all", "none", "graded"]))
def test_the_option_is_refused_where_it_could_not_act(method, correction):
    with pytest.raises(ValueError, match="plus_final_correction: corrects MixNN\\+'s reported labels"):
        TrainConfig(method=method, plus_final_correction="always")
    with pytest.raises(ValueError, match="plus_final_correction: .*plus_correction selective"):
        TrainConfig(method="mixnn_plus", plus_correction=correction, plus_final_correction="always")


def test_saved_runs_read_it_off_and_a_resume_may_switch_it(tmp_path):
    from mixnn_fast.app.cli import build_parser

    saved = TrainConfig(method="mixnn_plus").to_dict()
    del saved["plus_final_correction"]
    assert TrainConfig.from_saved(saved).plus_final_correction == "off"
    on = TrainConfig(method="mixnn_plus", plus_final_correction="always")
    assert on.experiment_differences(TrainConfig(method="mixnn_plus")) == []  # the same experiment
    args = build_parser().parse_args(["train", "--plus-final-correction", "class_pair", "--out-dir", str(tmp_path / "r")])
    assert args.plus_final_correction == "class_pair"
    with pytest.raises(ValueError, match="plus_final_correction: must be one of off, always, class_pair, class_pair_confident"):
        TrainConfig(method="mixnn_plus", plus_final_correction="yes")


def test_a_run_reports_the_final_pass_prediction_exactly_where_the_rule_says(tmp_path):
    from mixnn_fast.app.report import write_run_report
    from mixnn_fast.train.trainer import Trainer

    cfg = gates_opening_config(tmp_path / "run", plus_consistent_min_agreement=0.0,  # the gate at every refresh
                               plus_final_correction="off", plus_final_correction_symmetric=False)
    trainer = Trainer(cfg)
    trainer.fit()
    off = trainer.label_record()
    targets = trainer.targets.corrected_labels().clone()
    assert off.final_corrections is None
    trainer.close()

    on_cfg = TrainConfig.from_dict({**cfg.to_dict(), "plus_final_correction": "always"})
    resumed = Trainer(on_cfg, resume=True)  # the same finished run, reported with the last correction
    on = resumed.label_record()
    relabel = final_correction(on_cfg, resumed.run, torch.arange(len(on.predicted)), torch.from_numpy(on.predicted),
                               torch.from_numpy(on.confidence).float(), len(on.predicted))
    relabel = relabel.numpy()
    np.testing.assert_array_equal(off.predicted, on.predicted)  # one model, one pass
    expected = off.corrected.copy()
    expected[relabel] = on.predicted[relabel]
    np.testing.assert_array_equal(on.corrected, expected)
    assert on.final_corrections == int((off.corrected != on.corrected).sum()) > 0, \
        "the last correction changed no label: this run cannot tell it from off"
    # nothing trained changes: the soft targets and the rest of the record are the run's
    assert torch.equal(resumed.targets.corrected_labels(), targets)
    np.testing.assert_array_equal(on.target_given, off.target_given)
    # class_pair: the same labels where fewer than half of the correction phase's logged refreshes
    # looked symmetric (read from the run folder by the rebuilt run), else the run's own
    from mixnn_fast.train.metrics import read_metrics

    share = symmetric_share(read_metrics(tmp_path / "run"), cfg.correction_start)
    assert share is not None
    scoped = Trainer(TrainConfig.from_dict({**cfg.to_dict(), "plus_final_correction": "class_pair"}), resume=True)
    np.testing.assert_array_equal(scoped.label_record().corrected, on.corrected if share < 0.5 else off.corrected)
    scoped.close()
    confident = Trainer(TrainConfig.from_dict({**cfg.to_dict(), "plus_final_correction": "class_pair_confident"}),
                        resume=True)
    expected = off.corrected.copy()
    if share < 0.5:
        sure = on.confidence >= np.float32(cfg.plus_min_confidence)
        expected[sure] = on.predicted[sure]
    np.testing.assert_array_equal(confident.label_record().corrected, expected)
    confident.close()
    # with the labels the GMM called clean, at their own threshold (0.6 here: this small run has few
    # predictions at 0.7 among them)
    clean_cfg = TrainConfig.from_dict({**cfg.to_dict(), "plus_final_correction": "class_pair",
                                       "plus_final_clean_confidence": 0.6})
    with_clean = Trainer(clean_cfg, resume=True)
    expected = (on.corrected if share < 0.5 else off.corrected).copy()
    if share < 0.5:
        with np.errstate(invalid="ignore"):
            sure = (with_clean.run.clean_prob.numpy() >= 0.5) & (on.confidence >= np.float32(0.6))
        expected[sure] = on.predicted[sure]
        assert (expected != on.corrected).any(), "no label the GMM called clean changes: the run cannot tell"
    np.testing.assert_array_equal(with_clean.label_record().corrected, expected)
    with_clean.close()
    summary = write_run_report(tmp_path / "run", on, resumed.summary())
    assert summary["final_corrections"] == on.final_corrections
    true = np.asarray(on.train.clean_labels)
    assert summary["label_accuracy_after_correction"] == pytest.approx((on.corrected == true).mean())
    resumed.close()


@pytest.mark.parametrize("n", [1, 2, 7, 48])
def test_the_share_of_refreshes_that_looked_symmetric_matches_a_plain_count(rng, n):
    start = int(rng.integers(0, 10))
    rows = []
    for epoch in range(n):
        row = {"epoch": epoch, "phase": "mixnn"}
        if rng.random() < 0.8:  # a refresh that logged its spread; warm-up rows did not
            row["disagreement_spread"] = float(rng.choice([rng.random(), SYMMETRIC_SPREAD]))
        rows.append(row)
    counted = [r["disagreement_spread"] >= SYMMETRIC_SPREAD for r in rows
               if r["epoch"] >= start and "disagreement_spread" in r]
    want = None if not counted else sum(counted) / len(counted)
    assert symmetric_share(rows, start) == want


def test_class_pair_acts_exactly_where_fewer_than_half_the_refreshes_looked_symmetric():
    n = 6
    run = RunState(clean_prob=torch.tensor([0.1, 0.9, 0.2, 0.3, 0.0, 0.6]), given_agreement=0.2,
                   disagreement_spread=0.9)  # the gate does not hold: the floor of 0.5 applies
    args = (torch.arange(n), torch.tensor([1, 2, 3, 4, 5, 0]), torch.tensor([0.9, 0.9, 0.4, 0.5, 0.7, 0.9]), n)
    always = final_correction(TrainConfig(method="mixnn_plus", plus_final_correction="always",
                                          plus_final_clean_confidence=0.0), run, *args)
    assert always.tolist() == [True, False, False, True, True, False]
    with_clean = final_correction(TrainConfig(method="mixnn_plus", plus_final_correction="always"), run, *args)
    assert with_clean.tolist() == [True, True, False, True, True, True]  # and the clean-called at 0.7, the default
    class_pair = TrainConfig(method="mixnn_plus", plus_final_correction="class_pair", plus_final_clean_confidence=0.0)
    assert torch.equal(final_correction(class_pair, run, *args, looked_symmetric=0.49), always)
    assert final_correction(class_pair, run, *args, looked_symmetric=0.5) is None
    assert final_correction(class_pair, run, *args, looked_symmetric=None) is None  # no correction-phase refresh


@pytest.mark.parametrize("n", [1, 5, 64, 301])
def test_class_pair_confident_relabels_every_confident_prediction_where_class_pair_acts(rng, n):
    # the mask, the stability counters and the gate do not matter: only the share and the floor
    clean_prob = torch.from_numpy(rng.random(n).astype(np.float32))
    run = RunState(clean_prob=clean_prob, stable=torch.zeros(n, dtype=torch.int16),
                   last_predicted=torch.full((n,), -1, dtype=torch.int16), given_agreement=float(rng.random()),
                   disagreement_spread=float(rng.random()))
    ids = np.sort(rng.choice(n, size=max(1, n - n // 4), replace=False))  # a few unreadable samples
    confidence = rng.uniform(0.1, 1, size=len(ids)).astype(np.float32)
    confidence[: len(ids) // 3] = 0.5  # exactly at the floor
    predicted = rng.integers(0, 10, size=len(ids))
    cfg = TrainConfig(method="mixnn_plus", plus_final_correction="class_pair_confident")
    args = (torch.from_numpy(ids), torch.from_numpy(predicted), torch.from_numpy(confidence), n)
    got = final_correction(cfg, run, *args, looked_symmetric=0.49)
    want = np.zeros(n, dtype=bool)
    want[ids] = confidence >= 0.5
    np.testing.assert_array_equal(got.numpy(), want)
    assert final_correction(cfg, run, *args, looked_symmetric=0.5) is None
    assert final_correction(cfg, run, *args, looked_symmetric=None) is None
    assert final_correction(cfg, RunState(), *args, looked_symmetric=0.0) is None  # no refresh recorded


@pytest.mark.parametrize("n", [1, 6, 77, 400])
@pytest.mark.parametrize("min_confidence", [0.0, 0.5, 0.9])
def test_the_symmetric_last_correction_relabels_noisy_confident_samples_where_the_noise_looked_symmetric(
        rng, n, min_confidence):
    clean_prob = rng.random(n).astype(np.float32)
    clean_prob[rng.random(n) < 0.1] = np.nan  # outside the last refresh's pool: never relabelled
    clean_prob[rng.random(n) < 0.1] = 0.5  # exactly at the boundary: called clean
    run = RunState(clean_prob=torch.from_numpy(clean_prob.copy()), stable=torch.zeros(n, dtype=torch.int16),
                   last_predicted=torch.full((n,), -1, dtype=torch.int16), given_agreement=0.9,
                   disagreement_spread=0.9)
    ids = np.sort(rng.choice(n, size=max(1, n - n // 4), replace=False))
    confidence = rng.uniform(0.1, 1, size=len(ids)).astype(np.float32)
    confidence[: len(ids) // 3] = min_confidence  # exactly at the floor
    cfg = TrainConfig(method="mixnn_plus", plus_final_correction_symmetric=True, plus_min_confidence=min_confidence)
    args = (torch.from_numpy(ids), torch.from_numpy(confidence), n)
    got = final_symmetric_correction(cfg, run, *args, looked_symmetric=0.5)
    want = np.zeros(n, dtype=bool)
    with np.errstate(invalid="ignore"):
        want[ids] = (clean_prob[ids] < 0.5) & (confidence >= np.float32(min_confidence))
    np.testing.assert_array_equal(got.numpy(), want)
    assert final_symmetric_correction(cfg, run, *args, looked_symmetric=0.49) is None  # class_pair's runs
    assert final_symmetric_correction(cfg, run, *args, looked_symmetric=None) is None
    off = TrainConfig(method="mixnn_plus", plus_final_correction_symmetric=False)
    assert final_symmetric_correction(off, run, *args, looked_symmetric=1.0) is None
    assert final_symmetric_correction(cfg, RunState(), *args, looked_symmetric=1.0) is None


def test_the_symmetric_last_correction_is_on_by_default_and_off_in_saved_runs():
    assert TrainConfig(method="mixnn_plus").plus_final_correction_symmetric is True
    # on by default, so accepted where it cannot act, and inert there
    for cfg in (TrainConfig(method="mixnn"), TrainConfig(method="mixnn_plus", plus_correction="all")):
        run = RunState(clean_prob=torch.zeros(2), given_agreement=0.9, disagreement_spread=0.9)
        assert final_symmetric_correction(cfg, run, torch.arange(2), torch.ones(2), 2, looked_symmetric=1.0) is None
    saved = TrainConfig(method="mixnn_plus").to_dict()
    del saved["plus_final_correction_symmetric"]
    assert TrainConfig.from_saved(saved).plus_final_correction_symmetric is False
    off = TrainConfig(method="mixnn_plus", plus_final_correction_symmetric=False)
    assert off.experiment_differences(TrainConfig(method="mixnn_plus")) == []  # the same experiment


@settings(max_examples=30, deadline=None)
@given(p=st.floats(allow_nan=True, allow_infinity=True, width=32), final=st.sampled_from(list(
    __import__("mixnn_fast.train.config", fromlist=["PLUS_FINAL_CORRECTIONS"]).PLUS_FINAL_CORRECTIONS)))
def test_the_clean_confidence_is_a_probability_and_needs_always_or_class_pair(p, final):
    import math

    if math.isnan(p) or not 0 <= p <= 1:
        with pytest.raises(ValueError, match="plus_final_clean_confidence: must lie in \\[0, 1\\]"):
            TrainConfig(method="mixnn_plus", plus_final_correction=final, plus_final_clean_confidence=p)
    elif p not in (0.0, 0.7) and final not in ("always", "class_pair"):  # 0.7, the default, is accepted anywhere
        with pytest.raises(ValueError, match="plus_final_clean_confidence: extends MixNN\\+'s last correction"):
            TrainConfig(method="mixnn_plus", plus_final_correction=final, plus_final_clean_confidence=p)
    else:
        assert TrainConfig(method="mixnn_plus", plus_final_correction=final,
                           plus_final_clean_confidence=p).plus_final_clean_confidence == p


def test_the_clean_confidence_is_on_by_default_off_in_saved_runs_and_refused_elsewhere_when_set():
    assert TrainConfig(method="mixnn_plus").plus_final_clean_confidence == 0.7
    assert TrainConfig(method="ce").plus_final_clean_confidence == 0.7  # the default: accepted, inert
    with pytest.raises(ValueError, match="plus_final_clean_confidence: extends MixNN\\+'s last correction to labels"):
        TrainConfig(method="mixnn", plus_final_clean_confidence=0.9)
    saved = TrainConfig(method="mixnn_plus").to_dict()
    del saved["plus_final_clean_confidence"]
    assert TrainConfig.from_saved(saved).plus_final_clean_confidence == 0.0
