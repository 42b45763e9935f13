"""TopKSoftTargets against independent float64 references: the truncated EMA step by step, the
dense EMA it approximates (mass moved to the even rest, arg-max agreement), mixing, checkpoints
and bad inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from mixnn_fast.refresh import target_store as targets_module
from mixnn_fast.refresh.sparse_targets import TopKSoftTargets
from mixnn_fast.refresh.targets import SoftTargets

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
VALUE_DTYPES = [torch.float16, torch.float32]
E32 = torch.finfo(torch.float32).eps


def softmax_rows(rng: np.random.Generator, rows: int, classes: int, *, sigma: float = 3.0, boost: float = 0.0,
                 label: np.ndarray | None = None) -> np.ndarray:
    """float64 softmax of N(0, sigma^2) logits, plus ``boost`` on each row's ``label``."""
    logits = rng.normal(0, sigma, (rows, classes))
    if label is not None:
        logits[np.arange(rows), label] += boost
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def dense_of(store: TopKSoftTargets) -> np.ndarray:
    """The store's rows as float64, rebuilt here from indices/values/rest (not through rows())."""
    c, k = store.num_classes, store.k
    out = np.repeat((store.rest.double().cpu().numpy() / max(1, c - k))[:, None], c, axis=1)
    np.put_along_axis(out, store.indices.long().cpu().numpy(), store.values.double().cpu().numpy(), axis=1)
    return out


def truncated_step(dense: np.ndarray, p: np.ndarray, momentum: float, k: int):
    """The documented update in float64: EMA, keep the k largest, the rest evenly over the others.
    Returns (ema, kept classes sorted by value, kept values, rest, gap between k-th and k+1-th)."""
    ema = momentum * dense + (1 - momentum) * p
    order = np.argsort(-ema, axis=1, kind="stable")
    kept = order[:, :k]
    values = np.take_along_axis(ema, kept, axis=1)
    rest = ema.sum(axis=1) - values.sum(axis=1)
    sorted_values = np.take_along_axis(ema, order, axis=1)
    gap = sorted_values[:, k - 1] - sorted_values[:, k] if k < ema.shape[1] else np.full(len(ema), np.inf)
    return ema, kept, values, rest, gap


