"""MixNN+'s class-balance penalty (``--plus-prior``) against scipy's KL divergence in float64 on
fresh random inputs of odd sizes, its gradient against float64 autograd, its input validation,
the training step that adds it (only where the epoch mixes with the refresh's partners), and the
label-free ``prediction_share_gap`` every refresh logs, against a plain numpy count."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.stats import entropy

from mixnn_fast.refresh.noise_structure import prediction_share_gap
from mixnn_fast.train.losses import class_balance_penalty, soft_cross_entropy


def reference_penalty(logits: np.ndarray, prior: np.ndarray) -> float:
    """KL(π ‖ p̄) by another route: scipy's relative entropy of float64 softmax means."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return float(entropy(prior.astype(np.float64), p.mean(0)))


@pytest.mark.parametrize("batch, classes, zeros", [(1, 2, 0), (3, 7, 1), (13, 10, 0), (64, 10, 3), (129, 100, 17)])
def test_matches_scipy_on_random_inputs(batch, classes, zeros):
    rng = np.random.default_rng(batch * 101 + classes)
    logits = rng.normal(size=(batch, classes)) * 3
    prior = rng.dirichlet(np.ones(classes))
    prior[rng.choice(classes, size=zeros, replace=False)] = 0.0  # classes the labels never name: 0 log 0 = 0
    prior /= prior.sum()
    ours = class_balance_penalty(torch.from_numpy(logits).float(), torch.from_numpy(prior).float())
    # float32 inputs: the softmax and its mean are off by ~C eps relative, the log by as much absolute
    assert float(ours) == pytest.approx(reference_penalty(logits.astype(np.float32), prior.astype(np.float32)),
                                        abs=1e-5 * classes)


def test_gradient_matches_float64_autograd():
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(17, 9, generator=gen) * 2
    prior = torch.softmax(torch.randn(9, generator=gen), 0)
    ours = logits.clone().requires_grad_(True)
    class_balance_penalty(ours, prior).backward()
    ref = logits.double().clone().requires_grad_(True)
    mean = torch.softmax(ref, 1).mean(0)
    (prior.double() * (prior.double() / mean).log()).sum().backward()
    torch.testing.assert_close(ours.grad.double(), ref.grad, rtol=1e-4, atol=1e-6)


def test_zero_where_the_mean_prediction_is_the_prior_and_positive_elsewhere():
    prior = torch.tensor([0.5, 0.3, 0.2])
    logits = prior.log().repeat(5, 1)  # every row predicts exactly the prior
    assert abs(float(class_balance_penalty(logits, prior))) < 1e-6
    collapsed = torch.tensor([[9.0, 0.0, 0.0]] * 5)  # everything on one class
    assert float(class_balance_penalty(collapsed, prior)) > 1.0


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 6), c=st.integers(2, 6), wrong=st.sampled_from(["prior_length", "logits_dims"]))
def test_refuses_bad_shapes_by_name(b, c, wrong):
    logits, prior = torch.zeros(b, c), torch.full((c,), 1.0 / c)
    if wrong == "prior_length":
        prior, match = torch.full((c + 1,), 1.0 / (c + 1)), "prior: expected shape"
    else:
        logits, match = torch.zeros(b, c, 1), "logits: expected"
    with pytest.raises(ValueError, match=match):
        class_balance_penalty(logits, prior)


def _trainer(tmp_path, plus_prior: float):
    from mixnn_fast.train.config import TrainConfig
    from mixnn_fast.train.trainer import Trainer

    cfg = TrainConfig(dataset="digits", method="mixnn_plus", plus_prior=plus_prior, model="small_cnn",
                      model_widths=[8, 16, 16, 16], epochs=2, batch_size=16, progress=False, tensorboard=False,
                      out_dir=str(tmp_path / f"run{plus_prior}"), num_threads=1)
    return Trainer(cfg)


