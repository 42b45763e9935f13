"""Losses against float64 formulas written independently, and against torch's own cross-entropy."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from mixnn_fast.train.losses import (generalized_cross_entropy, one_hot, soft_cross_entropy,
                                     symmetric_cross_entropy)


E32 = torch.finfo(torch.float32).eps


def log_softmax_error(logits: torch.Tensor) -> torch.Tensor:
    """Per row, how far a float32 log_softmax entry may be off (absolute): z_c - max rounds to eps of
    |z_c - max|, the sum of C exponentials to C eps (relative, so absolute in its log), the log and
    the final subtraction to eps of their results (|log p| <= spread + log C < spread + C)."""
    spread = (logits - logits.max(1, keepdim=True).values).abs().max(1).values.double()
    return E32 * (2 * logits.shape[1] + 2 * spread)


def softmax_relative_error(logits: torch.Tensor) -> torch.Tensor:
    """Per row, the relative error of a float32 softmax entry: exp's argument (eps / 2 of the
    spread) and result, a sum of C positive terms (C eps / 2), the division."""
    spread = (logits - logits.max(1, keepdim=True).values).abs().max(1).values.double()
    return E32 * (logits.shape[1] / 2 + 2 + spread)


def random_problem(seed: int, batch: int = 13, classes: int = 7):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, generator=gen) * 3
    labels = torch.randint(0, classes, (batch,), generator=gen)
    soft = torch.softmax(torch.randn(batch, classes, generator=gen), dim=1)
    return logits, labels, soft


@pytest.mark.parametrize("seed", range(5))
def test_soft_cross_entropy_equals_torch(seed):
    logits, labels, soft = random_problem(seed)
    # two float32 computations of a mean of -sum t log p (sum t = 1): each within the rows'
    # log_softmax error and a rounding of the loss per operation on it (a sum of C, a mean of B)
    for targets, theirs in ((one_hot(labels, 7), F.cross_entropy(logits, labels)),
                            (soft, F.cross_entropy(logits, soft))):
        ours = soft_cross_entropy(logits, targets)
        atol = 2 * float(log_softmax_error(logits).max()) + (7 + 13) * E32 * abs(float(theirs))
        torch.testing.assert_close(ours, theirs, rtol=0, atol=atol)


@pytest.mark.parametrize("q", [0.1, 0.7, 1.0])
def test_gce_matches_formula(q):
    logits, labels, _ = random_problem(1)
    p_y = torch.softmax(logits.double(), 1).gather(1, labels[:, None]).squeeze(1)
    want = ((1 - p_y ** q) / q).mean().float()
    # p off by rho relative moves (1 - p^q) / q by p^q rho <= rho; pow and the subtraction round
    # to eps of 1, i.e. eps / q after the division; the mean of B and the comparison's float32 want
    # add eps of the result each
    rho = softmax_relative_error(logits)
    atol = float((rho + 2 * E32 / q).max()) + (13 + 2) * E32 * float(want)
    torch.testing.assert_close(generalized_cross_entropy(logits, one_hot(labels, 7), q=q), want, rtol=0, atol=atol)


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
    # RCE sums the C - 1 other probabilities, each clamped from below at 1e-7 (the reference
    # does not clamp: up to (C - 1) 1e-7 x |log 1e-4| apart) and each off by rho relative; CE as above
    a = -torch.log(torch.tensor(1e-4, dtype=torch.float64)).item()
    rho = float(softmax_relative_error(logits).max())
    atol = (alpha * float(log_softmax_error(logits).max()) + beta * a * (rho + 6 * E32 + 6 * 1e-7)
            + (13 + 2) * E32 * float(want))
    torch.testing.assert_close(symmetric_cross_entropy(logits, one_hot(labels, 7), alpha, beta), want,
                               rtol=0, atol=atol)


@given(b=st.integers(1, 5), c=st.integers(2, 6), extra=st.integers(1, 3))
def test_shape_mismatch_raises(b, c, extra):
    with pytest.raises(ValueError, match="targets"):
        soft_cross_entropy(torch.zeros(b, c), torch.zeros(b, c + extra))
    with pytest.raises(ValueError, match="logits"):
        generalized_cross_entropy(torch.zeros(b), torch.zeros(b))


def test_gce_rejects_bad_q():
    with pytest.raises(ValueError, match="q"):
        generalized_cross_entropy(torch.zeros(2, 3), torch.full((2, 3), 1 / 3), q=0.0)
