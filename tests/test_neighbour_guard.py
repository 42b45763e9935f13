"""MixNN+'s neighbour guard (``plus_neighbour_guard K``, off by default): the k-NN vote of the
given labels against a plain-Python count, when the guard applies, and what a real run hands to
the correction with it (exactly the mask without it, less the samples the last vote supported)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_symmetric_trust import gates_opening_config  # pytest puts tests/ on sys.path

import mixnn_fast.refresh.refresh as refresh_module
from mixnn_fast.refresh.refresh import given_label_supported
from mixnn_fast.train.config import TrainConfig
from mixnn_fast.train.methods import SYMMETRIC_SPREAD, neighbour_guard_applies, spared_by_neighbours


def _reference(labels: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """A row's label is supported when no label is more common among its neighbours'."""
    out = []
    for i, row in enumerate(neighbours):
        counts = Counter(labels[row].tolist())
        out.append(counts.get(int(labels[i]), 0) >= max(counts.values()))
    return np.array(out, dtype=bool)


@pytest.mark.parametrize("p, k, c", [(1, 1, 2), (7, 3, 3), (61, 10, 10), (257, 4, 2), (1000, 9, 37)])
@pytest.mark.parametrize("chunk", [None, 5])
def test_the_vote_matches_a_plain_count(rng, monkeypatch, p, k, c, chunk):
    if chunk is not None:  # rows split over several chunks, the last one short
        monkeypatch.setattr(refresh_module, "_VOTE_CHUNK_ROWS", chunk)
    labels = rng.integers(0, c, size=p)
    neighbours = rng.integers(0, p, size=(p, k))
    supported = given_label_supported(torch.from_numpy(labels), torch.from_numpy(neighbours))
    assert supported.dtype == torch.bool and supported.shape == (p,)
    np.testing.assert_array_equal(supported.numpy(), _reference(labels, neighbours))


def test_ties_count_for_the_own_label_and_absence_is_never_support():
    labels = torch.tensor([0, 1, 0, 1, 2])
    neighbours = torch.tensor([[1, 2], [0, 2], [1, 3], [4, 4], [0, 1]])
    # row 0: {1, 0} a tie -> supported; row 1: {0, 0} -> not; row 2: {1, 1} -> not;
    # row 3: {2, 2} -> not; row 4: {0, 1} without 2 -> not
    assert given_label_supported(labels, neighbours).tolist() == [True, False, False, False, False]


@settings(max_examples=30, deadline=None)
@given(p=st.integers(1, 6), shape=st.sampled_from(["1d", "wrong_rows", "no_columns"]))
def test_a_neighbour_table_of_the_wrong_shape_is_refused(p, shape):
    labels = torch.zeros(p, dtype=torch.int64)
    neighbours = {"1d": torch.zeros(p, dtype=torch.int64), "wrong_rows": torch.zeros(p + 1, 3, dtype=torch.int64),
                  "no_columns": torch.zeros(p, 0, dtype=torch.int64)}[shape]
    with pytest.raises(ValueError, match="given_label_supported: neighbours must be"):
        given_label_supported(labels, neighbours)


def test_the_guard_applies_where_the_gate_holds_and_the_spread_looks_symmetric():
    cfg = TrainConfig(method="mixnn_plus", plus_neighbour_guard=10)
    assert neighbour_guard_applies(cfg, 0.6, SYMMETRIC_SPREAD)
    assert not neighbour_guard_applies(cfg, 0.6, SYMMETRIC_SPREAD - 0.01)  # class-pair noise looks like this
    assert not neighbour_guard_applies(cfg, 0.4, 0.9)  # the stability gate does not hold (high noise)
    assert not neighbour_guard_applies(cfg, None, None)  # before any refresh
    assert not neighbour_guard_applies(TrainConfig(method="mixnn_plus"), 0.6, 0.9)  # off by default
    mask = torch.tensor([True, True, False, False])
    supported = torch.tensor([True, False, True, False])
    assert spared_by_neighbours(cfg, mask, supported, 0.6, 0.9).tolist() == [True, False, False, False]
    assert spared_by_neighbours(cfg, mask, None, 0.6, 0.9) is None  # no vote yet: the guard does not act
    assert spared_by_neighbours(cfg, mask, supported, 0.6, 0.1) is None
    assert spared_by_neighbours(cfg, None, supported, 0.6, 0.9) is None  # every sample corrected (no mask)


def _guarded_run(tmp_path, monkeypatch, name, **settings):
    """A digits run at sym-20 whose gates open at some refreshes; records the correction mask each refresh hands over and each refresh's vote."""
    import mixnn_fast.train.trainer as trainer_module
    from mixnn_fast.refresh.pool_scores import PoolScores
    from mixnn_fast.train.trainer import Trainer

    handed, votes = [], []

    class Recording(PoolScores):
        def __init__(self, *args, **kwargs):
            if kwargs.get("correct_only") is not None:
                handed.append((kwargs["correct_only"].clone(), kwargs["min_confidence"]))
            super().__init__(*args, **kwargs)

    def recording_refresh(*args, **kwargs):
        result = refresh_module.refresh(*args, **kwargs)
        votes.append(None if result.given_label_supported is None else result.given_label_supported.clone())
        return result

    monkeypatch.setattr(trainer_module, "PoolScores", Recording)
    monkeypatch.setattr(trainer_module, "refresh", recording_refresh)
    cfg = gates_opening_config(tmp_path / name, **settings)
    trainer = Trainer(cfg)
    trainer.fit()
    return cfg, trainer, handed, votes


