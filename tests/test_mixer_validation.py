"""Bad input to the mixer raises a ValueError/TypeError naming the argument — never a crash,
never a silent result.  Hypothesis draws a valid call, breaks one thing, and checks."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from mixnn_fast import mix_images, mix_images_reference, mix_targets
from mixnn_fast._native import native


@st.composite
def valid_calls(draw):
    m = draw(st.integers(1, 6))
    h, w, c = draw(st.integers(1, 5)), draw(st.integers(1, 5)), draw(st.sampled_from([1, 2, 3, 4]))
    b, k = draw(st.integers(1, 5)), draw(st.integers(0, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (m, h, w, c), dtype=torch.uint8, generator=gen)
    anchors = torch.randint(0, m, (b,), generator=gen)
    partners = torch.randint(0, m, (b, k), generator=gen)
    weights = torch.rand(b, k + 1, generator=gen) + 0.01
    weights = weights / weights.sum(1, keepdim=True)
    return dict(images=images, anchors=anchors, partners=partners, weights=weights)


def _break(call: dict, how: str, data) -> tuple[dict, str]:
    """Returns the broken call and the argument name the error must mention."""
    call = dict(call)
    m = call["images"].shape[0]
    b, k1 = call["weights"].shape
    if how == "anchor_too_large":
        call["anchors"] = call["anchors"].clone()
        call["anchors"][data.draw(st.integers(0, b - 1))] = m + data.draw(st.integers(0, 100))
        return call, "anchors"
    if how == "negative_partner":
        if k1 == 1:
            return _break(call, "anchor_too_large", data)
        call["partners"] = call["partners"].clone()
        call["partners"][0, 0] = -data.draw(st.integers(1, 10))
        return call, "partners"
    if how == "nan_weight":
        call["weights"] = call["weights"].clone()
        call["weights"][data.draw(st.integers(0, b - 1)), 0] = data.draw(st.sampled_from([float("nan"), float("inf")]))
        return call, "weights"
    if how == "negative_weight":
        w = call["weights"].clone()
        w[0, 0] = -0.5
        call["weights"] = w
        return call, "weights"
    if how == "weights_do_not_sum_to_one":
        call["weights"] = call["weights"] * data.draw(st.sampled_from([0.5, 1.01, 2.0, 10.0]))
        return call, "weights"
    if how == "weights_wrong_shape":
        call["weights"] = torch.full((b, k1 + data.draw(st.integers(1, 3))), 1.0 / k1)
        return call, "weights"
    if how == "partners_wrong_rows":
        call["partners"] = torch.zeros(b + data.draw(st.integers(1, 3)), k1 - 1, dtype=torch.int64)
        return call, "partners"
    if how == "partners_1d":
        call["partners"] = torch.zeros(b, dtype=torch.int64)
        return call, "partners"
    if how == "float_indices":
        call["anchors"] = call["anchors"].float()
        return call, "anchors"
    if how == "bool_indices":
        call["anchors"] = torch.zeros(b, dtype=torch.bool)
        return call, "anchors"
    if how == "images_3d":
        call["images"] = call["images"][0]
        return call, "images"
    if how == "images_int32":
        call["images"] = call["images"].to(torch.int32)
        return call, "images"
    if how == "images_float64":
        call["images"] = call["images"].to(torch.float64)
        return call, "images"
    if how == "images_list":
        call["images"] = call["images"].tolist()
        return call, "images"
    if how == "integer_weights":
        call["weights"] = torch.ones(b, k1, dtype=torch.int64)
        return call, "weights"
    raise AssertionError(how)


BREAKS = ["anchor_too_large", "negative_partner", "nan_weight", "negative_weight", "weights_do_not_sum_to_one",
          "weights_wrong_shape", "partners_wrong_rows", "partners_1d", "float_indices", "bool_indices",
          "images_3d", "images_int32", "images_float64", "images_list", "integer_weights"]


@given(call=valid_calls(), how=st.sampled_from(BREAKS), data=st.data())
def test_broken_call_raises_naming_the_argument(call, how, data):
    broken, argument = _break(call, how, data)
    with pytest.raises((ValueError, TypeError), match=argument):
        mix_images(**broken)


@given(call=valid_calls())
def test_valid_call_matches_reference(call):
    got = mix_images(**call)
    # uint8 images, weights >= 0 summing to 1, no normalisation: no cancellation, so the kernel's
    # float32 sum of K + 1 products is within (K + 2) eps / 2 of the result itself (the products,
    # the additions and the reference's rounding to float32)
    k = call["weights"].shape[1] - 1
    torch.testing.assert_close(got, mix_images_reference(**call), rtol=(k + 2) * torch.finfo(torch.float32).eps / 2,
                               atol=0)


@given(call=valid_calls(), option=st.sampled_from(["in_layout", "out_layout", "out_dtype", "mean", "std", "out"]),
       data=st.data())
def test_bad_options_raise(call, option, data):
    c = call["images"].shape[-1]
    bad = {
        "in_layout": data.draw(st.sampled_from(["nhwc", "HWC", "", "CHWN"])),
        "out_layout": data.draw(st.sampled_from(["nchw", "NC", "NHCW"])),
        "out_dtype": data.draw(st.sampled_from([torch.float64, torch.int32, torch.int64])),
        "mean": [0.0] * (c + data.draw(st.integers(1, 3))),
        "std": data.draw(st.sampled_from([[0.0] * c, [-1.0] * c, [float("nan")] * c, [1.0] * (c + 1)])),
        "out": torch.empty(call["anchors"].shape[0] + data.draw(st.integers(1, 3)), c, 1, 1),  # wrong batch
    }[option]
    with pytest.raises((ValueError, TypeError), match=option):
        mix_images(**call, **{option: bad})


def test_out_that_aliases_images_is_rejected():
    images = torch.zeros(4, 3, 2, 2)  # as NCHW
    with pytest.raises(ValueError, match="out: overlaps"):
        mix_images(images, [0, 1], [[1], [0]], [[0.5, 0.5]] * 2, in_layout="NCHW", out=images[:2])


def test_empty_batch_returns_empty_output():
    out = mix_images(torch.zeros(3, 4, 5, 3, dtype=torch.uint8), torch.empty(0, dtype=torch.int64),
                     torch.empty(0, 1, dtype=torch.int64), torch.empty(0, 2))
    assert out.shape == (0, 3, 4, 5)


def test_anchor_into_empty_image_batch_is_an_index_error():
    with pytest.raises(ValueError, match=r"anchors: indices must lie in \[0, 0\)"):
        mix_images(torch.zeros(0, 4, 5, 3, dtype=torch.uint8), [0], [[0]], [[0.5, 0.5]])


def test_nan_images_caught_on_request():
    images = torch.zeros(2, 2, 2, 1)
    images[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="images: contain NaN"):
        mix_images(images, [0], [[1]], [[0.5, 0.5]], check_finite=True)


def test_targets_validation():
    targets = torch.full((4, 3), 1 / 3)
    with pytest.raises(ValueError, match="targets"):
        mix_targets(targets[0], [0], [[1]], [[0.5, 0.5]])
    with pytest.raises(TypeError, match="targets"):
        mix_targets(targets.long(), [0], [[1]], [[0.5, 0.5]])
    with pytest.raises(ValueError, match="partners"):
        mix_targets(targets, [0], [[4]], [[0.5, 0.5]])
    bad = targets.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        mix_targets(bad, [0], [[2]], [[0.5, 0.5]])
    bad[2, 1] = float("inf")
    with pytest.raises(ValueError, match="infinity"):  # caught even when the row's weight is 0
        mix_targets(bad, [0], [[2]], [[1.0, 0.0]])
    mix_targets(bad, [0], [[1]], [[0.5, 0.5]])  # rows the batch does not read may be anything


def test_unknown_input_type_is_a_type_error():
    with pytest.raises(TypeError, match="images"):
        mix_images("not an array", [0], [[0]], [[0.5, 0.5]])
    with pytest.raises(TypeError, match="anchors"):
        mix_images(np.zeros((1, 1, 1, 1), np.uint8), object(), [[0]], [[0.5, 0.5]])


# ---- MIXNN_CPU_ISA: read once when the extension loads -------------------------------------------


def _load_with_isa(value: str) -> subprocess.CompletedProcess:
    """Import the extension in a fresh interpreter with MIXNN_CPU_ISA=value; prints the kernel in use."""
    code = ("from mixnn_fast._native import allowed_cpu_isas, native\n"
            "print(native().selected_cpu_isa(), ','.join(allowed_cpu_isas()))")
    env = {**os.environ, "MIXNN_CPU_ISA": value}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("isa", native().cpu_isas())
def test_cpu_isa_variable_selects_the_kernel(isa):
    result = _load_with_isa(isa.upper())  # any case
    assert result.returncode == 0, result.stderr
    selected, allowed = result.stdout.split()
    assert selected == isa
    # the kernels the tests may switch to: those an `isa` machine has
    assert allowed.split(",") == native().cpu_isas()[: native().cpu_isas().index(isa) + 1]


def test_cpu_isa_variable_auto_or_empty_picks_the_best():
    for value in ("auto", ""):
        result = _load_with_isa(value)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == [native().cpu_isas()[-1], ",".join(native().cpu_isas())]


def test_cpu_isa_variable_rejects_unknown_values():
    result = _load_with_isa("avx512f")
    assert result.returncode != 0
    assert "ValueError: MIXNN_CPU_ISA='avx512f' is not one of auto, base, avx2, avx512" in result.stderr


def test_cpu_isa_variable_rejects_an_isa_the_cpu_lacks():
    from mixnn_fast import _native

    class AVX2Only:  # the binding as an AVX2-only CPU answers (the C++ check throws; pybind11 maps it)
        @staticmethod
        def select_cpu_isa(name):
            if name == "avx512":
                raise ValueError("isa: avx512 kernel not built or not supported by this CPU")

        @staticmethod
        def cpu_isas():
            return ["base", "avx2"]

    with pytest.raises(ValueError, match=r"MIXNN_CPU_ISA=avx512: .*no avx512 kernel \(available: base, avx2"):
        _native._apply_cpu_isa(AVX2Only, "avx512")
    if "avx512" not in native().cpu_isas():  # a real AVX2-only machine: the same through the variable
        result = _load_with_isa("avx512")
        assert result.returncode != 0 and "MIXNN_CPU_ISA=avx512" in result.stderr