# ------------------------------------------------------------------- the update, step by step


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value_dtype", VALUE_DTYPES)
@pytest.mark.parametrize("n,classes,k", [(1, 1, 1), (37, 5, 2), (301, 40, 7), (200, 100, 100), (64, 1000, 32)])
def test_each_update_matches_the_float64_truncated_ema(rng, device, value_dtype, n, classes, k):
    labels = rng.integers(0, classes, n)
    momentum = 0.9
    store = TopKSoftTargets(torch.from_numpy(labels).to(device), classes, k=k, momentum=momentum, start_epoch=0,
                            value_dtype=value_dtype)
    np.testing.assert_array_equal(dense_of(store), np.eye(classes)[labels])
    # one step computes in float32 from the stored row (two roundings) and stores the value once
    atol = 4 * E32 + torch.finfo(value_dtype).eps / 2
    boundary_rows = updated_rows = 0
    for epoch in range(6):
        batch = np.sort(rng.choice(n, size=int(rng.integers(1, n + 1)), replace=False))
        p = softmax_rows(rng, len(batch), classes, sigma=2.0).astype(np.float32)
        before = dense_of(store)
        ema, kept, values, rest, gap = truncated_step(before[batch], p.astype(np.float64), momentum, k)
        assert store.update(torch.from_numpy(batch).to(device), torch.from_numpy(p).to(device), epoch)
        after = dense_of(store)
        untouched = np.setdiff1d(np.arange(n), batch)
        np.testing.assert_array_equal(after[untouched], before[untouched])
        # rows whose k-th and (k+1)-th values lie within float32 rounding may keep either class
        clear = gap > 8 * E32 * values[:, -1]
        boundary_rows += int((~clear).sum())
        updated_rows += len(batch)
        got_classes = store.indices[torch.from_numpy(batch).to(device)].long().cpu().numpy()
        np.testing.assert_array_equal(np.sort(got_classes[clear], axis=1), np.sort(kept[clear], axis=1))
        np.testing.assert_allclose(np.take_along_axis(after[batch], kept, axis=1)[clear], values[clear],
                                   rtol=0, atol=atol)
        got_rest = store.rest[torch.from_numpy(batch).to(device)].double().cpu().numpy()
        np.testing.assert_allclose(got_rest[clear], rest[clear], rtol=0, atol=classes * 4 * E32 + k * atol)
        np.testing.assert_allclose(after[batch].sum(axis=1), 1.0, rtol=0, atol=classes * 4 * E32 + k * atol)
    assert boundary_rows <= max(1, updated_rows // 100)  # the comparison covers nearly every row


def test_k_equal_to_classes_is_the_dense_ema(rng):
    labels = torch.from_numpy(rng.integers(0, 9, 120))
    sparse = TopKSoftTargets(labels, 9, k=9, start_epoch=0, value_dtype=torch.float32)
    dense = SoftTargets(labels, 9, start_epoch=0)
    for epoch in range(8):
        p = torch.from_numpy(softmax_rows(rng, 120, 9)).float()
        sparse.update(torch.arange(120), p, epoch)
        dense.update(torch.arange(120), p, epoch)
        # the same float32 arithmetic on the same numbers: equal, whatever order topk keeps them in
        assert torch.equal(sparse.rows(torch.arange(120)), dense.targets)
        assert bool((sparse.rest == 0).all())


# ------------------------------------------------------------------- against the dense EMA


@pytest.mark.parametrize("boost,sigma,noise", [(8.0, 3.0, 0.4), (12.0, 3.0, 0.4), (6.0, 2.0, 0.4)])
def test_top_k_follows_the_dense_ema_on_network_like_outputs(rng, boost, sigma, noise):
    """1000 classes, k = 32, 20 updates of softmax outputs whose true class gets ``boost`` over
    N(0, sigma^2) logits (mean top-1 probability 0.36, 0.65 and 0.19 for the three cases):
    per update, the mass leaving the kept classes (into the even rest) is measured; the
    corrected labels must equal the dense float64 EMA's but for near-ties, and every entry stay
    close to it."""
    n, classes, k, momentum = 1500, 1000, 32, 0.9
    clean = rng.integers(0, classes, n)
    given = np.where(rng.random(n) < noise, rng.integers(0, classes, n), clean)
    store = TopKSoftTargets(torch.from_numpy(given), classes, k=k, momentum=momentum, start_epoch=0)
    reference = np.eye(classes)[given]
    moved = []
    for epoch in range(20):
        p = softmax_rows(rng, n, classes, sigma=sigma, boost=boost, label=clean)
        before = dense_of(store)
        ema = momentum * before + (1 - momentum) * p
        moved.append(float((ema.sum(axis=1) - np.sort(ema, axis=1)[:, -k:].sum(axis=1)
                            - before.sum(axis=1) + np.sort(before, axis=1)[:, -k:].sum(axis=1)).mean()))
        store.update(torch.arange(n), torch.from_numpy(p).float(), epoch)
        reference = momentum * reference + (1 - momentum) * p
    got = dense_of(store)
    moved = np.array(moved)
    print(f"boost {boost}, sigma {sigma}: mass moved to the rest per update: mean {moved.mean():.4f}, "
          f"max {moved.max():.4f}; max |top-k - dense| {np.abs(got - reference).max():.4f}")
    assert 0 < moved.mean() < 0.1
    error = np.abs(got - reference).max()
    assert error < 0.02
    # the corrected labels agree, but for near-ties: a class the dense EMA scores within the
    # entries' error of its own arg-max
    corrected, expected = store.corrected_labels().numpy(), reference.argmax(axis=1)
    rows = np.arange(n)
    differ = corrected != expected
    print(f"  arg-max agreement {1 - differ.mean():.4f}")
    assert differ.mean() <= 0.005
    assert (reference[rows, expected] - reference[rows, corrected])[differ].max(initial=0) <= 2 * error
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-2)