def test_the_step_adds_lambda_times_the_penalty_only_where_asked(tmp_path):
    trainer = _trainer(tmp_path, 2.0)
    counts = np.bincount(trainer.given_labels.numpy(), minlength=10)
    torch.testing.assert_close(trainer.class_prior, torch.from_numpy(counts / counts.sum()).float())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 1, 8, 8, generator=gen)
    y = torch.softmax(torch.randn(16, 10, generator=gen), dim=1)
    trainer.trained.train()
    with torch.no_grad():
        logits = trainer.trained(x.contiguous(memory_format=trainer.memory_format)).float()
    plain = soft_cross_entropy(logits, y)
    want = plain + 2.0 * class_balance_penalty(logits, trainer.class_prior)
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    got = trainer._step(x, y, 0, 0, 10, balance=True)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert abs(float(got) - float(plain)) > 1e-3  # the penalty is not negligible here
    trainer.model.load_state_dict(state)
    torch.testing.assert_close(trainer._step(x, y, 0, 0, 10, balance=False), plain, rtol=1e-6, atol=1e-6)
    trainer.close()
    off = _trainer(tmp_path, 0.0)
    assert off.class_prior is None
    off.close()


def test_warm_up_epochs_are_untouched_and_later_ones_differ(tmp_path):
    """The penalty acts from the first epoch that mixes with the refresh's partners: a run with it
    trains the warm-up exactly as a run without it does, and differs after."""
    from mixnn_fast.train.config import TrainConfig
    from mixnn_fast.train.trainer import Trainer

    losses = {}
    for prior in (0.0, 1.0):
        cfg = TrainConfig(dataset="digits", method="mixnn_plus", plus_prior=prior, model="small_cnn",
                          model_widths=[8, 16, 16, 16], epochs=3, warmup_epochs=1, correction_start=2,
                          batch_size=64, progress=False, tensorboard=False, out_dir=str(tmp_path / f"r{prior}"),
                          num_threads=1)
        trainer = Trainer(cfg)
        trainer.fit()
        losses[prior] = [r["train_loss"] for r in trainer.metrics.rows if "train_loss" in r]
        trainer.close()
    assert losses[0.0][0] == losses[1.0][0]
    assert losses[0.0][1:] != losses[1.0][1:]


def reference_gap(given_labels: np.ndarray, predicted: np.ndarray, c: int) -> float:
    n = len(given_labels)
    return 0.5 * sum(abs(np.sum(given_labels == k) - np.sum(predicted == k)) / n for k in range(c))


@pytest.mark.parametrize("n, c", [(1, 2), (7, 3), (203, 10), (4099, 37)])
def test_share_gap_matches_a_plain_count(n, c):
    rng = np.random.default_rng(n + c)
    given_labels = rng.integers(0, c, n)
    predicted = np.where(rng.random(n) < 0.5, given_labels, rng.integers(0, max(1, c // 3), n))
    ours = prediction_share_gap(torch.from_numpy(given_labels), torch.from_numpy(predicted), c)
    assert ours == pytest.approx(reference_gap(given_labels, predicted, c), abs=1e-12)


def test_share_gap_extremes_and_refusals():
    labels = torch.arange(10).repeat(3)
    assert prediction_share_gap(labels, labels.flip(0), 10) == 0.0  # a permutation keeps every share
    assert prediction_share_gap(labels, torch.zeros(30, dtype=torch.int64), 10) == pytest.approx(0.9)
    assert prediction_share_gap(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), 3) == 0.0
    with pytest.raises(ValueError, match="predicted: labels must lie"):
        prediction_share_gap(labels, labels + 1, 10)


def test_the_cli_refuses_it_outside_mixnn_plus(tmp_path, capsys):
    from mixnn_fast.app.cli import main

    out = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--method", "mixnn", "--plus-prior", "2", "--epochs", "1",
                 "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "plus_prior" in err and "mixnn_plus" in err and "Traceback" not in err
    assert not out.exists()
