"""MixNN+'s early-learning regularisation (``--plus-elr``): the running averages against a float64
loop written from ELR's update rule, the penalty against its formula in float64, the refresh
feeding the averages, and the training step adding λ times the penalty."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from mixnn_fast.refresh.early_learning import CLAMP, EarlyLearningTargets
from mixnn_fast.refresh.pool_scores import PoolScores
from mixnn_fast.refresh.targets import soft_targets
from mixnn_fast.train.losses import early_learning_penalty, soft_cross_entropy

E32 = float(torch.finfo(torch.float32).eps)


def reference_update(values: np.ndarray, ids, probabilities: np.ndarray, beta: float) -> None:
    """ELR's rule, row by row in float64: clamp, renormalise, average."""
    for row, sample in enumerate(ids):
        p = np.clip(probabilities[row].astype(np.float64), CLAMP, 1 - CLAMP)
        values[sample] = beta * values[sample] + (1 - beta) * p / p.sum()


@pytest.mark.parametrize("n,c,beta", [(37, 7, 0.7), (5, 2, 0.0), (64, 10, 0.95)])
def test_running_averages_follow_elr_rule(n, c, beta):
    gen = torch.Generator().manual_seed(n * c)
    store = EarlyLearningTargets(n, c, beta=beta)
    want = np.zeros((n, c))
    for _ in range(4):
        ids = torch.randperm(n, generator=gen)[: int(torch.randint(1, n + 1, (1,), generator=gen))]
        # spiky softmaxes, so that the clamp matters for some entries
        probabilities = torch.softmax(torch.randn(len(ids), c, generator=gen) * 8, dim=1)
        store.update(ids, probabilities)
        reference_update(want, ids.tolist(), probabilities.double().numpy(), beta)
        # float32 storage: each update rounds a row of at most 1 a few times
        np.testing.assert_allclose(store.values.double().numpy(), want, rtol=0, atol=16 * E32)
    untouched = np.flatnonzero(~want.any(axis=1))
    assert (store.values[untouched] == 0).all()  # rows never updated stay exactly zero


@pytest.mark.parametrize("k", [0, 1, 3])
def test_mix_weights_the_rows_as_the_images(k):
    gen = torch.Generator().manual_seed(k)
    n, c, b = 23, 5, 9
    store = EarlyLearningTargets(n, c)
    store.update(torch.arange(n), torch.softmax(torch.randn(n, c, generator=gen), dim=1))
    anchors = torch.randint(0, n, (b,), generator=gen)
    partners = torch.randint(0, n, (b, k), generator=gen)
    weights = torch.rand(b, k + 1, generator=gen)
    weights /= weights.sum(1, keepdim=True)
    table = store.values.double().numpy()
    want = np.stack([weights[i, 0].item() * table[anchors[i]] +
                     sum(weights[i, j + 1].item() * table[partners[i, j]] for j in range(k)) for i in range(b)])
    np.testing.assert_allclose(store.mix(anchors, partners, weights).double().numpy(), want, rtol=0,
                               atol=(k + 2) * E32)


@given(n=st.integers(1, 20), c=st.integers(1, 6), bad=st.integers(-5, 40))
def test_ids_out_of_range_are_refused_by_name(n, c, bad):
    store = EarlyLearningTargets(n, c)
    if 0 <= bad < n:
        return
    with pytest.raises(IndexError, match="ids"):
        store.update(torch.tensor([bad]), torch.full((1, c), 1 / c))
    with pytest.raises(IndexError, match="partner_ids"):
        store.mix(torch.tensor([0]), torch.tensor([[bad]]), torch.full((1, 2), 0.5))
    assert (store.values == 0).all()  # nothing written


def test_bad_updates_are_refused_and_change_nothing():
    store = EarlyLearningTargets(4, 3)
    p = torch.full((2, 3), 1 / 3)
    with pytest.raises(TypeError, match="int64"):
        store.update(torch.tensor([0, 1], dtype=torch.int32), p)
    with pytest.raises(ValueError, match="distinct"):
        store.update(torch.tensor([1, 1]), p)
    with pytest.raises(ValueError, match="probabilities"):
        store.update(torch.tensor([0, 1]), torch.full((2, 4), 0.25))
    with pytest.raises(ValueError, match="NaN"):
        store.update(torch.tensor([0, 1]), torch.tensor([[float("nan"), 0.5, 0.5], [1.0, 0.0, 0.0]]))
    assert (store.values == 0).all()
    for beta in (-0.1, 1.0, float("nan"), True):
        with pytest.raises(ValueError, match="beta"):
            EarlyLearningTargets(4, 3, beta=beta)


