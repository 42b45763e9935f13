"""Losses against float64 formulas written independently, and against torch's own cross-entropy."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from mixnn_fast.train.losses import (generalized_cross_entropy, one_hot, soft_cross_entropy,
                                     symmetric_cross_entropy)


def random_problem(seed: int, batch: int = 13, classes: int = 7):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, generator=gen) * 3
    labels = torch.randint(0, classes, (batch,), generator=gen)
    soft = torch.softmax(torch.randn(batch, classes, generator=gen), dim=1)
    return logits, labels, soft


@pytest.mark.parametrize("seed", range(5))
def test_soft_cross_entropy_equals_torch(seed):
    logits, labels, soft = random_problem(seed)
    torch.testing.assert_close(soft_cross_entropy(logits, one_hot(labels, 7)), F.cross_entropy(logits, labels))
    torch.testing.assert_close(soft_cross_entropy(logits, soft), F.cross_entropy(logits, soft))


@pytest.mark.parametrize("q", [0.1, 0.7, 1.0])
def test_gce_matches_formula(q):
    logits, labels, _ = random_problem(1)
    p_y = torch.softmax(logits.double(), 1).gather(1, labels[:, None]).squeeze(1)
    want = ((1 - p_y ** q) / q).mean().float()
    torch.testing.assert_close(generalized_cross_entropy(logits, one_hot(labels, 7), q=q), want)


def test_gce_tends_to_ce_as_q_vanishes():
    logits, labels, _ = random_problem(2)
    ce = F.cross_entropy(logits, labels)
    assert abs(float(generalized_cross_entropy(logits, one_hot(labels, 7), q=1e-4)) - float(ce)) < 1e-2 * float(ce)


def test_sce_matches_formula():
    logits, labels, _ = random_problem(3)
    alpha, beta = 0.1, 1.0
    p = torch.softmax(logits.double(), 1)
    ce = F.cross_entropy(logits.double(), labels)
    rce = (-torch.log(torch.tensor(1e-4, dtype=torch.float64)) * (1 - p.gather(1, labels[:, None]).squeeze(1))).mean()
    want = (alpha * ce + beta * rce).float()
    torch.testing.assert_close(symmetric_cross_entropy(logits, one_hot(labels, 7), alpha, beta), want,
                               rtol=1e-4, atol=1e-4)


@given(b=st.integers(1, 5), c=st.integers(2, 6), extra=st.integers(1, 3))
def test_shape_mismatch_raises(b, c, extra):
    with pytest.raises(ValueError, match="targets"):
        soft_cross_entropy(torch.zeros(b, c), torch.zeros(b, c + extra))
    with pytest.raises(ValueError, match="logits"):
        generalized_cross_entropy(torch.zeros(b), torch.zeros(b))


def test_gce_rejects_bad_q():
    with pytest.raises(ValueError, match="q"):
        generalized_cross_entropy(torch.zeros(2, 3), torch.full((2, 3), 1 / 3), q=0.0)
