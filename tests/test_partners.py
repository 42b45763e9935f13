"""PartnerTable: validated once when built; the in-batch producers; the trusted mixer path that
consumes it equals the validated one bit for bit."""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mixnn_fast import mix_images, mix_targets
from mixnn_fast.mix.trusted import Normalisation, mix_batch_images, mix_batch_targets
from mixnn_fast.refresh.partners import PartnerTable, in_batch_table, mixup_table


@dataclass
class Batch:
    index: int
    anchor_ids: np.ndarray


def batches_of(ids, size):
    return [Batch(i, np.asarray(ids[s:s + size])) for i, s in enumerate(range(0, len(ids), size))]


def valid_table(rng, n=30, p=12, k=2):
    anchors = rng.choice(n, p, replace=False)
    partners = rng.integers(0, n, (p, k))
    weights = rng.dirichlet(np.ones(k + 1), p).astype(np.float32)
    return anchors, partners, weights


def test_build_sorts_rows_by_anchor_and_keeps_partners_with_their_weights(rng):
    anchors, partners, weights = valid_table(rng)
    table = PartnerTable.build(anchors, partners, weights, 30)
    order = np.argsort(anchors)
    assert np.array_equal(table.anchors.numpy(), anchors[order])
    assert np.array_equal(table.partners.numpy(), partners[order])
    assert np.array_equal(table.weights.numpy(), weights[order])
    rows = table.rows(anchors[:5])
    assert np.array_equal(table.partners.numpy()[rows], partners[:5])


@given(case=st.sampled_from(["anchor out of range", "partner out of range", "negative partner", "NaN weight",
                             "negative weight", "row sum", "shape", "duplicate anchor", "float ids", "N"]),
       seed=st.integers(0, 10**6))
def test_build_refuses_each_bad_input_by_name(case, seed):
    rng = np.random.default_rng(seed)
    anchors, partners, weights = valid_table(rng)
    n = 30
    expect = {"anchor out of range": "anchors", "partner out of range": "partners", "negative partner": "partners",
              "NaN weight": "weights", "negative weight": "weights", "row sum": "weights", "shape": "weights",
              "duplicate anchor": "anchors", "float ids": "partners", "N": "num_samples"}[case]
    if case == "anchor out of range":
        anchors[3] = n
    elif case == "partner out of range":
        partners[2, 1] = n + 5
    elif case == "negative partner":
        partners[0, 0] = -1
    elif case == "NaN weight":
        weights[1, 0] = np.nan
    elif case == "negative weight":
        weights[4] = [1.5, -0.25, -0.25]
    elif case == "row sum":
        weights[5, 0] += 0.01
    elif case == "shape":
        weights = weights[:, :2]
    elif case == "duplicate anchor":
        anchors[1] = anchors[0]
    elif case == "float ids":
        partners = partners.astype(np.float64)
    elif case == "N":
        n = 0
    with pytest.raises((ValueError, TypeError), match=expect):
        PartnerTable.build(anchors, partners, weights, n)


def test_merged_into_keeps_the_rows_outside_this_pool(rng):
    first = PartnerTable.build([0, 1, 2, 3], [[1], [0], [3], [2]], torch.full((4, 2), 0.5), 6)
    second = PartnerTable.build([2, 3, 4], [[4], [2], [3]], torch.tensor([[1.0, 0.0]] * 3), 6)
    merged = second.merged_into(first)
    assert merged.anchors.tolist() == [0, 1, 2, 3, 4]
    assert merged.partners[:, 0].tolist() == [1, 0, 4, 2, 3]  # 2, 3 from the new pool; 0, 1 kept
    assert merged.partner_array()[5].tolist() == [5]  # never an anchor: itself


@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=6), seed=st.integers(0, 1000),
       epoch=st.integers(0, 50))
def test_mixup_table_deranges_each_batch_with_one_lambda_each(sizes, seed, epoch):
    ids = np.random.default_rng(seed).permutation(sum(sizes))
    batches, start = [], 0
    for i, size in enumerate(sizes):
        batches.append(Batch(i, ids[start:start + size]))
        start += size
    table = mixup_table(batches, len(ids), seed=seed, epoch=epoch)
    assert len(table) == len(ids)
    for batch in batches:
        rows = table.rows(batch.anchor_ids)
        mates = table.partners[rows, 0].numpy()
        assert set(mates) <= set(batch.anchor_ids.tolist())
        if len(batch.anchor_ids) > 1:
            assert np.all(mates != batch.anchor_ids)
        lam = table.weights[rows, 0]
        assert torch.all(lam == lam[0]) and torch.all((lam >= 0) & (lam <= 1))
    again = mixup_table(batches, len(ids), seed=seed, epoch=epoch)  # a function of (seed, epoch, batch)
    assert torch.equal(again.partners, table.partners) and torch.equal(again.weights, table.weights)