# ------------------------------------------------------------------- mixing


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value_dtype", VALUE_DTYPES)
@pytest.mark.parametrize("n,classes,k,batch,partners", [(1, 1, 1, 1, 0), (5, 3, 2, 7, 1), (97, 31, 5, 33, 3),
                                                        (400, 1000, 32, 16, 2)])
def test_mix_matches_a_float64_einsum(rng, device, value_dtype, n, classes, k, batch, partners):
    store = TopKSoftTargets(torch.from_numpy(rng.integers(0, classes, n)).to(device), classes, k=k, start_epoch=0,
                            value_dtype=value_dtype)
    for epoch in range(3):
        store.update(torch.arange(n, device=device),
                     torch.from_numpy(softmax_rows(rng, n, classes)).float().to(device), epoch)
    anchors = rng.integers(0, n, batch)
    others = rng.integers(0, n, (batch, partners))
    weights = rng.dirichlet(np.ones(partners + 1), batch).astype(np.float32)
    out = store.mix(torch.from_numpy(anchors).to(device), torch.from_numpy(others).to(device),
                    torch.from_numpy(weights).to(device))
    assert out.dtype == torch.float32 and out.shape == (batch, classes) and out.device.type == device
    table = dense_of(store)
    ids = np.concatenate([anchors[:, None], others], axis=1)
    expected = np.einsum("bj,bjc->bc", weights.astype(np.float64), table[ids])
    # K+1 float32 products and sums of entries <= 1, plus the float32 even rest
    np.testing.assert_allclose(out.double().cpu().numpy(), expected, rtol=0, atol=(partners + 3) * 2 * E32)
    rows = store.rows(torch.from_numpy(anchors).to(device))
    np.testing.assert_allclose(rows.double().cpu().numpy(), table[anchors], rtol=0, atol=E32)


# ------------------------------------------------------------------- reading, chunks, bytes


def test_labels_rows_and_bytes(rng, monkeypatch):
    labels = torch.from_numpy(rng.integers(0, 50, 333))
    store = TopKSoftTargets(labels, 50, k=4, start_epoch=0)
    assert torch.equal(store.corrected_labels(), labels)
    assert torch.equal(store.corrected_labels(torch.tensor([5, 0, 5])), labels[[5, 0, 5]])
    assert store.nbytes == 333 * (4 * 4 + 4 * 2 + 4 + 8)  # int32 ids, float16 values, float32 rest, int64 labels
    assert store.storage == "topk" and store.dtype == torch.float16
    with pytest.raises(AttributeError, match="no dense"):
        store.targets
    p = torch.from_numpy(softmax_rows(rng, 333, 50, sigma=4.0)).float()
    one = TopKSoftTargets(labels, 50, k=4, start_epoch=0)
    one.update(torch.arange(333), p, 0)
    monkeypatch.setattr(targets_module, "_CHUNK_ELEMENTS", 50 * 7)  # 7 rows per chunk
    store.update(torch.arange(333), p, 0)
    for name in ("indices", "values", "rest"):
        assert torch.equal(getattr(store, name), getattr(one, name))
    assert torch.equal(store.rows(torch.arange(333)), one.rows(torch.arange(333)))
    assert torch.equal(store.corrected_labels(), one.rows(torch.arange(333)).argmax(dim=1))


def test_set_rows_takes_another_stores_rows(rng):
    labels = torch.from_numpy(rng.integers(0, 20, 60))
    source = TopKSoftTargets(labels, 20, k=5, start_epoch=0, value_dtype=torch.float32)
    source.update(torch.arange(60), torch.from_numpy(softmax_rows(rng, 60, 20)).float(), 0)
    copy = TopKSoftTargets(labels, 20, k=5, value_dtype=torch.float32)
    ids = torch.arange(0, 60, 2)
    copy.set_rows(ids, source.rows(ids))
    torch.testing.assert_close(copy.rows(ids), source.rows(ids), rtol=0, atol=2 * E32)
    assert torch.equal(copy.corrected_labels(ids), source.corrected_labels(ids))
    with pytest.raises(ValueError, match="values"):
        copy.set_rows(ids, source.rows(ids)[:, :3])


