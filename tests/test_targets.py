"""SoftTargets against a plain float64 reference of eq. 12."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from mixnn_fast.refresh.targets import SoftTargets

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
STORAGE = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def ema_tolerance(dtype: torch.dtype, momentum: float) -> float:
    """How far the stored targets may drift from the float64 reference.

    Each update computes m t + (1 - m) p in float32 (float64 storage: float64), two roundings of
    eps_work / 2, and stores the result, one rounding of eps_storage / 2; all relative to the entry,
    and the entries of a row sum to 1. Earlier errors shrink by m per update, so they add up to at
    most (eps_work + eps_storage / 2) / (1 - m): per entry, and for a row's sum."""
    work = torch.promote_types(dtype, torch.float32)
    return (torch.finfo(work).eps + torch.finfo(dtype).eps / 2) / (1 - momentum)


def random_probabilities(rng: np.random.Generator, rows: int, classes: int) -> np.ndarray:
    logits = rng.normal(0, 3, (rows, classes))
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", STORAGE)
@pytest.mark.parametrize("n,classes", [(1, 1), (13, 3), (1001, 10), (257, 100)])
def test_ema_matches_reference(rng, device, dtype, n, classes):
    labels = rng.integers(0, classes, n)
    momentum, start, every = 0.9, 3, 2
    atol = ema_tolerance(dtype, momentum)
    store = SoftTargets(torch.from_numpy(labels).to(device), classes, momentum=momentum, start_epoch=start,
                        update_every=every, dtype=dtype)
    reference = np.eye(classes)[labels]
    assert store.targets.dtype == dtype and store.targets.device.type == device
    np.testing.assert_array_equal(store.targets.double().cpu().numpy(), reference)
    for epoch in range(10):
        for _ in range(3):  # batches of distinct samples
            batch = rng.choice(n, size=int(rng.integers(1, n + 1)), replace=False)
            p = random_probabilities(rng, len(batch), classes)
            applied = store.update(torch.from_numpy(batch).to(device), torch.from_numpy(p).float().to(device), epoch)
            expected_applied = epoch >= start and (epoch - start) % every == 0
            assert applied == expected_applied
            if expected_applied:
                reference[batch] = momentum * reference[batch] + (1 - momentum) * p.astype(np.float32).astype(np.float64)
        np.testing.assert_allclose(store.targets.double().cpu().numpy(), reference, rtol=0, atol=atol)
    batch = torch.from_numpy(rng.choice(n, size=min(n, 5), replace=False)).to(device)
    rows = store[batch]
    assert rows.dtype == torch.float32 and rows.shape == (len(batch), classes)
    np.testing.assert_allclose(rows.double().cpu().numpy(), reference[batch.cpu().numpy()], rtol=0,
                               atol=atol + torch.finfo(torch.float32).eps / 2)  # rows come back as float32
    # the predictions went in rounded to float32 (eps32 / 2 of each entry, so of their row sum of 1);
    # entries below the storage's smallest normal number round absolutely (one subnormal step
    # each); the float64 sum adds C roundings of its own
    finfo = torch.finfo(dtype)
    row_atol = (atol + torch.finfo(torch.float32).eps / 2
                + classes * (finfo.tiny * finfo.eps + torch.finfo(torch.float64).eps))
    np.testing.assert_allclose(store.targets.double().sum(dim=1).cpu().numpy(), 1.0, rtol=0, atol=row_atol)


def test_nothing_changes_before_start_epoch(rng):
    store = SoftTargets(torch.tensor([0, 2, 1]), 3, start_epoch=60)
    before = store.targets.clone()
    p = torch.full((3, 3), 1.0 / 3)
    for epoch in range(60):
        assert not store.update(torch.arange(3), p, epoch)
    assert torch.equal(store.targets, before)
    assert store.update(torch.arange(3), p, 60)
    torch.testing.assert_close(store.targets, 0.9 * before + 0.1 * p)