def test_mixup_lambda_is_uniform_for_alpha_one():
    batches = [Batch(i, np.array([2 * i, 2 * i + 1])) for i in range(4000)]
    lam = mixup_table(batches, 8000, seed=3, epoch=1).weights[::2, 0].numpy()
    # Beta(1, 1) = uniform: mean 1/2, variance 1/12; 4000 draws -> standard errors 0.0046 and 0.0018
    assert abs(lam.mean() - 0.5) < 5 * (1 / 12 / 4000) ** 0.5
    assert abs(lam.var() - 1 / 12) < 5 * 0.0018


def test_in_batch_table_matches_brute_force(rng):
    n, d = 50, 6
    ids = rng.permutation(n)
    features = torch.from_numpy(rng.normal(size=(n, d)))
    clean = torch.from_numpy(rng.uniform(size=n))
    batches = batches_of(ids, 10)  # (a batch of fewer than k + 1 anchors repeats its nearest: not here)
    pool = SimpleNamespace(ids=torch.arange(n), features=features, clean_prob=clean)
    table = in_batch_table(batches, pool, n, k=2)
    for batch in batches:
        a = batch.anchor_ids
        distance = torch.cdist(features[a].double(), features[a].double())
        distance.fill_diagonal_(float("inf"))
        nearest = a[distance.argsort(1)[:, :2].numpy()]
        rows = table.rows(a)
        assert np.array_equal(table.partners[rows].numpy(), nearest)
        w = clean.double()
        expected = torch.stack([w[a], w[nearest[:, 0]], w[nearest[:, 1]]], 1)
        expected = expected / expected.sum(1, keepdim=True)
        torch.testing.assert_close(table.weights[rows].double(), expected, rtol=0, atol=torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [0, 1, 3])
def test_trusted_mix_equals_the_validated_mix_bit_for_bit(rng, out_dtype, k):
    images = torch.from_numpy(rng.integers(0, 256, (23, 13, 11, 3), dtype=np.uint8))
    b = 9
    anchors = torch.from_numpy(rng.integers(0, 23, b))
    partners = torch.from_numpy(rng.integers(0, 23, (b, k)))
    weights = torch.from_numpy(rng.dirichlet(np.ones(k + 1), b).astype(np.float32))
    mean, std = [120.0, 110.0, 100.0], [50.0, 60.0, 70.0]
    expected = mix_images(images, anchors, partners, weights, mean=mean, std=std, out_dtype=out_dtype)
    out = torch.full_like(expected, float("nan"))  # poisoned: every element must be written
    got = mix_batch_images(images, anchors, partners, weights, Normalisation(3, mean, std), out_dtype=out_dtype,
                           out=out)
    assert torch.equal(got, expected)
    targets = torch.from_numpy(rng.dirichlet(np.ones(7), 23).astype(np.float32))
    assert torch.equal(mix_batch_targets(targets, anchors, partners, weights),
                       mix_targets(targets, anchors, partners, weights))


def test_covering_all_gives_every_sample_a_row():
    previous = PartnerTable.build([0, 1, 2], [[1], [0], [0]], torch.full((3, 2), 0.5), 6)
    fresh = PartnerTable.build([1, 3], [[3], [1]], torch.tensor([[0.7, 0.3], [0.2, 0.8]]), 6)
    table = fresh.covering_all(previous)
    assert table.anchors.tolist() == [0, 1, 2, 3, 4, 5]
    assert table.partners[:, 0].tolist() == [1, 3, 0, 1, 4, 5]  # fresh rows, then previous, then itself
    assert table.weights[4].tolist() == [1.0, 0.0] and table.weights[1].tolist() == pytest.approx([0.7, 0.3])
    first = fresh.covering_all(None)
    assert first.partners[:, 0].tolist() == [0, 3, 2, 1, 4, 5]
