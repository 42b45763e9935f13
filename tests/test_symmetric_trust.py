"""MixNN+'s trusted anchors where the noise looks symmetric (``plus_symmetric_trust``, on by
default): what the refresh is asked to do, and that a run with the default computes exactly what
the explicit options compute (``--weights trust --trust-min-agreement 0.5 --trust-min-spread
0.35``), the configuration the held-out rule judged."""
from __future__ import annotations

import pytest
import torch

from mixnn_fast.train.config import TrainConfig
from mixnn_fast.train.methods import SYMMETRIC_SPREAD, TRUST_MIN_AGREEMENT, refresh_options

EXPLICIT = dict(weights="trust", trust_min_agreement=0.5, trust_min_spread=0.35, plus_symmetric_trust=False)


@pytest.mark.parametrize("settings, expected", [
    (dict(method="mixnn_plus"), ("trust", 0.5, 0.35)),
    (dict(method="mixnn_plus", **EXPLICIT), ("trust", 0.5, 0.35)),
    (dict(method="mixnn_plus", plus_symmetric_trust=False), ("gmm", 0.0, 0.0)),
    (dict(method="mixnn_plus", plus_correction="all"), ("trust", 0.5, 0.35)),  # acts with any correction
    (dict(method="mixnn_plus", weights="trust", trust_min_agreement=0.7), ("trust", 0.7, 0.0)),  # the user's own
    (dict(method="mixnn_plus", weights="avg"), ("avg", 0.0, 0.0)),
    (dict(method="mixnn_plus", partners="random"), ("gmm", 0.0, 0.0)),
    (dict(method="mixnn"), ("gmm", 0.0, 0.0)),  # the paper's MixNN stays as it is
])
def test_the_refresh_trusts_anchors_only_for_mixnn_plus_with_the_gmm_weights(settings, expected):
    options = refresh_options(TrainConfig(**settings), threads=1)
    assert (options.weights_mode, options.trust_min_agreement, options.trust_min_spread) == expected
    assert (TRUST_MIN_AGREEMENT, SYMMETRIC_SPREAD) == (0.5, 0.35)  # the values the rule judged


def gates_opening_config(out_dir, **settings) -> TrainConfig:
    """MixNN+ on digits at sym-20, at a budget where the model learns enough for the label-free
    gates (agreement with the given labels, disagreement spread) to open at some refreshes, not
    all (tests/test_neighbour_guard.py uses it too)."""
    return TrainConfig(dataset="digits", train_subset=500, noise="symmetric_uniform", noise_rate=0.2,
                       model="small_cnn", model_widths=[16, 32, 32, 32], method="mixnn_plus", epochs=8,
                       warmup_epochs=4, correction_start=4, restart_period=2, batch_size=16, lr=0.1, lr_min=0.001,
                       progress=False, tensorboard=False, out_dir=str(out_dir), num_threads=1, seed=5, **settings)


def _run(tmp_path, name, **settings):
    from mixnn_fast.train.trainer import Trainer

    trainer = Trainer(gates_opening_config(tmp_path / name, **settings))
    trainer.fit()
    return trainer


def test_the_default_computes_what_the_explicit_options_compute_and_differs_from_off(tmp_path):
    default = _run(tmp_path, "default")
    explicit = _run(tmp_path, "explicit", **EXPLICIT)
    off = _run(tmp_path, "off", plus_symmetric_trust=False)

    def logged(trainer, key):
        return [r[key] for r in trainer.metrics.rows if key in r]

    trusted = logged(default, "anchors_trusted")
    assert trusted and any(trusted), "no refresh trusted its anchors: the run cannot tell the settings apart"
    assert trusted == logged(explicit, "anchors_trusted")
    assert logged(off, "anchors_trusted") == []
    # each trusted refresh had most predictions agree and a symmetric-looking spread
    refreshes = [r for r in default.metrics.rows if "anchors_trusted" in r]
    for row in refreshes:
        opened = row["given_label_agreement"] >= 0.5 and row["disagreement_spread"] >= 0.35
        assert row["anchors_trusted"] == float(opened)
    assert logged(default, "train_loss") == logged(explicit, "train_loss")  # bit for bit
    for a, b in zip(default.model.state_dict().values(), explicit.model.state_dict().values()):
        assert torch.equal(a, b)
    assert logged(default, "train_loss") != logged(off, "train_loss")


def test_saved_runs_without_the_setting_are_read_with_it_off():
    saved = TrainConfig(method="mixnn_plus").to_dict()
    del saved["plus_symmetric_trust"]
    assert TrainConfig.from_saved(saved).plus_symmetric_trust is False
    assert TrainConfig.from_dict({"method": "mixnn_plus"}).plus_symmetric_trust is True


def test_the_cli_switches_it_off(tmp_path):
    from mixnn_fast.app.cli import build_parser

    args = build_parser().parse_args(["train", "--no-plus-symmetric-trust", "--out-dir", str(tmp_path / "r")])
    assert args.plus_symmetric_trust is False