def test_authors_schedule_updates_every_tenth_epoch():
    store = SoftTargets(torch.tensor([0]), 2, start_epoch=60, update_every=10)
    assert [e for e in range(55, 95) if store.is_update_epoch(e)] == [60, 70, 80, 90]


def test_momentum_extremes():
    p = torch.tensor([[0.25, 0.75]])
    frozen = SoftTargets(torch.tensor([0]), 2, momentum=1.0, start_epoch=0)
    frozen.update(torch.tensor([0]), p, 0)
    assert torch.equal(frozen.targets, torch.tensor([[1.0, 0.0]]))
    follow = SoftTargets(torch.tensor([0]), 2, momentum=0.0, start_epoch=0)
    follow.update(torch.tensor([0]), p, 0)
    assert torch.equal(follow.targets, p)


def test_label_correction_recovers_clean_labels(rng):
    n, classes = 2000, 10
    clean = rng.integers(0, classes, n)
    flipped = rng.random(n) < 0.4
    noisy = np.where(flipped, (clean + rng.integers(1, classes, n)) % classes, clean)
    store = SoftTargets(torch.from_numpy(noisy), classes, start_epoch=0)
    clean_t = torch.from_numpy(clean)
    assert store.correction_accuracy(clean_t) == pytest.approx(float((noisy == clean).mean()))
    for epoch in range(15):  # a network that has learnt the clean labels, with some confusion
        p = 0.7 * np.eye(classes)[clean] + 0.3 * random_probabilities(rng, n, classes)
        store.update(torch.arange(n), torch.from_numpy(p).float(), epoch)
    corrected = store.corrected_labels()
    assert corrected.dtype == torch.int64 and corrected.shape == (n,)
    np.testing.assert_array_equal(corrected.numpy(), store.targets.numpy().argmax(axis=1))
    accuracy = store.correction_accuracy(clean_t)
    assert accuracy == pytest.approx(float((corrected.numpy() == clean).mean()))
    assert accuracy > 0.95


def test_state_dict_round_trip(tmp_path, rng):
    store = SoftTargets(torch.from_numpy(rng.integers(0, 5, 40)), 5, start_epoch=1, update_every=3,
                        dtype=torch.float16)
    store.update(torch.arange(40), torch.from_numpy(random_probabilities(rng, 40, 5)).float(), 1)
    torch.save(store.state_dict(), tmp_path / "targets.pt")
    restored = SoftTargets(torch.zeros(40, dtype=torch.int64), 5)
    restored.load_state_dict(torch.load(tmp_path / "targets.pt"))
    assert torch.equal(restored.labels, store.labels)
    assert torch.equal(restored.targets, store.targets.float())
    assert (restored.start_epoch, restored.update_every, restored.momentum) == (1, 3, 0.9)
    with pytest.raises(ValueError, match="shape"):
        SoftTargets(torch.zeros(41, dtype=torch.int64), 5).load_state_dict(store.state_dict())
    with pytest.raises(ValueError, match="classes"):
        SoftTargets(torch.zeros(40, dtype=torch.int64), 6).load_state_dict(store.state_dict())
    with pytest.raises(ValueError, match="missing"):
        restored.load_state_dict({"targets": store.targets})


# ------------------------------------------------------------------- validation


@given(rows=st.integers(1, 8), classes=st.integers(1, 6), bad=st.sampled_from([float("nan"), float("inf"), -0.5]),
       position=st.integers(0, 1000))
