"""SoftTargets against a plain float64 reference of eq. 12; the store interface (rows, mix, set_rows,
state) and the storage factory."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from mixnn_fast.refresh import target_store as targets_module
from mixnn_fast.refresh.targets import (AUTO_FLOAT16_ELEMENTS, AUTO_FLOAT32_ELEMENTS, AUTO_TOP_K, SoftTargets,
                                        choose_storage, soft_targets)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
STORAGE = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
E32 = torch.finfo(torch.float32).eps


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


# ------------------------------------------------------------------- the store interface


def trained_store(rng, n: int, classes: int, dtype: torch.dtype, device: str = "cpu") -> SoftTargets:
    store = SoftTargets(torch.from_numpy(rng.integers(0, classes, n)).to(device), classes, start_epoch=0, dtype=dtype)
    for epoch in range(3):
        store.update(torch.arange(n, device=device),
                     torch.from_numpy(random_probabilities(rng, n, classes)).float().to(device), epoch)
    return store


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", STORAGE)
@pytest.mark.parametrize("n,classes,batch,partners", [(1, 1, 1, 0), (7, 3, 5, 1), (101, 13, 33, 2), (300, 257, 17, 4)])
def test_mix_matches_a_float64_einsum(rng, device, dtype, n, classes, batch, partners):
    store = trained_store(rng, n, classes, dtype, device)
    anchors = torch.from_numpy(rng.integers(0, n, batch)).to(device)
    others = torch.from_numpy(rng.integers(0, n, (batch, partners))).to(device)
    weights = torch.from_numpy(rng.dirichlet(np.ones(partners + 1), batch).astype(np.float32)).to(device)
    out = store.mix(anchors, others, weights)
    assert out.dtype == torch.float32 and out.shape == (batch, classes) and out.device.type == device
    ids = torch.cat([anchors.unsqueeze(1), others], dim=1)
    expected = torch.einsum("bj,bjc->bc", weights.double(), store.targets[ids].double())
    # K+1 float32 products and sums of entries in [0, 1] (float64 storage: the sum in float64,
    # rounded once to float32)
    atol = (partners + 2) * E32 if dtype != torch.float64 else E32
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=atol)
    if dtype != torch.float64:  # exactly the trusted mixer's call: the same bits as before
        from mixnn_fast.mix.trusted import mix_batch_targets

        assert torch.equal(out, mix_batch_targets(store.targets, anchors, others, weights))
    rows = store.rows(anchors)
    assert rows.dtype == torch.float32 and torch.equal(rows, store.targets[anchors].float())



def test_rows_labels_bytes_and_chunks(rng, monkeypatch):
    n, classes = 500, 11
    labels = torch.from_numpy(rng.integers(0, classes, n))
    p = torch.from_numpy(random_probabilities(rng, n, classes)).half()
    whole = SoftTargets(labels, classes, start_epoch=0, dtype=torch.float16)
    whole.update(torch.arange(n), p, 0)
    assert whole.storage == "float16" and whole.nbytes == n * classes * 2 + n * 8
    monkeypatch.setattr(targets_module, "_CHUNK_ELEMENTS", classes * 7)  # 7 rows per chunk
    chunked = SoftTargets(labels, classes, start_epoch=0, dtype=torch.float16)
    chunked.update(torch.arange(n), p, 0)
    assert torch.equal(chunked.targets, whole.targets)  # rows are independent: chunks change nothing
    assert torch.equal(chunked.rows(torch.arange(n)), whole.targets.float())
    assert torch.equal(chunked.corrected_labels(), whole.targets.argmax(dim=1))
    ids = torch.tensor([9, 3, 9, 0])
    assert torch.equal(chunked.corrected_labels(ids), whole.targets[ids].argmax(dim=1))
    with pytest.raises(ValueError, match="probabilities"):  # a bad row in a later chunk is found
        bad = p.clone()
        bad[n - 2, 1] = float("nan")
        chunked.update(torch.arange(n), bad, 0)
    with pytest.raises(ValueError, match=rf"row {n - 3} sums to"):
        bad = p.float()
        bad[n - 3] *= 2
        chunked.update(torch.arange(n), bad, 0)


def test_set_rows_and_state_dict_share_the_store(rng):
    store = trained_store(rng, 40, 6, torch.float32)
    state = store.state_dict()
    assert state["kind"] == "dense" and state["targets"] is store.targets  # no copy of the table
    copy = SoftTargets(torch.zeros(40, dtype=torch.int64), 6, dtype=torch.bfloat16)
    ids = torch.arange(0, 40, 3)
    copy.set_rows(ids, store.rows(ids))
    assert torch.equal(copy.targets[ids], store.targets[ids].bfloat16())
    with pytest.raises(ValueError, match="values"):
        copy.set_rows(ids, store.rows(ids)[:-1])
    with pytest.raises(TypeError, match="values"):
        copy.set_rows(ids, store.rows(ids).tolist())
    old = {key: value for key, value in state.items() if key != "kind"}  # a checkpoint from before "kind"
    restored = SoftTargets(torch.zeros(40, dtype=torch.int64), 6)
    restored.load_state_dict(old)
    assert torch.equal(restored.targets, store.targets)
    with pytest.raises(ValueError, match=r"state\['kind'\] is 'topk'"):
        restored.load_state_dict({**state, "kind": "topk"})


# ------------------------------------------------------------------- the factory


def test_auto_storage_at_the_cut_offs():
    assert AUTO_FLOAT32_ELEMENTS == 2 ** 28 and AUTO_FLOAT16_ELEMENTS == 2 ** 32 and AUTO_TOP_K == 32
    assert choose_storage(2 ** 28 // 14, 14) == "float32"                 # below
    assert choose_storage(2 ** 20, 2 ** 8) == "float32"                   # exactly 2**28
    assert choose_storage(2 ** 20 + 1, 2 ** 8) == "float16"               # one row above
    assert choose_storage(1_000_000, 14) == "float32"                     # Clothing1M
    assert choose_storage(2_400_000, 1000) == "float16"                   # full WebVision: 4.8 GB
    assert choose_storage(2 ** 22, 2 ** 10) == "float16"                  # exactly 2**32
    assert choose_storage(2 ** 22 + 1, 2 ** 10) == "topk"
    assert choose_storage(14_000_000, 21_841) == "topk"                   # ImageNet-21k
    assert choose_storage(2 ** 27, 98) == "float16"                       # 98 = 3 k + 2: top-k is no smaller
    assert choose_storage(2 ** 27, 99) == "topk"
    assert choose_storage(2 ** 30, 40, top_k=8) == "topk"


@pytest.mark.parametrize("storage,expected", [("float32", torch.float32), ("float16", torch.float16),
                                              ("bfloat16", torch.bfloat16)])
def test_factory_builds_the_named_store(storage, expected):
    labels = torch.tensor([2, 0, 1, 2])
    store = soft_targets(labels, 3, storage=storage, momentum=0.5, start_epoch=4, update_every=2)
    assert isinstance(store, SoftTargets) and store.storage == storage and store.targets.dtype == expected
    assert (store.momentum, store.start_epoch, store.update_every) == (0.5, 4, 2)
    auto = soft_targets(labels, 3)
    assert auto.storage == "float32" and torch.equal(auto.corrected_labels(), labels)
    sparse = soft_targets(labels, 3, storage="topk", top_k=2)
    assert sparse.storage == "topk" and sparse.k == 2 and torch.equal(sparse.corrected_labels(), labels)
    assert soft_targets(torch.zeros(5, dtype=torch.int64), 100, storage="topk").k == 32


@pytest.mark.parametrize("kwargs,error,match", [
    ({"storage": "float64"}, ValueError, "storage must be one of"),
    ({"storage": "int8"}, ValueError, "storage must be one of"),
    ({"storage": "float16", "top_k": 4}, ValueError, "top_k applies"),
    ({"storage": "topk", "top_k": 0}, ValueError, "top_k"),
    ({"storage": "topk", "top_k": 9}, ValueError, r"k \(top_k\)"),
    ({"storage": "auto", "top_k": 2.5}, ValueError, "top_k"),
    ({"labels": [0, 1]}, TypeError, "labels"),
    ({"num_classes": "3"}, ValueError, "num_classes"),
    ({"momentum": 2.0}, ValueError, "momentum"),
])
def test_factory_refuses_bad_arguments(kwargs, error, match):
    arguments = {"labels": torch.tensor([0, 2]), "num_classes": 3}
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        soft_targets(**arguments)


@settings(max_examples=60)
@given(batch=st.integers(1, 5), partners=st.integers(0, 3), what=st.sampled_from(
    ["anchor_range", "partner_range", "anchor_dtype", "partner_dtype", "partner_shape", "weights_dtype",
     "weights_shape", "anchor_list", "weights_list"]))
def test_bad_mix_inputs_are_named(batch, partners, what):
    store = SoftTargets(torch.zeros(6, dtype=torch.int64), 4)
    anchors = torch.zeros(batch, dtype=torch.int64)
    others = torch.zeros(batch, partners, dtype=torch.int64)
    weights = torch.full((batch, partners + 1), 1.0 / (partners + 1))
    if what == "anchor_range":
        anchors[0] = -1
    elif what == "partner_range":
        others = torch.full((batch, partners + 1), 6)
        weights = torch.full((batch, partners + 2), 1.0 / (partners + 2))
    elif what == "anchor_dtype":
        anchors = anchors.float()
    elif what == "partner_dtype":
        others = others.int()
    elif what == "partner_shape":
        others = others.reshape(-1)
    elif what == "weights_dtype":
        weights = weights.half()
    elif what == "weights_shape":
        weights = torch.ones(batch, partners + 2)
    elif what == "anchor_list":
        anchors = anchors.tolist()
    elif what == "weights_list":
        weights = weights.tolist()
    error = TypeError if what.endswith("_list") else ValueError
    with pytest.raises(error, match=what.split("_")[0]):
        store.mix(anchors, others, weights)