# ------------------------------------------------------------------- checkpoints


def test_state_dict_round_trip(tmp_path, rng):
    labels = torch.from_numpy(rng.integers(0, 30, 80))
    store = TopKSoftTargets(labels, 30, k=6, start_epoch=2, update_every=3)
    store.update(torch.arange(80), torch.from_numpy(softmax_rows(rng, 80, 30)).float(), 2)
    torch.save(store.state_dict(), tmp_path / "targets.pt")
    restored = TopKSoftTargets(torch.zeros(80, dtype=torch.int64), 30, k=6)
    restored.load_state_dict(torch.load(tmp_path / "targets.pt"))
    assert torch.equal(restored.rows(torch.arange(80)), store.rows(torch.arange(80)))
    assert torch.equal(restored.labels, labels)
    assert (restored.start_epoch, restored.update_every, restored.momentum) == (2, 3, 0.9)
    with pytest.raises(ValueError, match=r"state\['kind'\] is 'topk'"):
        SoftTargets(labels, 30).load_state_dict(store.state_dict())
    with pytest.raises(ValueError, match=r"state\['kind'\] is 'dense'"):
        restored.load_state_dict(SoftTargets(labels, 30).state_dict())
    with pytest.raises(ValueError, match=r"state\['k'\]"):
        TopKSoftTargets(labels, 30, k=5).load_state_dict(store.state_dict())


def _corrupt(state: dict, key: str, how: str) -> dict:
    state = {name: (value.clone() if isinstance(value, torch.Tensor) else value) for name, value in state.items()}
    if how == "missing":
        del state[key]
    elif how == "list":
        state[key] = state[key].tolist()
    elif how == "shape":
        state[key] = state[key][:-1]
    elif how == "nan":
        state[key] = state[key].float()
        state[key].view(-1)[0] = math.nan
    elif how == "negative":
        state[key].view(-1)[0] = -1
    elif how == "big" and not isinstance(state[key], torch.Tensor):
        state[key] = 10 ** 6
    elif how == "big":
        state[key].view(-1)[0] = 10 ** 6
    elif how == "repeat":
        state[key][0, 1] = state[key][0, 0]
    elif how == "float":
        state[key] = state[key].double()
    elif how == "int":
        state[key] = state[key].long()
    return state


@pytest.mark.parametrize("key,how", [
    ("indices", "missing"), ("indices", "list"), ("indices", "shape"), ("indices", "negative"), ("indices", "big"),
    ("indices", "repeat"), ("indices", "float"), ("values", "nan"), ("values", "negative"), ("values", "big"),
    ("values", "int"), ("values", "shape"), ("rest", "nan"), ("rest", "negative"), ("rest", "big"),
    ("rest", "shape"), ("labels", "big"), ("labels", "shape"), ("k", "big"), ("kind", "missing"),
])
def test_corrupt_states_are_refused_by_name(rng, key, how):
    labels = torch.from_numpy(rng.integers(0, 8, 12))
    store = TopKSoftTargets(labels, 8, k=3, start_epoch=0)
    store.update(torch.arange(12), torch.from_numpy(softmax_rows(rng, 12, 8)).float(), 0)
    good = {name: getattr(store, name).clone() for name in ("indices", "values", "rest")}
    state = _corrupt(store.state_dict(), key, how)
    with pytest.raises((ValueError, TypeError), match="state|kind|k ="):
        store.load_state_dict(state)
    for name, value in good.items():  # refused before anything changed
        assert torch.equal(getattr(store, name), value)


# ------------------------------------------------------------------- bad inputs


@settings(max_examples=40)
@given(n=st.integers(1, 12), classes=st.integers(1, 9), k=st.integers(-2, 12))
def test_k_must_lie_in_one_to_classes(n, classes, k):
    labels = torch.zeros(n, dtype=torch.int64)
    if 1 <= k <= classes:
        store = TopKSoftTargets(labels, classes, k=k)
        assert store.indices.shape == (n, k) and torch.equal(store.corrected_labels(), labels)
    else:
        with pytest.raises(ValueError, match=r"k \(top_k\)"):
            TopKSoftTargets(labels, classes, k=k)