def test_a_run_spares_exactly_the_supported_samples_where_the_guard_applies(tmp_path, monkeypatch):
    from mixnn_fast.train.trainer import Trainer

    # without the class-balance penalty: on this tiny run it moves the model enough that no refresh
    # where the guard's gates open finds a sample to spare, and the test needs one
    cfg, guarded, handed, votes = _guarded_run(tmp_path, monkeypatch, "guard", plus_neighbour_guard=10, plus_prior=0.0)
    _, off, handed_off, votes_off = _guarded_run(tmp_path, monkeypatch, "off", plus_prior=0.0)
    assert all(v is None for v in votes_off) and all(v is not None for v in votes)
    refreshes = [r for r in guarded.metrics.rows if "given_label_agreement" in r]
    assert len(handed) == len(refreshes) == len(votes)
    spared_rows = [r.get("held_back_by_neighbours") for r in refreshes]
    # the guard acts at a refresh exactly when the refresh before it opened both gates
    for i, row in enumerate(refreshes):
        opened = i > 0 and refreshes[i - 1]["given_label_agreement"] >= 0.5 \
            and refreshes[i - 1]["disagreement_spread"] >= SYMMETRIC_SPREAD
        assert (spared_rows[i] is not None) == opened
    acting = [i for i, s in enumerate(spared_rows) if s]
    assert acting, "the guard never spared a sample: the run cannot tell it from off"
    # up to the first refresh where it acts the two runs are one; there the guarded mask is the
    # mask without the guard less the samples the previous refresh's vote supported, and the
    # others need plus_min_confidence instead of the symmetric threshold
    first = next(i for i, s in enumerate(spared_rows) if s is not None)
    for i in range(first):
        assert torch.equal(handed[i][0], handed_off[i][0]) and handed[i][1] == handed_off[i][1]
    supported = votes[first - 1]  # pool = every sample here, in id order
    mask, threshold = handed[first]
    mask_off, threshold_off = handed_off[first]
    assert torch.equal(mask, mask_off & ~supported)
    assert (threshold, threshold_off) == (cfg.plus_min_confidence, cfg.plus_symmetric_confidence) == (0.5, 0.8)
    assert spared_rows[first] == pytest.approx(float((mask_off & supported).float().mean()))
    for i in acting:  # wherever it acts, no supported sample is handed over
        assert not (handed[i][0] & votes[i - 1]).any() and handed[i][1] == 0.5
    assert not any(r.get("held_back_by_neighbours") for r in off.metrics.rows)
    # a resumed run carries the last vote
    assert torch.equal(guarded.run.given_supported, votes[-1])
    assert torch.equal(Trainer(cfg, resume=True).run.given_supported, votes[-1])
