"""TrainConfig refuses every bad setting up front, by name — from Python, YAML and the CLI."""
from __future__ import annotations

import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixnn_fast.train.config import RESUMABLE_FIELDS, TrainConfig

FIELDS = TrainConfig.field_names()

any_value = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.integers(-5, 300), max_size=6), st.dictionaries(st.text(max_size=4),
                                                                                        st.integers(), max_size=2))


def _names_a_field(message: str, values: dict) -> bool:
    return any(name in message for name in values) or "lr / lr_min" in message or "sce_alpha" in message


@given(values=st.dictionaries(st.sampled_from(FIELDS), any_value, min_size=1, max_size=5))
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_any_mapping_of_settings_is_a_config_or_an_error_naming_a_field(values):
    try:
        cfg = TrainConfig.from_dict(values, source="test")
    except (TypeError, ValueError) as exc:
        assert str(exc).startswith("test: ")
        assert _names_a_field(str(exc), values), exc
        return
    # accepted: every value is what it says, and the config survives its own round trip
    for name, value in values.items():
        assert getattr(cfg, name) == value or (isinstance(value, float) and math.isnan(value))
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@given(data=st.one_of(st.text(max_size=200).map(str.encode), st.binary(max_size=200)))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_yaml_file_is_a_config_or_an_error_naming_the_file(tmp_path, data):
    """Text that may be YAML, and bytes that may not even be UTF-8."""
    path = tmp_path / "run.yaml"
    path.write_bytes(data)
    try:
        TrainConfig.from_yaml(path)
    except (TypeError, ValueError) as exc:
        assert str(path) in str(exc)