@settings(max_examples=60)
@given(batch=st.integers(1, 5), partners=st.integers(0, 3), what=st.sampled_from(
    ["anchor_range", "partner_range", "anchor_dtype", "partner_shape", "weights_dtype", "weights_shape",
     "anchor_list"]))
def test_bad_mix_inputs_are_named(batch, partners, what):
    store = TopKSoftTargets(torch.zeros(6, dtype=torch.int64), 4, k=2)
    anchors = torch.zeros(batch, dtype=torch.int64)
    others = torch.zeros(batch, partners, dtype=torch.int64)
    weights = torch.full((batch, partners + 1), 1.0 / (partners + 1))
    name = what.split("_")[0]
    if what == "anchor_range":
        anchors[-1] = 6
    elif what == "partner_range":
        others = torch.full((batch, max(partners, 1)), -1)
        weights = torch.full((batch, max(partners, 1) + 1), 0.5)
    elif what == "anchor_dtype":
        anchors = anchors.int()
    elif what == "partner_shape":
        others = torch.zeros(batch + 1, partners, dtype=torch.int64)
    elif what == "weights_dtype":
        weights = weights.double()
    elif what == "weights_shape":
        weights = weights[:, :-1]
    elif what == "anchor_list":
        anchors = anchors.tolist()
    error = TypeError if what == "anchor_list" else ValueError
    with pytest.raises(error, match=name):
        store.mix(anchors, others, weights)


def test_bad_updates_are_named():
    store = TopKSoftTargets(torch.tensor([0, 1, 2]), 3, k=2, start_epoch=0)
    with pytest.raises(ValueError, match="probabilities"):
        store.update(torch.tensor([0]), torch.tensor([[0.5, 0.6, 0.0]]), 0)
    with pytest.raises(ValueError, match="distinct"):
        store.update(torch.tensor([0, 0]), torch.full((2, 3), 1 / 3), 0)
    with pytest.raises(TypeError, match="value_dtype"):
        TopKSoftTargets(torch.tensor([0]), 3, k=2, value_dtype=torch.bfloat16)
    assert torch.equal(store.corrected_labels(), torch.tensor([0, 1, 2]))


def test_renormalising_the_kept_classes_instead_would_slow_the_correction(rng):
    """The rule the module docstring argues against, in float64: drop the mass outside the k
    largest and rescale the kept entries to sum 1. On outputs with a mean top-1 probability of
    ~0.36 it corrects clearly fewer labels than the dense EMA; the store corrects as many."""
    n, classes, k, momentum = 1500, 1000, 32, 0.9
    clean = rng.integers(0, classes, n)
    given = np.where(rng.random(n) < 0.4, rng.integers(0, classes, n), clean)
    store = TopKSoftTargets(torch.from_numpy(given), classes, k=k, momentum=momentum, start_epoch=0)
    dense = renormalised = np.eye(classes)[given]
    for epoch in range(20):
        p = softmax_rows(rng, n, classes, sigma=3.0, boost=8.0, label=clean)
        store.update(torch.arange(n), torch.from_numpy(p).float(), epoch)
        dense = momentum * dense + (1 - momentum) * p
        ema = momentum * renormalised + (1 - momentum) * p
        kept = np.argsort(-ema, axis=1, kind="stable")[:, :k]
        renormalised = np.zeros_like(ema)
        np.put_along_axis(renormalised, kept, np.take_along_axis(ema, kept, axis=1), axis=1)
        renormalised /= renormalised.sum(axis=1, keepdims=True)
    accuracy = {name: float((labels == clean).mean()) for name, labels in (
        ("dense", dense.argmax(axis=1)), ("store", store.corrected_labels().numpy()),
        ("renormalised", renormalised.argmax(axis=1)))}
    print(accuracy)
    assert abs(accuracy["store"] - accuracy["dense"]) <= 0.005
    assert accuracy["renormalised"] < accuracy["dense"] - 0.1