def test_non_finite_or_negative_probabilities_are_rejected(rows, classes, bad, position):
    store = SoftTargets(torch.zeros(10, dtype=torch.int64), classes, start_epoch=0)
    p = torch.full((rows, classes), 1.0 / classes)
    r, c = (position // classes) % rows, position % classes
    p[r, c] = bad
    with pytest.raises(ValueError, match=rf"probabilities\[{r}, {c}\]"):
        store.update(torch.arange(rows), p, 0)
    assert torch.equal(store.targets[:, 0], torch.ones(10))  # untouched


@given(rows=st.integers(1, 8), scale=st.floats(0.0, 3.0).filter(lambda s: abs(s - 1) > 0.01))
def test_rows_not_summing_to_one_are_rejected(rows, scale):
    store = SoftTargets(torch.zeros(10, dtype=torch.int64), 4, start_epoch=0)
    with pytest.raises(ValueError, match="sum to 1"):
        store.update(torch.arange(rows), torch.full((rows, 4), scale / 4), 0)


@given(n=st.integers(1, 20), offset=st.sampled_from([-1, 0, 5]))
def test_indices_out_of_range_are_rejected(n, offset):
    store = SoftTargets(torch.zeros(n, dtype=torch.int64), 2, start_epoch=0)
    index = -1 if offset == -1 else n + offset
    with pytest.raises(ValueError, match=r"indices must lie in \[0, N\)"):
        store.update(torch.tensor([index]), torch.tensor([[0.5, 0.5]]), 0)
    with pytest.raises(ValueError, match=r"indices must lie"):
        store[torch.tensor([index])]


@pytest.mark.parametrize("call,error,match", [
    (lambda s: s.update(torch.tensor([1, 1]), torch.full((2, 3), 1 / 3), 0), ValueError, "distinct"),
    (lambda s: s.update(torch.tensor([1]), torch.full((2, 3), 1 / 3), 0), ValueError, r"shape \(1, 3\)"),
    (lambda s: s.update(torch.tensor([1]), torch.full((1, 4), 1 / 4), 0), ValueError, r"shape \(1, 3\)"),
    (lambda s: s.update(torch.tensor([1]), torch.ones((1, 3), dtype=torch.int64), 0), ValueError, "floating"),
    (lambda s: s.update(torch.tensor([1], dtype=torch.int32), torch.full((1, 3), 1 / 3), 0), ValueError, "int64"),
    (lambda s: s.update([1], torch.full((1, 3), 1 / 3), 0), TypeError, "indices"),
    (lambda s: s.update(torch.tensor([1]), [[0.2, 0.3, 0.5]], 0), TypeError, "probabilities"),
    (lambda s: s.update(torch.tensor([1]), torch.full((1, 3), 1 / 3), 1.5), TypeError, "epoch"),
    (lambda s: s.correction_accuracy(torch.zeros(4, dtype=torch.int64)), ValueError, "shape"),
    (lambda s: s.correction_accuracy(torch.full((5,), 3)), ValueError, "clean_labels must lie"),
])
def test_bad_calls_are_rejected(call, error, match):
    store = SoftTargets(torch.tensor([0, 1, 2, 0, 1]), 3, start_epoch=0)
    with pytest.raises(error, match=match):
        call(store)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"labels": torch.tensor([0, 3])}, ValueError, "labels must lie"),
    ({"labels": torch.tensor([0, -1])}, ValueError, "labels must lie"),
    ({"labels": torch.tensor([0, 1], dtype=torch.int32)}, ValueError, "int64"),
    ({"labels": np.array([0, 1])}, TypeError, "labels"),
    ({"num_classes": 0}, ValueError, "num_classes"),
    ({"momentum": 1.5}, ValueError, "momentum"),
    ({"start_epoch": -1}, ValueError, "start_epoch"),
    ({"update_every": 0}, ValueError, "update_every"),
    ({"dtype": torch.int8}, TypeError, "dtype"),
])
def test_bad_construction_is_rejected(kwargs, error, match):
    arguments = {"labels": torch.tensor([0, 2]), "num_classes": 3}
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        SoftTargets(**arguments)


def test_half_precision_probabilities_are_accepted():
    store = SoftTargets(torch.tensor([0, 1]), 3, start_epoch=0, dtype=torch.float16)
    p = torch.softmax(torch.randn(2, 3, generator=torch.Generator().manual_seed(0)), dim=1).half()
    assert store.update(torch.tensor([0, 1]), p, 0)