def test_state_round_trip_and_corrupt_states():
    store = EarlyLearningTargets(6, 3, beta=0.6)
    store.update(torch.arange(6), torch.softmax(torch.randn(6, 3), dim=1))
    other = EarlyLearningTargets(6, 3, beta=0.6)
    other.load_state_dict(store.state_dict())
    assert torch.equal(other.values, store.values)
    for state, named in (({"beta": 0.6, "values": torch.zeros(5, 3)}, "float32"),
                         ({"beta": 0.6, "values": torch.zeros(6, 3, dtype=torch.float64)}, "float32"),
                         ({"beta": 0.7, "values": torch.zeros(6, 3)}, "beta"),
                         ({"beta": 0.6, "values": torch.full((6, 3), float("nan"))}, "NaN")):
        with pytest.raises(ValueError, match=named):
            other.load_state_dict(state)
    assert torch.equal(other.values, store.values)  # a refused state changes nothing


def test_the_refresh_feeds_every_scored_sample_into_the_averages():
    gen = torch.Generator().manual_seed(3)
    n, c, beta = 30, 4, 0.7
    labels = torch.randint(0, c, (n,), generator=gen)
    pool = torch.arange(0, n, 2)
    running = EarlyLearningTargets(n, c, beta=beta)
    scores = PoolScores(pool, soft_targets(labels, c), labels, epoch=1, features_dtype=None, running=running)
    logits = torch.randn(len(pool), c, generator=gen) * 5
    scores.add(pool, logits, torch.zeros(len(pool), 2))
    want = np.zeros((n, c))
    reference_update(want, pool.tolist(), torch.softmax(logits.double(), 1).numpy(), beta)
    np.testing.assert_allclose(running.values.double().numpy(), want, rtol=0, atol=16 * E32)
    assert (running.values[1::2] == 0).all()  # outside the pool: untouched


def reference_penalty(logits: torch.Tensor, running: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits.double(), dim=1).clamp(1e-4, 1 - 1e-4)
    return torch.log1p(-(p * running.double()).sum(1))


@pytest.mark.parametrize("b,c", [(13, 7), (1, 2), (64, 10)])
def test_penalty_equals_its_formula(b, c):
    gen = torch.Generator().manual_seed(b + c)
    logits = torch.randn(b, c, generator=gen) * 3
    running = torch.softmax(torch.randn(b, c, generator=gen), dim=1) * torch.rand(b, 1, generator=gen)
    want = reference_penalty(logits, running)
    s = 1 - torch.exp(want)
    # each p_c is off by (C + 2 + spread) eps relative (float32 softmax), the dot product adds C
    # roundings: s is off by at most (2 C + 4 + spread) eps · s; 1 - s rounds to eps of 1; log(1 - s)
    # moves by those over (1 - s), and rounds to eps of itself
    spread = (logits - logits.max(1, keepdim=True).values).abs().max(1).values.double()
    row_error = ((2 * c + 4 + spread) * E32 * s + E32) / (1 - s) + 2 * E32 * want.abs()
    ours = early_learning_penalty(logits, running, reduction="none")
    assert bool(((ours.double() - want).abs() <= row_error).all())
    torch.testing.assert_close(early_learning_penalty(logits, running).double(), want.mean(), rtol=0,
                               atol=float(row_error.mean()) + (b + 2) * E32 * float(want.abs().mean()))