@pytest.mark.parametrize("field,value,message", [
    ("neighbour_backend", "annoy", "neighbour_backend: must be one of auto, hnsw, exact, faiss"),
    ("weights", "median", "weights: must be one of"),
    ("model", "resnet9000", "model: must be one of"),
    ("noise", "sym", "noise: must be one of"),
    ("noise", "custom", "noise: must be one of"),  # needs a transition matrix: not a config value
    ("device", "gpu", "device: must be auto, cpu, cuda or cuda:<index>"),
    ("device", "cuda:x", "device: must be"),
    ("on_error", "ignore", "on_error: must be one of raise, skip"),
    ("epochs", "10", "epochs: expected int"),
    ("epochs", True, "epochs: expected int"),
    ("lr", float("inf"), "lr: must be a finite number"),
    ("num_threads", 0, "num_threads: must be >= 1"),
    ("checkpoint_every_steps", 0, "checkpoint_every_steps: must be >= 1"),
    ("momentum", 1.0, "momentum: must lie in [0, 1)"),
    ("gce_q", 0.0, "gce_q: must lie in (0, 1]"),
    ("model_widths", [8, 0], "model_widths: expected positive"),
    ("seed", -1, "seed: must be >= 0"),
])
def test_bad_settings_are_refused_by_name(field, value, message):
    with pytest.raises((TypeError, ValueError), match=message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")):
        TrainConfig(**{field: value})


def test_every_enum_field_is_checked():
    """Each field whose annotation is a string chosen from a fixed set is refused when unknown
    (a field added later without a check fails here)."""
    free_text = {"data_root", "test_root", "weights_path", "out_dir", "model", "device"}
    for name in FIELDS:
        if name in free_text or not isinstance(getattr(TrainConfig(), name), str):
            continue
        with pytest.raises(ValueError, match=name):
            TrainConfig(**{name: "no-such-choice"})


def test_resumable_fields_are_fields():
    assert set(RESUMABLE_FIELDS) <= set(FIELDS)
    assert TrainConfig(epochs=5).experiment_differences(TrainConfig(epochs=9, progress=False)) == []
    assert TrainConfig(method="ce").experiment_differences(TrainConfig()) == ["method"]


def test_yaml_round_trip(tmp_path):
    cfg = TrainConfig(method="gce", model_widths=[8, 16, 16, 16], checkpoint_every_steps=50)
    cfg.save_yaml(tmp_path / "c.yaml")
    assert TrainConfig.from_yaml(tmp_path / "c.yaml") == cfg
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["method"] == "gce"


def test_cli_refuses_a_bad_config_file_before_writing(tmp_path, capsys):
    from mixnn_fast.app.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: ten\nmethod: mixnn\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(bad), "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "epochs" in err
    assert not out.exists()


def test_saved_settings_read_fields_they_predate_with_the_old_value():
    """A config saved before ``plus_freeze`` existed ran without a freeze, whatever the default
    is now; a saved value is kept; a user's settings (from_dict) get today's default."""
    from mixnn_fast.train.config import ADDED_AFTER_SAVED_RUNS

    saved = TrainConfig(method="mixnn_plus").to_dict()
    for name in ADDED_AFTER_SAVED_RUNS:
        del saved[name]
    old = TrainConfig.from_saved(saved)
    assert all(getattr(old, k) == v for k, v in ADDED_AFTER_SAVED_RUNS.items())
    assert TrainConfig.from_saved({**saved, "plus_freeze": 4}).plus_freeze == 4
    assert TrainConfig.from_dict(saved).plus_freeze == TrainConfig().plus_freeze
    with pytest.raises(ValueError, match="plus_freeze"):
        TrainConfig.from_saved({**saved, "plus_freeze": -1})


@pytest.mark.parametrize("flags", [["--method", "ce", "--plus-split-check"],
                                   ["--method", "mixnn", "--plus-gmm-per-class"],
                                   ["--method", "mixnn_plus", "--trust-min-agreement", "0.5"],
                                   ["--method", "mixnn_plus", "--weights", "trust", "--trust-min-agreement", "1.5"],
                                   ["--method", "mixnn_plus", "--trust-min-spread", "0.35"],
                                   ["--method", "mixnn_plus", "--weights", "trust", "--trust-min-spread", "-0.1"],
                                   ["--method", "mixnn", "--plus-vote", "5"],
                                   ["--method", "mixnn_plus", "--partners", "random", "--plus-vote", "5"],
                                   ["--method", "mixnn_plus", "--plus-vote", "-1"],
                                   ["--method", "mixnn", "--plus-neighbour-guard", "10"],
                                   ["--method", "mixnn_plus", "--partners", "random", "--plus-neighbour-guard", "10"],
                                   ["--method", "mixnn_plus", "--plus-correction", "all",
                                    "--plus-neighbour-guard", "10"],
                                   ["--method", "mixnn_plus", "--plus-consistent", "0", "--plus-neighbour-guard", "10"],
                                   ["--method", "mixnn_plus", "--plus-neighbour-guard", "-1"],
                                   ["--method", "mixnn", "--plus-freeze", "2"],
                                   ["--method", "mixnn_plus", "--plus-correction", "all", "--plus-freeze", "2"],
                                   ["--method", "mixnn_plus", "--plus-correction", "graded", "--plus-freeze", "2"],
                                   ["--method", "mixnn_plus", "--plus-freeze", "-1"],
                                   ["--method", "mixnn", "--plus-elr", "3"],
                                   ["--method", "mixnn_plus", "--plus-elr", "-1"],
                                   ["--method", "mixnn_plus", "--plus-elr", "nan"],
                                   ["--method", "gce", "--plus-prior", "2"],
                                   ["--method", "mixnn_plus", "--plus-prior", "-0.5"],
                                   ["--method", "mixnn_plus", "--plus-prior", "inf"],
                                   ["--method", "mixnn_plus", "--elr-beta", "0.5"],
                                   ["--method", "mixnn_plus", "--elr-beta", "1", "--plus-elr", "3"],
                                   ["--method", "mixnn", "--plus-warmup-max", "12"],
                                   ["--method", "mixnn_plus", "--plus-warmup-max", "-1"],
                                   ["--method", "mixnn_plus", "--warmup-epochs", "5", "--plus-warmup-max", "4"],
                                   ["--method", "mixnn_plus", "--correction-start", "12", "--plus-warmup-max", "13"],
                                   ["--method", "mixnn_plus", "--authors-schedule", "--plus-warmup-max", "12"],
                                   ["--method", "mixnn", "--plus-consistent", "3"],
                                   ["--method", "mixnn_plus", "--plus-consistent", "-1"],
                                   ["--method", "mixnn_plus", "--plus-correction", "all", "--plus-consistent", "3"],
                                   ["--method", "mixnn_plus", "--plus-consistent-min-agreement", "0.7",
                                    "--plus-consistent", "0"],
                                   ["--method", "mixnn", "--plus-consistent-min-agreement", "0.7"],
                                   ["--method", "mixnn_plus", "--plus-consistent-min-agreement", "1.5",
                                    "--plus-consistent", "2"],
                                   ["--method", "mixnn_plus", "--plus-consistent-min-agreement", "nan",
                                    "--plus-consistent", "2"],
                                   ["--method", "mixnn_plus", "--plus-split-check-min-agreement", "0.5"],
                                   ["--method", "mixnn_plus", "--plus-split-check", "--plus-split-check-min-agreement",
                                    "1.5"],
                                   ["--method", "mixnn_plus", "--plus-split-check", "--plus-split-check-min-agreement",
                                    "-0.1"],
                                   ["--method", "mixnn", "--plus-min-confidence", "0.7"],
                                   ["--method", "mixnn_plus", "--plus-consistent", "0", "--plus-min-confidence", "0.7"],
                                   ["--method", "mixnn_plus", "--plus-correction", "graded", "--plus-consistent", "0",
                                    "--plus-min-confidence", "0.7"],
                                   ["--method", "mixnn_plus", "--plus-min-confidence", "1.5"],
                                   ["--method", "mixnn_plus", "--plus-min-confidence", "nan"],
                                   ["--method", "mixnn", "--plus-average-last", "0.5"],
                                   ["--method", "mixnn_plus", "--plus-average-last", "1"],
                                   ["--method", "mixnn_plus", "--plus-average-last", "-0.25"],
                                   ["--method", "mixnn_plus", "--plus-average-last", "nan"],
                                   ["--method", "mixnn_plus", "--plus-average-bn", "fresh"]])
def test_cli_refuses_a_mixnn_plus_option_that_cannot_apply_before_writing(tmp_path, capsys, flags):
    from mixnn_fast.app.cli import main

    out = tmp_path / "run"
    # one epoch: an option that were wrongly accepted fails here in seconds instead of training for minutes
    assert main(["train", "--dataset", "digits", "--epochs", "1", *flags, "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    setting = next(f[2:].replace("-", "_") for f in flags
                   if f in ("--plus-vote", "--plus-neighbour-guard", "--plus-freeze", "--plus-split-check",
                            "--plus-gmm-per-class",
                            "--trust-min-agreement", "--trust-min-spread", "--plus-elr", "--plus-prior",
                            "--elr-beta", "--plus-warmup-max", "--plus-consistent",
                            "--plus-consistent-min-agreement", "--plus-split-check-min-agreement",
                            "--plus-min-confidence", "--plus-average-bn", "--plus-average-last"))
    assert setting in err and "Traceback" not in err
    assert not out.exists()


def test_a_named_fashion_mnist_folder_that_is_missing_is_an_error_not_the_digits(tmp_path, capsys):
    """Only Fashion-MNIST's default location falls back to scikit-learn's digits (a machine
    without Debian's package); a folder the user named and mistyped is reported, nothing written."""
    from mixnn_fast.app.cli import main

    out, missing = tmp_path / "run", tmp_path / "fashoin"
    assert main(["train", "--data-root", str(missing), "--epochs", "1", "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "data_root" in err and str(missing) in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("method, correction, acts", [("mixnn_plus", "selective", True), ("mixnn_plus", "all", False),
                                                      ("mixnn", "selective", False), ("gce", "selective", False)])
def test_on_by_default_settings_count_only_where_they_act(method, correction, acts):
    """MixNN+'s on-by-default settings are accepted at their default with any method, and two runs
    that differ only in them are one experiment where they cannot act."""
    from mixnn_fast.train.config import ON_BY_DEFAULT_ACTS_UNDER, acting_settings

    on = TrainConfig(method=method, plus_correction=correction)  # the defaults: accepted with any method
    off = TrainConfig(method=method, plus_correction=correction, plus_consistent=0, plus_consistent_min_agreement=0.0,
                      plus_min_confidence=0.0, plus_average_last=0.0, plus_symmetric_confidence=0.0,
                      plus_symmetric_trust=False, plus_prior=0.0, plus_final_correction="off",
                      plus_average_bn="averaged")
    assert all(getattr(on, name) for name in ON_BY_DEFAULT_ACTS_UNDER)  # on by default, as the name says
    # the weight average, the trusted anchors and the class-balance penalty act with any correction;
    # the stability gate and its refinements with selective
    any_correction = ("plus_average_last", "plus_average_bn", "plus_symmetric_trust", "plus_prior")
    acting = {name: acts or (method == "mixnn_plus" and name in any_correction) for name in ON_BY_DEFAULT_ACTS_UNDER}
    assert (acting_settings(on.to_dict()) == acting_settings(off.to_dict())) == (not any(acting.values()))
    kept = acting_settings(on.to_dict())
    assert all((name in kept) == acting[name] for name in ON_BY_DEFAULT_ACTS_UNDER)
    assert acting_settings({"lr": 0.1}) == {"lr": 0.1}


def test_the_gates_refinements_do_not_count_while_the_gate_is_off():
    """The ablation without the stability gate (plus_consistent 0) computes the same whatever
    the gate's refinements say: a run saved before they existed (read with them at 0) is the
    same experiment as today's cell; with the gate on, they count."""
    from mixnn_fast.train.config import REFINES_STABILITY_GATE, acting_settings, saved_settings

    today = TrainConfig(method="mixnn_plus", plus_consistent=0).to_dict()
    saved = {k: v for k, v in today.items() if k not in REFINES_STABILITY_GATE}  # written before them
    assert saved_settings(saved)["plus_consistent_min_agreement"] != today["plus_consistent_min_agreement"]
    assert acting_settings(saved_settings(saved)) == acting_settings(today)
    gated = TrainConfig(method="mixnn_plus").to_dict()
    assert acting_settings({**gated, "plus_consistent_min_agreement": 0.0}) != acting_settings(gated)
    assert acting_settings({**gated, "plus_min_confidence": 0.7}) != acting_settings(gated)


def test_the_averages_batchnorm_setting_counts_only_where_there_is_an_average():
    """A run without the weight average (the table's "no weight averaging" ablation) saved before
    plus_average_bn existed (read as "averaged") is the same experiment as one run today."""
    from mixnn_fast.train.config import acting_settings, saved_settings

    saved = saved_settings(TrainConfig(method="mixnn_plus", plus_average_last=0.0).to_dict()
                           | {"plus_average_bn": "averaged"})
    today = TrainConfig(method="mixnn_plus", plus_average_last=0.0).to_dict()
    assert today["plus_average_bn"] == "symmetric"
    assert acting_settings(saved) == acting_settings(today)
    averaging = TrainConfig(method="mixnn_plus").to_dict()
    assert acting_settings(averaging | {"plus_average_bn": "averaged"}) != acting_settings(averaging)
