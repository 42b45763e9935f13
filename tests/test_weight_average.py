"""MixNN+'s weight average (``plus_average_last``): which epochs join it, that the tested model is
the mean of those epochs' weights (a float64 mean of recorded snapshots as the reference), and
that the model being trained is left alone."""
from __future__ import annotations

import pytest
import torch
from test_trainer import tiny_config

from mixnn_fast.train.config import TrainConfig
from mixnn_fast.train.methods import joins_average
from mixnn_fast.train.trainer import Trainer

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def record_epoch_ends(trainer: Trainer, *, floating_only: bool) -> dict[int, dict[str, torch.Tensor]]:
    """Fill, as ``trainer`` trains, epoch -> the model's state at that epoch's end, as float64 on
    the CPU (the reference means are taken in float64); ``floating_only`` leaves out the integer
    BatchNorm counters."""
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    train_epoch = trainer.train_epoch

    def recording(epoch):
        row = train_epoch(epoch)
        snapshots[epoch] = {k: v.detach().cpu().double().clone() for k, v in trainer.model.state_dict().items()
                            if v.is_floating_point() or not floating_only}
        return row

    trainer.train_epoch = recording
    return snapshots


@pytest.mark.parametrize("epochs,share,restart,joining", [
    (60, 0.25, 2, {46, 48, 50, 52, 54, 56, 58, 60}),  # the table: the last quarter's eight cycle ends
    (40, 0.25, 2, {32, 34, 36, 38, 40}),
    (5, 0.9, 2, {2, 4}),
    (10, 0.3, 3, {9}),
    (7, 0.5, 1, {4, 5, 6, 7}),  # the last round(3.5) = 4 epochs
    (60, 0.0, 2, set()),
])
def test_the_warm_restarts_of_the_last_share_join_the_average(epochs, share, restart, joining):
    cfg = TrainConfig(method="mixnn_plus", epochs=epochs, restart_period=restart, plus_average_last=share)
    assert {e + 1 for e in range(epochs) if joins_average(cfg, e)} == joining


def test_only_mixnn_plus_averages():
    for method in ("ce", "mixup", "gce", "sce", "mixnn"):
        assert not any(joins_average(TrainConfig(method=method), e) for e in range(60))


def test_the_tested_model_is_the_mean_of_the_cycle_end_weights(tmp_path):
    # six epochs, restarts every 2, the last half: the ends of epochs 4 and 6 (0-based 3 and 5) join
    # the statistics averaged with the weights (plus_average_bn "recomputed" replaces them: test_batchnorm_statistics.py)
    cfg = tiny_config(tmp_path, method="mixnn_plus", epochs=6, plus_average_last=0.5, plus_average_bn="averaged",
                      eval_every=1, num_threads=1)
    trainer = Trainer(cfg)
    snapshots = record_epoch_ends(trainer, floating_only=True)
    trainer.fit()
    averaged = trainer.averaged.module.state_dict()
    assert int(trainer.averaged.n_averaged) == 2
    for name, last in snapshots[5].items():  # weights and BatchNorm's running statistics alike
        torch.testing.assert_close(averaged[name].double(), (snapshots[3][name] + last) / 2, rtol=1e-6, atol=1e-7)
    # the model being trained is not the average: it ends where its last epoch left it
    live = trainer.model.state_dict()
    assert all(torch.equal(live[name].double(), last) for name, last in snapshots[5].items())
    rows = trainer.metrics.rows
    assert [r.get("weights_averaged") for r in rows] == [None, None, None, 1, 1, 2]
    final = rows[-1]
    assert final["live_test_accuracy"] == trainer._accuracy(trainer.loaders.test, trainer.data.test, live=True)
    # the tested accuracy is the average's: the same model's weights in the trained model give it
    trainer.model.load_state_dict(trainer.averaged.module.state_dict())
    assert final["test_accuracy"] == trainer._accuracy(trainer.loaders.test, trainer.data.test, live=True)
    assert final["test_accuracy"] != final["live_test_accuracy"]
    trainer.close()


def test_averaging_changes_no_step_of_training(tmp_path):
    """The same run without the average: every training number and the model itself equal, to the bit."""
    runs = {}
    for share in (0.0, 0.5):
        cfg = tiny_config(tmp_path / str(share), method="mixnn_plus", epochs=4, restart_period=1,
                          plus_average_last=share, eval_every=1, num_threads=1)
        trainer = Trainer(cfg)
        trainer.fit()
        runs[share] = (trainer.metrics.rows, trainer.model.state_dict())
        trainer.close()
    (plain_rows, plain_model), (averaged_rows, averaged_model) = runs[0.0], runs[0.5]
    clocked = ("_seconds", "images_per_second", "_fraction")
    for plain, averaged in zip(plain_rows, averaged_rows, strict=True):
        for key, value in plain.items():
            if key.endswith(clocked) or key == "test_accuracy":
                continue
            assert averaged[key] == value, key
        # the model itself, tested beside the average, is the run without it
        assert averaged.get("live_test_accuracy", averaged["test_accuracy"]) == plain["test_accuracy"]
    assert [r.get("weights_averaged") for r in averaged_rows] == [None, None, 1, 2]
    assert all(torch.equal(averaged_model[k], v) for k, v in plain_model.items())


@pytest.mark.parametrize("device", DEVICES)
def test_the_average_takes_every_tensor_on_every_device(tmp_path, device):
    """On CUDA, torch's default averages whole dtype groups with foreach kernels, which refused the
    integer BatchNorm counter (a crash at the first average on an H200): every float tensor must be
    the mean of the cycle-end snapshots there too, and the counter a count."""
    cfg = tiny_config(tmp_path, method="mixnn_plus", epochs=4, restart_period=1, plus_average_last=0.5,
                      plus_average_bn="averaged", eval_every=1, num_threads=1, device=device)
    trainer = Trainer(cfg)
    snapshots = record_epoch_ends(trainer, floating_only=False)
    trainer.fit()
    assert int(trainer.averaged.n_averaged) == 2  # the ends of epochs 3 and 4
    averaged = {k: v.cpu() for k, v in trainer.averaged.module.state_dict().items()}
    counters = [k for k, v in averaged.items() if not v.is_floating_point()]
    assert counters, "the model has BatchNorm counters: the case this test is about"
    for name, value in averaged.items():
        mean = (snapshots[2][name] + snapshots[3][name]) / 2
        if value.is_floating_point():
            torch.testing.assert_close(value.double(), mean, rtol=1e-6, atol=1e-7)
        else:  # SWA's mean of two counts, truncated to the counter's integer type
            assert int(value) == int(mean), name
    trainer.close()