def test_penalty_pulls_predictions_towards_the_averages_and_is_zero_without_them():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 5, generator=gen, requires_grad=True)
    running = torch.softmax(torch.randn(8, 5, generator=gen) * 4, dim=1)
    agreement = (torch.softmax(logits.detach(), 1) * running).sum()
    early_learning_penalty(logits, running).backward()
    with torch.no_grad():
        stepped = logits - 0.5 * logits.grad
    assert float((torch.softmax(stepped, 1) * running).sum()) > float(agreement)
    zero = torch.zeros(8, 5)
    logits.grad = None
    penalty = early_learning_penalty(logits, zero)
    penalty.backward()
    assert float(penalty.detach()) == 0.0 and bool((logits.grad == 0).all())


def test_the_training_step_adds_lambda_times_the_penalty(tmp_path):
    from mixnn_fast.train.config import TrainConfig
    from mixnn_fast.train.trainer import Trainer

    cfg = TrainConfig(dataset="digits", method="mixnn_plus", plus_elr=3.0, model="small_cnn",
                      model_widths=[8, 16, 16, 16], epochs=2, batch_size=16, progress=False, tensorboard=False,
                      out_dir=str(tmp_path / "run"), num_threads=1)
    trainer = Trainer(cfg)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 1, 8, 8, generator=gen)
    y = torch.softmax(torch.randn(16, 10, generator=gen), dim=1)
    running = torch.softmax(torch.randn(16, 10, generator=gen), dim=1) * 0.9
    trainer.trained.train()
    with torch.no_grad():
        logits = trainer.trained(x.contiguous(memory_format=trainer.memory_format)).float()
    want = soft_cross_entropy(logits, y) + 3.0 * early_learning_penalty(logits, running)
    without = soft_cross_entropy(logits, y)
    got = trainer._step(x, y, 0, 0, 10, running=running)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert abs(float(got) - float(without)) > 1e-3  # the penalty is not negligible here
    trainer.close()


def test_a_mixnn_plus_run_with_elr_fills_the_averages_from_its_refreshes(tmp_path):
    from mixnn_fast.train.config import TrainConfig
    from mixnn_fast.train.trainer import Trainer

    cfg = TrainConfig(dataset="digits", method="mixnn_plus", plus_elr=3.0, model="small_cnn",
                      model_widths=[8, 16, 16, 16], epochs=3, warmup_epochs=1, correction_start=2, batch_size=64,
                      progress=False, tensorboard=False, out_dir=str(tmp_path / "run"), num_threads=1)
    trainer = Trainer(cfg)
    trainer.fit()
    values = trainer.early_targets.values
    # two refreshes (epochs 1 and 2) from zero: every row sums to 1 - beta**2
    torch.testing.assert_close(values.sum(1), torch.full((len(values),), 1 - 0.7 ** 2), rtol=0, atol=1e-5)
    assert float(values.min()) > 0


def test_a_store_over_the_limit_is_refused_before_it_is_allocated(monkeypatch):
    """WebVision's 2.4M x 1000 would be 8.9 GiB of averages: refused by name and size, with no
    allocation attempted (a store at the limit is accepted)."""
    import mixnn_fast.refresh.early_learning as early_learning

    with pytest.raises(ValueError, match=r"--plus-elr .*2,400,000 x 1,000 = 2,400,000,000 entries \(8\.9 GiB\)"):
        EarlyLearningTargets(2_400_000, 1000)
    monkeypatch.setattr(early_learning, "MAX_ELEMENTS", 60)
    assert EarlyLearningTargets(6, 10).values.shape == (6, 10)
    with pytest.raises(ValueError, match="--plus-elr"):
        EarlyLearningTargets(61, 1)


def test_the_cli_refuses_elr_over_the_limit_before_writing(tmp_path, monkeypatch, capsys):
    """Through ``mixnn train``: one line naming the option, exit code 2, no run folder."""
    import mixnn_fast.refresh.early_learning as early_learning
    from mixnn_fast.app.cli import main

    monkeypatch.setattr(early_learning, "MAX_ELEMENTS", 1000)  # digits' training split: 1,437 x 10 entries
    out = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--method", "mixnn_plus", "--plus-elr", "1", "--epochs", "1",
                 "--model-widths", "8", "16", "16", "16", "--num-threads", "1", "--no-progress",
                 "--no-tensorboard", "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--plus-elr" in err and "1,437 x 10 = 14,370 entries" in err and "Traceback" not in err
    assert not out.exists()
