"""Property tests of the public entry points with arbitrary arguments, valid and invalid.

The contract every property checks: a call either returns the right answer (checked against
an independent float64 reference: the plain-torch mixer and a few-line formula here,
scikit-learn's GaussianMixture, brute-force search, eq. 10-11, the EMA formula, the
transition matrices written out here), or raises ValueError/TypeError whose message names
the offending argument.  Anything else (a segfault, a hang, IndexError or RuntimeError from
deep inside, a warning turned into an error, a silently wrong result) fails the property.

Each strategy draws a whole, valid argument set and then, often, breaks some of it; a
broken argument carries the names the error message may use.  Profiles: tests/conftest.py
("ci", the default, 60 examples per property; HYPOTHESIS_PROFILE=deep for 3000).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import assume, given, note, strategies as st

from mixnn_fast import mix_images, mix_images_reference, mix_targets
from mixnn_fast.refresh.gmm import GMM1D, LossHistory, clean_probability
from mixnn_fast.refresh.neighbours import NeighbourIndex, nearest_neighbours
from mixnn_fast.data.noise import KINDS, corrupt, transition_matrix
from mixnn_fast.refresh.targets import SoftTargets
from mixnn_fast.refresh.weights import mixing_weights, random_partners


def expect_error(names, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` must raise ValueError or TypeError naming one of ``names``;
    any other exception propagates and fails the test."""
    with pytest.raises((ValueError, TypeError)) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert any(name in message for name in names), (
        f"{type(info.value).__name__}({message!r}) names none of {sorted(names)}")
    return info.value


def seeded(draw) -> torch.Generator:
    """A torch generator seeded by hypothesis (so shrinking and replay see the same tensors)."""
    return torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1), label="seed"))


# ============================================================================ the mixer

IMAGE_DTYPES = [torch.uint8, torch.float32, torch.float16, torch.bfloat16]
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.uint8]
INDEX_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]
WEIGHT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def formula_mix(images: torch.Tensor, in_layout: str, anchors, partners, weights, mean, std, out_layout: str,
                out_dtype: torch.dtype) -> torch.Tensor:
    """out[b] = sum_j w_bj (x[idx_bj] - mean) / std in float64, written independently of the package."""
    x = images.double() if in_layout == "NCHW" else images.double().permute(0, 3, 1, 2)
    idx = torch.cat([anchors.long().reshape(-1, 1), partners.long().reshape(len(anchors), weights.shape[1] - 1)], dim=1)
    mean = torch.zeros(x.shape[1], dtype=torch.float64) if mean is None else mean
    std = torch.ones(x.shape[1], dtype=torch.float64) if std is None else std
    terms = (x[idx] - mean.view(1, 1, -1, 1, 1)) / std.view(1, 1, -1, 1, 1)  # (B, K+1, C, H, W)
    mixed = torch.einsum("bj,bjchw->bchw", weights.double(), terms)
    if out_layout == "NHWC":
        mixed = mixed.permute(0, 2, 3, 1)
    if out_dtype == torch.uint8:
        mixed = torch.clamp(torch.round(mixed), 0, 255)  # round half to even, saturate
    return mixed.contiguous()


def channel_values(draw, c: int, low: float, high: float):
    """None, one scalar, a list of C, or a tensor of C (how users pass mean and std), and the
    (C,) float64 values the kernel works with (it normalises with float32 numbers)."""
    form = draw(st.sampled_from(["none", "scalar", "list", "tensor"]))
    if form == "none":
        return None, None
    if form == "scalar":
        value = draw(st.floats(low, high))
        return value, torch.full((c,), value, dtype=torch.float64).float().double()
    values = [draw(st.floats(low, high)) for _ in range(c)]
    exact = torch.tensor(values, dtype=torch.float64).reshape(c).float().double()
    return (values if form == "list" else torch.tensor(values)), exact


@st.composite
def mix_calls(draw):
    """A valid mix_images call: (kwargs, facts the checks need)."""
    gen = seeded(draw)
    m = draw(st.integers(0, 5), label="M")
    h, w, c = draw(st.integers(0, 4), label="H"), draw(st.integers(0, 4), label="W"), draw(st.integers(0, 5), label="C")
    b = draw(st.integers(0, 5), label="B") if m else 0
    k = draw(st.one_of(st.integers(0, 3), st.integers(0, 16)), label="K")
    in_dtype = draw(st.sampled_from(IMAGE_DTYPES))
    in_layout, out_layout = draw(st.sampled_from(["NHWC", "NCHW"])), draw(st.sampled_from(["NHWC", "NCHW"]))
    out_dtype = draw(st.sampled_from(OUT_DTYPES))
    shape = (m, h, w, c) if in_layout == "NHWC" else (m, c, h, w)
    if in_dtype == torch.uint8:
        images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    else:
        images = ((torch.rand(shape, generator=gen, dtype=torch.float64) - 0.5) * 600).to(in_dtype)
    reference_images = images
    # how the images arrive: contiguous, a strided view, a permuted view, or a NumPy array
    form = draw(st.sampled_from(["contiguous", "strided", "permuted", "numpy"]))
    if form == "strided":
        wide = torch.zeros(shape[:-1] + (2 * shape[-1],), dtype=in_dtype)
        wide[..., ::2] = images
        images = wide[..., ::2]
    elif form == "permuted":  # stored in the other layout, viewed in this one
        order = (0, 2, 3, 1) if in_layout == "NCHW" else (0, 3, 1, 2)
        back = (0, 3, 1, 2) if in_layout == "NCHW" else (0, 2, 3, 1)
        images = images.permute(*order).contiguous().permute(*back)
    elif form == "numpy" and in_dtype not in (torch.bfloat16,):
        images = images.numpy()

    index_dtype = draw(st.sampled_from(INDEX_DTYPES))
    anchors = torch.randint(0, max(m, 1), (b,), generator=gen).to(index_dtype)
    partners = torch.randint(0, max(m, 1), (b, k), generator=gen).to(index_dtype)
    if draw(st.booleans()):  # a transposed (non-contiguous) view
        partners = partners.T.contiguous().T
    raw = torch.rand(b, k + 1, generator=gen, dtype=torch.float64) + 0.05
    raw[torch.rand(b, k + 1, generator=gen) < 0.2] = 0.0
    raw[:, 0] += 1e-3  # no all-zero row
    weight_dtype = draw(st.sampled_from(WEIGHT_DTYPES))
    normalize = draw(st.booleans()) or weight_dtype in (torch.float16, torch.bfloat16)
    if normalize:
        # any positive scale, up to the ends of the dtype's range
        scales = {torch.float32: [1.0, 1e-30, 1e30, 3e38 / (k + 1), 1e-38],
                  torch.float64: [1.0, 1e-300, 1e300, 1e-50, 1e50],
                  torch.float16: [1.0, 1e-3, 60000.0 / (k + 1)], torch.bfloat16: [1.0, 1e-30, 1e30]}[weight_dtype]
        weights = (raw / raw.max(dim=1, keepdim=True).values * draw(st.sampled_from(scales))).to(weight_dtype)
        exact_w = weights.double()
        sums = exact_w.sum(dim=1, keepdim=True)
        assume(bool((sums > 0).all()))  # underflow may have zeroed a row: that is the invalid case below
        effective_w = exact_w / sums
    else:
        weights = (raw / raw.sum(dim=1, keepdim=True)).to(weight_dtype)
        effective_w = weights.float().double()
    if draw(st.booleans()):
        anchors, partners, weights = anchors.numpy(), partners.numpy(), (
            weights.numpy() if weight_dtype != torch.bfloat16 else weights)
    if draw(st.booleans()) and not isinstance(anchors, np.ndarray) and b:  # ([] would not say K)
        anchors, partners = anchors.tolist(), partners.tolist()

    mean, mean_exact = channel_values(draw, c, -300.0, 300.0)
    std, std_exact = channel_values(draw, c, 0.1, 100.0)
    kwargs = dict(images=images, anchors=anchors, partners=partners, weights=weights, in_layout=in_layout,
                  out_layout=out_layout, out_dtype=out_dtype, mean=mean, std=std, normalize_weights=normalize,
                  num_threads=draw(st.sampled_from([None, 1, 2, 3])))
    out_shape = (b, c, h, w) if out_layout == "NCHW" else (b, h, w, c)
    if draw(st.booleans()):
        kwargs["out"] = torch.full(out_shape, 7, dtype=out_dtype)
    facts = dict(reference_images=reference_images, effective_w=effective_w, mean_exact=mean_exact,
                 std_exact=std_exact, m=m, b=b, k=k, c=c, out_shape=out_shape, in_dtype=in_dtype)
    return kwargs, facts


def as_torch(value):
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    return torch.as_tensor(value) if isinstance(value, list) else value


def check_mix_result(got: torch.Tensor, kwargs: dict, facts: dict) -> None:
    out_dtype = kwargs["out_dtype"]
    assert got.shape == facts["out_shape"] and got.dtype == out_dtype and got.is_contiguous()
    if "out" in kwargs:
        assert got.data_ptr() == kwargs["out"].data_ptr() or got.numel() == 0
    anchors, partners = as_torch(kwargs["anchors"]), as_torch(kwargs["partners"]).reshape(facts["b"], facts["k"])
    x = facts["reference_images"]
    expected = formula_mix(x, kwargs["in_layout"], anchors, partners, facts["effective_w"], facts["mean_exact"],
                           facts["std_exact"], kwargs["out_layout"], out_dtype)
    twin = mix_images_reference(x, anchors, partners, facts["effective_w"], in_layout=kwargs["in_layout"],
                                mean=facts["mean_exact"], std=facts["std_exact"], out_layout=kwargs["out_layout"],
                                out_dtype=torch.float64 if out_dtype != torch.uint8 else torch.uint8)
    if out_dtype == torch.uint8:
        # Both references round a float64 mix to uint8. Mixes of bfloat16 or uint8 pixels with
        # weights that sum to 1 often land exactly on a .5 tie, and the two references sum in other
        # orders, so one may round up and the other down (CI found 23.5 -> 24 against 23). They must
        # agree everywhere else, and by at most 1 at a tie.
        exact = formula_mix(x, kwargs["in_layout"], anchors, partners, facts["effective_w"], facts["mean_exact"],
                            facts["std_exact"], kwargs["out_layout"], torch.float64)
        near_tie = ((exact - exact.floor()) - 0.5).abs() <= 1e-9 * (1 + exact.abs())
        difference = (twin.double() - expected).abs()
        assert not bool((difference[~near_tie] > 0).any()) and not bool((difference > 1).any())
    else:
        torch.testing.assert_close(twin.double(), expected, rtol=1e-12, atol=1e-9)
    if got.numel() == 0:
        return
    # float32 arithmetic in the kernel: (K + 4) roundings of terms bounded by (|x| + |mean|) / std
    top = float(x.double().abs().max()) + (0.0 if facts["mean_exact"] is None else float(facts["mean_exact"].abs().max()))
    inv = 1.0 if facts["std_exact"] is None else float((1 / facts["std_exact"]).max())
    atol = 4 * (facts["k"] + 4) * 2.0**-24 * top * inv + 1e-30
    if out_dtype == torch.uint8:
        assert float((got.double() - expected).abs().max()) <= 1.0
    else:
        rtol = 2 * UNIT_ROUNDOFF[out_dtype]
        torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=atol + rtol * 1e-3)


def _overlapping(out_shape, out_dtype, facts, what: str, kwargs: dict):
    """Rebuild ``what`` (images or weights) inside a buffer that ``out`` shares; None if impossible."""
    out_numel = math.prod(out_shape)
    if out_dtype != torch.float32 or out_numel == 0:
        return None
    source = kwargs[what]
    if not isinstance(source, torch.Tensor) or source.dtype != torch.float32 or source.numel() == 0:
        return None
    buffer = torch.zeros(max(out_numel, source.numel()) + 8)
    inside = buffer[: source.numel()].view(source.shape)
    inside.copy_(source)
    kwargs[what] = inside
    return buffer[: out_numel].view(out_shape)


def break_mix_call(draw, kwargs: dict, facts: dict, how: str):
    """Break one thing; return the argument names the error may mention, or None if ``how`` does not apply."""
    m, b, k, c = facts["m"], facts["b"], facts["k"], facts["c"]
    try:  # an earlier break may have replaced an argument by something that is no tensor at all
        warnings.simplefilter("ignore")  # (inside the test's catch_warnings) complex -> integer casts warn
        anchors = as_torch(kwargs["anchors"]).clone().long().reshape(b)
        partners = as_torch(kwargs["partners"]).clone().long().reshape(b, k)
        weights = as_torch(kwargs["weights"]).clone().reshape(b, k + 1)
        as_torch(kwargs["images"]).clone()
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return None
    if how == "anchor_out_of_range" and b:
        anchors[draw(st.integers(0, b - 1))] = draw(st.sampled_from([m, m + 1, 2**40, -1, -(2**40)]))
        kwargs["anchors"] = anchors
        return {"anchors"}
    if how == "partner_out_of_range" and b and k:
        partners[draw(st.integers(0, b - 1)), draw(st.integers(0, k - 1))] = draw(st.sampled_from([m, 300, -1]))
        kwargs["partners"] = partners
        return {"partners"}
    if how == "anchors_not_integer":
        kwargs["anchors"] = draw(st.sampled_from([anchors.float(), anchors.bool(), anchors.to(torch.complex64),
                                                  anchors.reshape(1, -1), "0", None, object(), [[0, 1], [2]]]))
        return {"anchors"}
    if how == "partners_bad":
        kwargs["partners"] = draw(st.sampled_from([partners.double(), partners.reshape(-1), partners.reshape(b, k, 1),
                                                   torch.zeros(b + 1, k, dtype=torch.int64), [[0], [0, 1]], 1.5]))
        return {"partners"}
    if how in ("weights_non_finite", "weights_negative") and not weights.is_floating_point():
        return None  # an earlier break made them integers
    if how == "weights_non_finite" and b:
        weights[draw(st.integers(0, b - 1)), draw(st.integers(0, k))] = draw(st.sampled_from([math.nan, math.inf,
                                                                                               -math.inf]))
        kwargs["weights"] = weights
        return {"weights"}
    if how == "weights_negative" and b:
        weights[draw(st.integers(0, b - 1)), draw(st.integers(0, k))] = -draw(st.sampled_from([0.5, 1e-6, 3e38]))
        kwargs["weights"] = weights
        return {"weights"}
    if how == "weights_do_not_sum_to_one" and b:
        row = draw(st.integers(0, b - 1))
        weights = weights.double()
        weights[row] = weights[row] / weights[row].sum() * draw(st.sampled_from([0.5, 0.99, 1.01, 2.0, 1e6]))
        kwargs.update(weights=weights, normalize_weights=False)
        return {"weights"}
    if how == "weights_zero_row" and b:
        weights[draw(st.integers(0, b - 1))] = 0
        kwargs["weights"] = weights
        return {"weights"}
    if how == "weights_bad":
        kwargs["weights"] = draw(st.sampled_from([weights.long(), weights.bool(), weights.to(torch.complex64),
                                                  torch.full((b, k + 2), 1 / (k + 2)), weights.reshape(-1),
                                                  torch.full((b + 1, k + 1), 1 / (k + 1)), "weights", None]))
        return {"weights"}
    if how == "images_bad":
        x = as_torch(kwargs["images"])
        kwargs["images"] = draw(st.sampled_from([x.double(), x.to(torch.int32), x.bool(), x.to(torch.int64),
                                                 x.to(torch.complex64), x[0] if m else x.reshape(-1),
                                                 x.unsqueeze(0), "images", None, [[1, 2]], x.double().numpy()]))
        return {"images"}
    if how == "layout_bad":
        which = draw(st.sampled_from(["in_layout", "out_layout"]))
        kwargs[which] = draw(st.sampled_from(["nhwc", "NCWH", "", "HWC", None, ["NHWC"], 0]))
        return {which}
    if how == "out_dtype_bad":
        kwargs["out_dtype"] = draw(st.sampled_from([torch.float64, torch.int32, torch.bool, "float32", None, [1],
                                                    np.float32]))
        kwargs.pop("out", None)
        return {"out_dtype"}
    if how == "mean_bad":
        kwargs["mean"] = draw(st.sampled_from([[0.0] * (c + 2), [math.nan] * max(c, 1), [math.inf] * max(c, 1), "abc", [None] * max(c, 1), [1j] * max(c, 1),
                                               [[0.0] * c] * 2, object()]))
        return {"mean"}
    if how == "std_bad":
        kwargs["std"] = draw(st.sampled_from([[0.0] * max(c, 1), [-1.0] * max(c, 1), [math.nan] * max(c, 1),
                                              [1.0] * (c + 2), [1e-50] * max(c, 1), "x", [None] * max(c, 1), -0.0]))
        return {"std"}
    if how == "out_bad":
        shape, dtype = facts["out_shape"], kwargs["out_dtype"]
        choice = draw(st.sampled_from(["shape", "dtype", "strided", "type", "over_images", "over_weights"]))
        if choice == "shape":
            out = torch.empty((shape[0] + 1,) + shape[1:], dtype=dtype)
        elif choice == "dtype":
            out = torch.empty(shape, dtype=torch.float64 if dtype != torch.float64 else torch.float32)
        elif choice == "strided":
            if math.prod(shape) <= 1:
                return None
            out = torch.empty(shape[:-1] + (2 * shape[-1],), dtype=dtype)[..., ::2]
            if out.is_contiguous():
                return None
        elif choice == "type":
            out = draw(st.sampled_from([np.empty(shape, dtype=np.float32), [0.0], "out"]))
        elif choice == "over_images":
            out = _overlapping(shape, dtype, facts, "images", kwargs)
        else:
            if kwargs["normalize_weights"] or kwargs["weights"] is None:
                return None
            kwargs["weights"] = as_torch(kwargs["weights"])
            out = _overlapping(shape, dtype, facts, "weights", kwargs)
        if out is None:
            return None
        kwargs["out"] = out
        return {"out"}
    if how == "num_threads_bad":
        kwargs["num_threads"] = draw(st.sampled_from([0, -1, -(2**31), 1.5, "2", 10**6, 2**40, True, [2]]))
        return {"num_threads"}
    if how == "weight_tolerance_bad":
        kwargs["weight_tolerance"] = draw(st.sampled_from([math.nan, -1e-3, "0.1", None, [1e-3]]))
        return {"weight_tolerance"}
    images = as_torch(kwargs["images"])  # an earlier break may have made them integers or no tensor
    if (how == "images_not_finite" and isinstance(images, torch.Tensor) and images.is_floating_point()
            and images.numel()):
        x = images.clone(memory_format=torch.contiguous_format)
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        kwargs.update(images=x, check_finite=True)
        return {"images"}
    return None


MIX_BREAKS = ["anchor_out_of_range", "partner_out_of_range", "anchors_not_integer", "partners_bad",
              "weights_non_finite", "weights_negative", "weights_do_not_sum_to_one", "weights_zero_row",
              "weights_bad", "images_bad", "layout_bad", "out_dtype_bad", "mean_bad", "std_bad", "out_bad",
              "num_threads_bad", "weight_tolerance_bad", "images_not_finite"]


@given(call=mix_calls(), data=st.data())
def test_mix_images_is_right_or_names_the_argument(call, data):
    kwargs, facts = call
    broken = set()
    for how in data.draw(st.lists(st.sampled_from(MIX_BREAKS), max_size=2, unique=True), label="breaks"):
        with warnings.catch_warnings():
            names = break_mix_call(data.draw, kwargs, facts, how)
        if names:
            broken |= names
    note(f"broken: {sorted(broken)}")
    if broken:
        expect_error(broken, mix_images, **kwargs)
    else:
        check_mix_result(mix_images(**kwargs), kwargs, facts)


@st.composite
def target_calls(draw):
    gen = seeded(draw)
    n, classes = draw(st.integers(0, 6), label="N"), draw(st.integers(0, 7), label="C")
    b = draw(st.integers(0, 5)) if n else 0
    k = draw(st.integers(0, 16), label="K")
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    targets = torch.softmax(torch.randn(n, classes, generator=gen, dtype=torch.float64) * 3, dim=1).to(dtype)
    anchors = torch.randint(0, max(n, 1), (b,), generator=gen)
    partners = torch.randint(0, max(n, 1), (b, k), generator=gen)
    weights = torch.rand(b, k + 1, generator=gen, dtype=torch.float64) + 0.01
    weights = (weights / weights.sum(dim=1, keepdim=True)).float()
    out_dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    kwargs = dict(targets=targets, anchors=anchors, partners=partners, weights=weights, out_dtype=out_dtype,
                  num_threads=draw(st.sampled_from([None, 1, 2])))
    if draw(st.booleans()):
        kwargs["out"] = torch.full((b, classes), 7, dtype=out_dtype)
    if draw(st.booleans()) and n and classes > 1:  # rows the batch does not read may hold anything
        unread = sorted(set(range(n)) - set(anchors.tolist()) - set(partners.reshape(-1).tolist()))
        if unread:
            targets[unread[0], 0] = math.nan
    return kwargs, dict(n=n, b=b, k=k, classes=classes)


@given(call=target_calls(), data=st.data())
def test_mix_targets_is_right_or_names_the_argument(call, data):
    kwargs, facts = call
    n, b, k, classes = facts["n"], facts["b"], facts["k"], facts["classes"]
    targets, weights = kwargs["targets"], kwargs["weights"]
    how = data.draw(st.sampled_from([None, None, "targets_bad", "targets_non_finite", "out_dtype", "out_bad",
                                     "out_over_weights", "anchors", "weights", "num_threads"]))
    broken = set()
    if how == "targets_bad":
        kwargs["targets"] = data.draw(st.sampled_from([targets.double(), targets.long(), targets.reshape(-1),
                                                       targets.unsqueeze(0), targets.tolist(), None]))
        broken = {"targets"}
    elif how == "targets_non_finite" and b and classes:
        row = data.draw(st.sampled_from([int(kwargs["anchors"][0])] + kwargs["partners"].reshape(-1).tolist()))
        bad = targets.clone()
        bad[row, data.draw(st.integers(0, classes - 1))] = data.draw(st.sampled_from([math.nan, math.inf]))
        kwargs["targets"], broken = bad, {"targets"}
    elif how == "out_dtype":
        kwargs["out_dtype"], broken = data.draw(st.sampled_from([torch.uint8, torch.int64, "float32"])), {"out_dtype"}
        kwargs.pop("out", None)
    elif how == "out_bad":
        kwargs["out"] = data.draw(st.sampled_from([torch.empty(b + 1, classes, dtype=kwargs["out_dtype"]),
                                                   torch.empty(b, classes, 1, dtype=kwargs["out_dtype"]),
                                                   torch.empty(b, 2 * classes, dtype=kwargs["out_dtype"])[:, ::2],
                                                   np.zeros((b, classes), np.float32), [0.0]]))
        broken = {"out"}
        if isinstance(kwargs["out"], torch.Tensor) and kwargs["out"].ndim == 2 and kwargs["out"].shape == (b, classes):
            if kwargs["out"].is_contiguous():
                broken = set()  # an empty strided view is still contiguous: a valid out
    elif how == "out_over_weights" and b and classes == k + 1 and kwargs["out_dtype"] == torch.float32:
        kwargs["out"], broken = weights, {"out"}
    elif how == "anchors" and b:
        bad = kwargs["anchors"].clone()
        bad[0] = data.draw(st.sampled_from([n, -1, 10**12]))
        kwargs["anchors"], broken = bad, {"anchors"}
    elif how == "weights" and b:
        kwargs["weights"], broken = weights * 2, {"weights"}
    elif how == "num_threads":
        kwargs["num_threads"], broken = data.draw(st.sampled_from([0, -2, 2.5, 10**7])), {"num_threads"}
    if broken:
        expect_error(broken, mix_targets, **kwargs)
        return
    got = mix_targets(**kwargs)
    assert got.shape == (b, classes) and got.dtype == kwargs["out_dtype"]
    if "out" in kwargs and got.numel():
        assert got.data_ptr() == kwargs["out"].data_ptr()
    idx = torch.cat([kwargs["anchors"].reshape(-1, 1), kwargs["partners"]], dim=1)
    expected = torch.einsum("bj,bjc->bc", kwargs["weights"].double(), targets.double()[idx])
    rtol = 2 * UNIT_ROUNDOFF[kwargs["out_dtype"]]
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=rtol * 1e-3 + (k + 4) * 1e-7)


# ============================================================================ the 1-D GMM

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@st.composite
def loss_vectors(draw, min_size: int = 1):
    """Per-sample losses as training produces them, and stranger: two clusters, one value,
    a few repeated values, extreme scales and offsets, every floating dtype."""
    gen = seeded(draw)
    n = draw(st.integers(min_size, 300), label="N")
    shape = draw(st.sampled_from(["two_clusters", "uniform", "constant", "few_values", "one_outlier"]))
    if shape == "two_clusters":
        share = draw(st.floats(0.05, 0.95))
        hi = torch.rand(n, generator=gen) < share
        x = torch.where(hi, 0.8 + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64),
                        0.2 + 0.05 * torch.randn(n, generator=gen, dtype=torch.float64))
    elif shape == "uniform":
        x = torch.rand(n, generator=gen, dtype=torch.float64)
    elif shape == "constant":
        x = torch.full((n,), draw(st.floats(-1e3, 1e3)), dtype=torch.float64)
    elif shape == "few_values":
        x = torch.randint(0, draw(st.integers(1, 3)), (n,), generator=gen).double()
    else:
        x = torch.zeros(n, dtype=torch.float64)
        x[draw(st.integers(0, n - 1))] = 1.0
    scale = draw(st.sampled_from([1.0, 1.0, 1e-3, 1e3, 1e-30, 1e30, 1e-300, 1e300]))
    offset = draw(st.sampled_from([0.0, 0.0, 1.0, -5.0, 1e6, 1e12]))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    return (x * scale + offset).to(dtype)


def allowing_reg_covar_error(fn, *args, **kwargs):
    """``fn``'s result, or None when it raised the GMM's documented refusal for valid but
    unsplittable data (a component collapsed to zero variance, or log-odds overflowing): a
    ValueError that names reg_covar, the setting that fixes it."""
    try:
        return fn(*args, **kwargs)
    except ValueError as exc:
        assert "reg_covar" in str(exc), exc
        return None


def gmm_options(draw):
    """Keyword arguments of clean_probability / GMM1D, all valid."""
    options = {}
    if draw(st.booleans()):
        options["max_iter"] = draw(st.integers(0, 30))
    if draw(st.booleans()):
        options["tol"] = draw(st.sampled_from([0.0, 1e-6, 1e-3, 1e-2, 1.0]))
    if draw(st.booleans()):
        options["reg_covar"] = draw(st.sampled_from([0.0, 1e-9, 1e-6, 5e-4, 1e-2, 1.0]))
    if draw(st.booleans()):
        options["seed"] = draw(st.sampled_from([0, 1, 12345, 2**63 - 1, -1]))
    if draw(st.booleans()):
        options["dtype"] = draw(st.sampled_from([torch.float32, torch.float64]))
    return options


def break_gmm_options(draw, options: dict) -> set:
    how = draw(st.sampled_from(["max_iter", "tol", "reg_covar", "seed", "dtype", "means_init", "variances_init",
                                "weights_init"]))
    bad = {
        "max_iter": [-1, 1.5, True, "10", None],
        "tol": [-1e-3, math.nan, math.inf, "0.1", None],
        "reg_covar": [-1e-6, math.nan, math.inf, "x"],
        "seed": [1.5, "0", None, 2**70, -(2**70)],
        "dtype": [torch.float16, torch.bfloat16, torch.int64, torch.complex64, "float32", np.float32, None],
        "means_init": [[0.1], [0.1, 0.2, 0.3], "ab", [math.nan, 0.5], [[0.1], [0.2], [0.3]], {1: 2}, [None, 1]],
        "variances_init": [[0.0, 1.0], [-1.0, 1.0], [math.inf, 1.0], [1.0], "x"],
        "weights_init": [[0.0, 1.0], [0.3, 0.3], [-0.5, 1.5], [1.0], [math.nan, 0.5], "w"],
    }[how]
    options[how] = draw(st.sampled_from(bad))
    return {how}


def sklearn_posteriors(x: np.ndarray, means, variances, weights, max_iter: int, reg_covar: float) -> tuple:
    """scikit-learn's EM from the same initial parameters, a fixed number of iterations (tol=0)."""
    from sklearn.mixture import GaussianMixture

    model = GaussianMixture(2, max_iter=max_iter, tol=0.0, reg_covar=reg_covar, random_state=0,
                            means_init=np.asarray(means)[:, None],
                            precisions_init=(1.0 / np.asarray(variances))[:, None, None],
                            weights_init=np.asarray(weights))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: tol=0 never converges, by design
        model.fit(x[:, None])
    return model.predict_proba(x[:, None]), model.means_.ravel(), model.weights_


@given(losses=loss_vectors(), data=st.data())
def test_clean_probability_is_a_probability_or_names_the_argument(losses, data):
    options = gmm_options(data.draw)
    if data.draw(st.booleans()):
        options["normalise"] = data.draw(st.booleans())
    if data.draw(st.booleans()):
        options["min_clean_weight"] = data.draw(st.sampled_from([0.0, 0.01, 0.2, 0.49]))
    broken = set()
    how = data.draw(st.sampled_from([None, None, "options", "losses", "min_clean_weight", "requires_grad"]))
    if how == "options":
        broken = break_gmm_options(data.draw, options)
    elif how == "losses":
        losses = data.draw(st.sampled_from([losses.tolist(), losses.numpy() if losses.dtype == torch.float64 else None,
                                            losses.reshape(1, -1), losses.long(), losses[:0], losses.to(torch.complex64),
                                            torch.cat([losses, torch.tensor([math.nan], dtype=losses.dtype)]),
                                            torch.cat([losses, torch.tensor([-math.inf], dtype=losses.dtype)])]))
        broken = {"losses"}
    elif how == "min_clean_weight":
        options["min_clean_weight"] = data.draw(st.sampled_from([-0.1, 0.5, 1.0, math.nan, "0.1", None]))
        broken = {"min_clean_weight"}
    elif how == "requires_grad":  # a loss straight from the training step: must work as if detached
        losses = losses.clone().requires_grad_()
    finite = isinstance(losses, torch.Tensor) and losses.is_floating_point() and bool(torch.isfinite(losses).all())
    if not finite:  # e.g. float16 losses overflowed to inf
        broken.add("losses")
    if broken:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expect_error(broken, clean_probability, losses, **options)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Degenerate / Collapsed warnings are part of the contract
        result = allowing_reg_covar_error(clean_probability, losses, return_model=True, **options)
    if result is None:
        return
    probability, model = result
    dtype = options.get("dtype", torch.float32)
    assert probability.shape == losses.shape and probability.dtype == dtype
    assert bool(torch.isfinite(probability).all()) and bool(((probability >= 0) & (probability <= 1)).all())
    if len(torch.unique(losses.detach())) < 2:
        assert model.degenerate_ and bool((probability == 0.5).all())


@st.composite
def sensible_gmm_data(draw):
    """Data and initial parameters where scikit-learn is a fair reference: two groups in [0, 1]."""
    gen = seeded(draw)
    n = draw(st.integers(20, 400))
    share = draw(st.floats(0.1, 0.9))
    hi = torch.rand(n, generator=gen) < share
    x = torch.where(hi, draw(st.floats(0.55, 0.9)) + draw(st.floats(0.02, 0.15)) * torch.randn(n, generator=gen, dtype=torch.float64),
                    draw(st.floats(0.1, 0.45)) + draw(st.floats(0.02, 0.15)) * torch.randn(n, generator=gen, dtype=torch.float64))
    means = [draw(st.floats(0.0, 0.45)), draw(st.floats(0.55, 1.0))]  # apart: which is lower is never a tie
    variances = [draw(st.floats(0.005, 0.2)), draw(st.floats(0.005, 0.2))]
    w0 = draw(st.floats(0.1, 0.9))
    return x, means, variances, [w0, 1.0 - w0]


@given(case=sensible_gmm_data(), max_iter=st.integers(1, 10), reg_covar=st.sampled_from([1e-6, 1e-4, 5e-4, 1e-2]),
       use_clean_probability=st.booleans())
def test_gmm_matches_sklearn_from_the_same_start(case, max_iter, reg_covar, use_clean_probability):
    x, means, variances, weights = case
    options = dict(max_iter=max_iter, tol=0.0, reg_covar=reg_covar, means_init=means, variances_init=variances,
                   weights_init=weights, dtype=torch.float64)
    if use_clean_probability:  # min-max normalised first, then the lower-mean component's posterior
        x_np = x.numpy()
        normalised = (x_np - x_np.min()) / (x_np.max() - x_np.min())
        theirs, their_means, their_weights = sklearn_posteriors(normalised, means, variances, weights, max_iter,
                                                                reg_covar)
        clean = int(np.argmin(their_means))
        if their_weights[clean] < 0.01:
            clean = 1 - clean
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = clean_probability(x, **options)
        np.testing.assert_allclose(ours.numpy(), theirs[:, clean], rtol=0, atol=1e-7)
    else:
        theirs, _, _ = sklearn_posteriors(x.numpy(), means, variances, weights, max_iter, reg_covar)
        model = GMM1D(**options)
        np.testing.assert_allclose(model.fit_predict_proba(x).numpy(), theirs, rtol=0, atol=1e-7)
        np.testing.assert_allclose(model.predict_proba(x).numpy(), theirs, rtol=0, atol=1e-7)


@given(losses=loss_vectors(), data=st.data())
def test_gmm1d_fit_and_posterior_or_names_the_argument(losses, data):
    options = gmm_options(data.draw)
    broken = break_gmm_options(data.draw, options) if data.draw(st.booleans()) else set()
    if broken:
        expect_error(broken, GMM1D, **options)
        return
    model = GMM1D(**options)
    if not bool(torch.isfinite(losses).all()):
        expect_error({"x"}, model.fit, losses)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if allowing_reg_covar_error(model.fit, losses if data.draw(st.booleans())
                                    else losses.clone().requires_grad_()) is None:
            return
    queries = data.draw(st.sampled_from(["same", "other", "empty", "bad", "component"]))
    if queries == "bad":
        bad = data.draw(st.sampled_from([losses.tolist(), losses.long(), losses.reshape(1, -1),
                                         torch.tensor([math.nan], dtype=losses.dtype)]))
        expect_error({"x"}, model.predict_proba, bad)
        return
    if queries == "component":
        expect_error({"component"}, model.posterior, losses, data.draw(st.sampled_from([2, -1, 0.5, "0", None])))
        return
    x = {"same": losses, "other": losses.flip(0) * 2 - 1, "empty": losses[:0]}[queries]
    if not bool(torch.isfinite(x).all()):
        expect_error({"x"}, model.predict_proba, x)
        return
    proba = model.predict_proba(x)
    assert proba.shape == (x.numel(), 2) and proba.dtype == model.dtype
    assert bool(torch.isfinite(proba).all()) and bool(((proba >= 0) & (proba <= 1)).all())
    torch.testing.assert_close(proba.double().sum(dim=1), torch.ones(x.numel(), dtype=torch.float64),
                               rtol=0, atol=1e-6)
    assert bool(torch.isfinite(model.means_).all()) and bool((model.variances_ >= 0).all())
    torch.testing.assert_close(model.weights_.sum(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-9)


def corrupt_history_state(draw, state: dict, n: int, window: int) -> dict:
    state = dict(state)
    key = draw(st.sampled_from(["values", "counts", "next", "missing", "type"]))
    if key == "missing":
        del state[draw(st.sampled_from(["values", "counts", "next"]))]
    elif key == "type":
        return draw(st.sampled_from([None, 5, "state", [1, 2], {"values": 1, "counts": 2, "next": 3}]))
    elif key == "values":
        state["values"] = draw(st.sampled_from([torch.zeros(n + 1, window), torch.zeros(n, window).tolist(),
                                                torch.full((n, window), math.nan), torch.zeros(n, window, dtype=torch.int64),
                                                torch.full((n, window), math.inf)]))
    elif key == "counts":
        state["counts"] = draw(st.sampled_from([torch.full((n,), -1), torch.full((n,), window + 1),
                                                torch.zeros(n + 1, dtype=torch.int64), torch.zeros(n),
                                                torch.zeros(n).tolist()]))
    else:
        state["next"] = draw(st.sampled_from([torch.full((n,), window), torch.full((n,), -1),
                                              torch.zeros(n, 2, dtype=torch.int64), torch.zeros(n, dtype=torch.bool)]))
    return state


@given(n=st.integers(1, 12), window=st.integers(1, 5), data=st.data())
def test_loss_history_matches_a_plain_model(n, window, data):
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    history = LossHistory(n, window, dtype=dtype)
    recorded: list[list[float]] = [[] for _ in range(n)]
    for _ in range(data.draw(st.integers(1, 8), label="steps")):
        action = data.draw(st.sampled_from(["update", "update_all", "bad_update", "mean", "load", "bad_load"]))
        if action in ("update", "bad_update"):
            ids = data.draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n))
            values = [data.draw(st.floats(-1e6, 1e6)) for _ in ids]
            indices, losses = torch.tensor(ids, dtype=torch.int64), torch.tensor(values, dtype=torch.float64)
            if action == "bad_update":
                how = data.draw(st.sampled_from(["range", "dtype", "duplicate", "nan", "length", "type", "2d"]))
                if how == "range":
                    indices = torch.tensor(ids + [data.draw(st.sampled_from([n, -1, 2**40]))])
                    losses = torch.cat([losses, torch.zeros(1, dtype=torch.float64)])
                elif how == "dtype":
                    indices = indices.to(data.draw(st.sampled_from([torch.int32, torch.float32, torch.bool])))
                elif how == "duplicate":
                    indices, losses = torch.tensor(ids + [0, 0]), torch.cat([losses, torch.zeros(2, dtype=torch.float64)])
                elif how == "nan":
                    indices, losses = torch.tensor(ids + [0] if 0 not in ids else ids), torch.cat(
                        [losses, torch.tensor([math.nan], dtype=torch.float64)])[: len(ids) + (0 not in ids)]
                    losses[-1] = math.nan
                elif how == "length":
                    losses = torch.cat([losses, torch.zeros(1, dtype=torch.float64)])
                elif how == "type":
                    indices = ids
                else:
                    indices, losses = indices.reshape(1, -1), losses.reshape(1, -1)
                before = history.state_dict()
                expect_error({"indices", "losses"}, history.update, indices, losses)
                after = history.state_dict()
                assert all(torch.equal(before[key], after[key], ) for key in before)  # nothing half-done
                continue
            history.update(indices, losses if data.draw(st.booleans()) else losses.requires_grad_())
            for i, value in zip(ids, losses.tolist()):
                recorded[i] = (recorded[i] + [torch.tensor(value, dtype=dtype).item()])[-window:]
        elif action == "update_all":
            values = torch.tensor([data.draw(st.floats(-1e3, 1e3)) for _ in range(n)], dtype=torch.float64)
            history.update(None, values)
            for i, value in enumerate(values.tolist()):
                recorded[i] = (recorded[i] + [torch.tensor(value, dtype=dtype).item()])[-window:]
        elif action == "mean":
            ids = data.draw(st.lists(st.integers(0, n - 1), max_size=n))
            if any(not recorded[i] for i in ids):
                expect_error({"sample", "recorded"}, history.mean, torch.tensor(ids, dtype=torch.int64))
            else:
                got = history.mean(torch.tensor(ids, dtype=torch.int64))
                expected = torch.tensor([sum(recorded[i]) / len(recorded[i]) for i in ids], dtype=torch.float64)
                torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6 if dtype == torch.float32
                                           else 1e-9)
        elif action == "load":
            other = LossHistory(n, window, dtype=dtype)
            other.load_state_dict(history.state_dict())
            history = other
        else:
            before = history.state_dict()
            bad = corrupt_history_state(data.draw, before, n, window)
            expect_error({"state"}, history.load_state_dict, bad)
            after = history.state_dict()
            assert all(torch.equal(before[key], after[key]) for key in before)
    assert not history.values.requires_grad


@given(num_samples=st.one_of(st.integers(-3, 3), st.sampled_from([1.5, True, "4", None, np.int64(3)])),
       window=st.one_of(st.integers(-2, 3), st.sampled_from([2.0, False, None])),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64, torch.bool, "float32", None]),
       device=st.sampled_from([None, "cpu", torch.device("cpu"), "cpu:0", "gpu", "not a device", 3.5, "meta:x"]))
def test_loss_history_construction_is_checked(num_samples, window, dtype, device):
    valid_n = isinstance(num_samples, int) and not isinstance(num_samples, bool) and num_samples >= 1
    valid_w = isinstance(window, int) and not isinstance(window, bool) and window >= 1
    valid_dtype = isinstance(dtype, torch.dtype) and dtype.is_floating_point
    valid_device = device is None or str(device) in ("cpu", "cpu:0")
    kwargs = dict(dtype=dtype, device=device)
    if valid_n and valid_w and valid_dtype and valid_device:
        history = LossHistory(num_samples, window, **kwargs)
        assert history.values.shape == (num_samples, window) and history.values.dtype == dtype
        return
    names = ({"num_samples"} if not valid_n else set()) | ({"window"} if not valid_w else set()) \
        | ({"dtype"} if not valid_dtype else set()) | ({"device"} if not valid_device else set())
    expect_error(names, LossHistory, num_samples, window, **kwargs)


# ============================================================================ nearest neighbours

def power_of_two_scale(x: torch.Tensor) -> float:
    """A power of two that brings max |x| near 1: ranking by distance is unchanged and float64
    squares can neither overflow nor underflow (the reference must work for 1e300 and 1e-300)."""
    top = float(x.abs().max()) if x.numel() else 0.0
    return 1.0 if top == 0.0 or not math.isfinite(top) else math.ldexp(1.0, -math.frexp(top)[1])


def reference_vectors(x: torch.Tensor, metric: str, storage: torch.dtype) -> tuple[torch.Tensor, float]:
    """float64 vectors whose squared Euclidean distances rank ``metric``, and the factor by which
    their distances must be divided (Euclidean) to be in the input's units.  Cosine: unit rows
    (normalised in float64, from rows scaled by a power of two) rounded to ``storage``, the dtype
    the index keeps them in, since that rounding is part of what the search ranks."""
    x = x.double()
    if metric == "cosine":
        rows = x * torch.tensor([power_of_two_scale(row) for row in x], dtype=torch.float64).unsqueeze(1)
        return (rows / torch.linalg.vector_norm(rows, dim=1, keepdim=True)).to(storage).double(), 1.0
    scale = power_of_two_scale(x)
    return x * scale, scale


def storage_dtype(features: torch.Tensor) -> torch.dtype:
    return torch.float64 if features.dtype == torch.float64 else torch.float32


def brute_force(base: torch.Tensor, queries: torch.Tensor, exclude: torch.Tensor | None) -> torch.Tensor:
    """Exact squared distances (Q, N) by differences in float64, excluded pairs at +inf."""
    sq = ((queries.unsqueeze(1) - base.unsqueeze(0)) ** 2).sum(dim=-1)
    if exclude is not None:
        rows = torch.nonzero(exclude >= 0).squeeze(1)
        sq[rows, exclude[rows]] = math.inf
    return sq


def check_neighbours(ids: torch.Tensor, distances, base: torch.Tensor, queries: torch.Tensor, k: int, backend: str,
                     metric: str, scale: float, exclude, dtype: torch.dtype) -> None:
    """ids (Q, k) against brute force over the reference vectors (base and queries)."""
    sq = brute_force(base, queries, exclude)
    q, n = sq.shape
    assert ids.shape == (q, k) and ids.dtype == torch.int64
    assert bool(((ids >= 0) & (ids < n)).all())
    for row in ids.tolist():
        assert len(set(row)) == k, f"repeated neighbour in {row}"
    if exclude is not None:
        assert not bool((ids == exclude.unsqueeze(1)).any()), "an excluded row came back"
    found = sq.gather(1, ids)  # the true distances of what came back
    assert bool(torch.isfinite(found).all())
    true_k = sq.sort(dim=1).values[:, :k]
    # slack for each backend's rounding: the exact backend ranks by float64 distances (its float32
    # proposals, from centred vectors, are proven or redone), so only float64 rounding relative to
    # the centred extent; faiss proposes by the float32 expansion |q|^2 + |b|^2 - 2 q.b of the
    # uncentred vectors, with 8 spare candidates: its cancellation error
    both = torch.cat([base, queries])
    centred = float(((both - base.mean(dim=0)) ** 2).sum(dim=1).max()) if both.numel() else 0.0
    uncentred = float((both ** 2).sum(dim=1).max()) if both.numel() else 0.0
    slack = 1e-12 * centred if backend == "exact" else 4 * (base.shape[1] + 8) * 2.0**-24 * uncentred + 1e-9 * centred
    assert bool((found[:, 1:] >= found[:, :-1] - slack).all()), "not nearest first"
    if backend != "hnsw":  # hnsw is approximate: only what it returns is checked
        assert bool((found <= true_k + slack).all()), f"not the {k} nearest: {found.tolist()} vs {true_k.tolist()}"
    if distances is not None:
        assert distances.shape == (q, k) and distances.dtype == (torch.float64 if dtype == torch.float64
                                                                   else torch.float32)
        expected = found.sqrt() / scale if metric == "euclidean" else found / 2
        rtol = 1e-10 if dtype == torch.float64 else 2e-6
        torch.testing.assert_close(distances.double(), expected.to(distances.dtype).double(), rtol=rtol,
                                   atol=1e-6 * math.sqrt(slack + 1e-300) / scale if metric == "euclidean"
                                   else 1e-6)


@st.composite
def feature_sets(draw, min_rows: int = 0):
    gen = seeded(draw)
    n, d = draw(st.integers(min_rows, 40), label="N"), draw(st.integers(1, 6), label="d")
    pattern = draw(st.sampled_from(["gaussian", "grid", "duplicates", "clusters"]))
    if pattern == "gaussian":
        x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    elif pattern == "grid":  # ties and exact duplicates everywhere
        x = torch.randint(-1, 2, (n, d), generator=gen).double()
    elif pattern == "duplicates":
        x = torch.randn(1, d, generator=gen, dtype=torch.float64).expand(n, d).clone()
    else:
        centres = torch.randn(3, d, generator=gen, dtype=torch.float64) * 10
        x = centres[torch.randint(0, 3, (n,), generator=gen)] + 1e-3 * torch.randn(n, d, generator=gen,
                                                                                    dtype=torch.float64)
    exponent = draw(st.sampled_from([0, 0, 0, -3, 3, -20, 20, -30, 30, -38, 37, -300, 300]), label="10^")
    offset = draw(st.sampled_from([0.0, 0.0, 1.0, 1e6]))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    return ((x + offset) * 10.0**exponent).to(dtype)


def index_options(draw, backend: str, d: int) -> dict:
    options = {}
    if backend == "hnsw":
        if draw(st.booleans()):
            options["pca_dim"] = draw(st.sampled_from([None, 1, 2, max(1, d - 1), d, 64]))
            options["pca_min_variance"] = draw(st.sampled_from([0.0, 0.8, 1.0]))
        if draw(st.booleans()):
            options.update(M=draw(st.integers(2, 20)), ef=draw(st.integers(1, 40)),
                           ef_construction=draw(st.integers(1, 80)), candidates=draw(st.integers(1, 6)))
    if draw(st.booleans()):
        options["num_threads"] = draw(st.integers(1, 3))
    if draw(st.booleans()):
        options["seed"] = draw(st.sampled_from([0, 7, 2**32, 2**64 - 1]))
    return options


def break_index_options(draw, options: dict) -> set:
    name = draw(st.sampled_from(["backend", "metric", "pca_dim", "candidates", "M", "ef", "ef_construction",
                                 "num_threads", "seed", "pca_sample", "pca_min_variance"]))
    options[name] = draw(st.sampled_from({
        "backend": ["annoy", "", None, ["exact"]], "metric": ["l2", "dot", None, ["cosine"]],
        "pca_dim": [0, -1, 1.5, "8"], "candidates": [0, -2, 2.5], "M": [1, 0, -1, "16"], "ef": [0, -1, 1.5],
        "ef_construction": [0, None], "num_threads": [0, -1, 1.5, "2"], "seed": [-1, 2**64, 1.5, "0", 2**70],
        "pca_sample": [1, 0, -5, 2.5], "pca_min_variance": [-0.1, 1.5, math.nan, "0.8"]}[name]))
    return {name}


@given(features=feature_sets(), data=st.data())
def test_nearest_neighbours_are_the_nearest_or_names_the_argument(features, data):
    n = features.shape[0]
    backend = data.draw(st.sampled_from(["exact", "hnsw", "faiss"]))
    metric = data.draw(st.sampled_from(["euclidean", "cosine"]))
    k = data.draw(st.one_of(st.integers(1, 3), st.integers(-1, n + 1)), label="k")
    options = index_options(data.draw, backend, features.shape[1])
    broken = set()
    how = data.draw(st.sampled_from([None, None, None, "options", "features", "k"]))
    if how == "options":
        broken = break_index_options(data.draw, options)
    elif how == "features":
        broken = {"features"}
        if data.draw(st.booleans()) and features.numel():
            features = features.clone()
            features.view(-1)[data.draw(st.integers(0, features.numel() - 1))] = data.draw(
                st.sampled_from([math.nan, math.inf, -math.inf]))
        else:
            features = data.draw(st.sampled_from([features.long(), features.bool(), features.reshape(-1),
                                                  features.unsqueeze(0), features.tolist(), None,
                                                  features.to(torch.complex64)]))
    elif how == "k":
        k = data.draw(st.sampled_from([1.0, "1", None, True, np.float64(2.0)]))
        broken = {"k"}
    valid_features = isinstance(features, torch.Tensor) and features.ndim == 2 and features.is_floating_point() \
        and bool(torch.isfinite(features).all())
    if not valid_features or n < 2:
        broken.add("features")
    elif metric == "cosine" and bool((features.double().abs().sum(dim=1) == 0).any()):
        broken.add("features")  # a zero row has no direction
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n - 1:
        broken.add("k")
    kwargs = dict(backend=backend, metric=metric, return_distances=data.draw(st.booleans()))
    kwargs.update(options)  # a broken backend or metric replaces the drawn one
    if broken:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expect_error(broken, nearest_neighbours, features, k, **kwargs)
        return
    return_distances = kwargs["return_distances"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "PCA keeps only x% of the variance"
        result = nearest_neighbours(features, k, **kwargs)
    ids, distances = result if return_distances else (result, None)
    vectors, scale = reference_vectors(features, metric, storage_dtype(features))
    exclude = torch.arange(n)
    check_neighbours(ids, distances, vectors, vectors, k, backend, metric, scale, exclude, features.dtype)


@given(features=feature_sets(min_rows=2), data=st.data())
def test_index_queries_are_the_nearest_or_name_the_argument(features, data):
    n, d = features.shape
    backend = data.draw(st.sampled_from(["exact", "hnsw", "faiss"]))
    metric = data.draw(st.sampled_from(["euclidean", "cosine"]))
    if not bool(torch.isfinite(features).all()) or (
            metric == "cosine" and bool((features.double().abs().sum(dim=1) == 0).any())):
        expect_error({"features"}, NeighbourIndex, features, backend=backend, metric=metric)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        index = NeighbourIndex(features, backend=backend, metric=metric, **index_options(data.draw, backend, d))
    gen = seeded(data.draw)
    q = data.draw(st.integers(0, 5), label="Q")
    rows = torch.randint(0, n, (q,), generator=gen)
    queries = features[rows].double() * data.draw(st.sampled_from([1.0, 1.0, -1.0, 2.0, 1e3])) + \
        data.draw(st.sampled_from([0.0, 1.0, 1e-3])) * torch.randn(q, d, generator=gen, dtype=torch.float64)
    queries = queries.to(data.draw(st.sampled_from([features.dtype, torch.float32, torch.float64])))
    use_exclude = data.draw(st.booleans())
    exclude = torch.where(torch.rand(q, generator=gen) < 0.8, rows, torch.full_like(rows, -1)) if use_exclude else None
    k = data.draw(st.integers(1, n - 1 if use_exclude else n), label="k")
    broken = set()
    how = data.draw(st.sampled_from([None, None, "queries", "exclude", "k"]))
    if how == "queries":
        queries = data.draw(st.sampled_from([queries.long(), queries[:, :-1] if d > 1 else queries.reshape(-1),
                                             torch.cat([queries, torch.full((1, d), math.nan)]), queries.tolist()]))
        broken = {"queries"}
    elif how == "exclude":
        exclude = data.draw(st.sampled_from([torch.full((q,), n), torch.full((q,), -2), torch.zeros(q + 1, dtype=torch.int64),
                                             torch.zeros(q), torch.zeros(q, dtype=torch.bool), [0] * q]))
        broken = {"exclude"}
        if isinstance(exclude, torch.Tensor) and exclude.shape == (0,) and exclude.dtype == torch.int64:
            broken = set()  # nothing to check in an empty batch
            exclude = exclude if q == 0 else exclude
    elif how == "k":
        k = data.draw(st.sampled_from([0, n + 1, 1.5, None]))
        broken = {"k"}
    if exclude is not None and isinstance(exclude, torch.Tensor) and exclude.dtype == torch.int64 and \
            exclude.shape == (q,) and not broken and k > n - 1:
        broken = {"k"}
    if isinstance(queries, torch.Tensor) and queries.ndim == 2 and queries.is_floating_point() and metric == "cosine" \
            and bool((queries.double().abs().sum(dim=1) == 0).any()):
        broken.add("queries")
    if isinstance(queries, torch.Tensor) and queries.is_floating_point() and not bool(torch.isfinite(queries).all()):
        broken.add("queries")  # the scaled queries overflowed their dtype
    # Queries whose scale is far beyond the indexed features' (2**100 in float32, or overflowing
    # float64 once brought to the features' scale) may be refused, naming queries: the index
    # searches at its features' scale.
    maybe_out_of_range = False
    if isinstance(queries, torch.Tensor) and queries.is_floating_point() and queries.ndim == 2 and metric == "euclidean":
        relative = queries.double() * power_of_two_scale(features.double())
        limit = 2.0**400 if features.dtype == torch.float64 else 2.0**100
        maybe_out_of_range = not bool(torch.isfinite(relative).all()) or bool((relative.abs() > limit).any())
    if broken and maybe_out_of_range:
        broken.add("queries")
    if broken:
        expect_error(broken, index.query, queries, k, exclude=exclude, return_distances=True)
        return
    if maybe_out_of_range:  # either outcome is right; a result is checked where float64 can check it
        try:
            ids, distances = index.query(queries, k, exclude=exclude, return_distances=True)
        except ValueError as exc:
            assert "queries" in str(exc), exc
            return
        if not bool(torch.isfinite(queries.double() * power_of_two_scale(features.double())).all()):
            return
    else:
        ids, distances = index.query(queries, k, exclude=exclude, return_distances=True)
    storage = storage_dtype(features)
    base, scale = reference_vectors(features, metric, storage)
    if metric == "cosine":  # the index casts the queries to its dtype first (if they fit), then normalises them
        fits = bool(torch.isfinite(queries.to(storage)).all())
        vectors, _ = reference_vectors(queries.to(storage) if fits else queries, metric, storage)
    else:  # the index brings queries to its features' scale in the wider dtype, then rounds them to its own:
        # float64 queries beyond float32's range may still fit once scaled
        vectors = (queries.double() * scale).to(storage).double()
    check_neighbours(ids, distances, base, vectors, k, backend, metric, scale, exclude,
                     torch.float32 if features.dtype != torch.float64 else torch.float64)


# ============================================================================ mixing weights

def eq_10_11(w: list[float], anchors: list[int], neighbours: list[list[int]], on_zero: str, k: int) -> torch.Tensor:
    """lambda_i = w_i / S_i, beta_ik = w_n / S_i with S_i = w_i + sum_k w_n, row by row in float64."""
    rows = []
    for i, partners in zip(anchors, neighbours):
        values = [w[i]] + [w[j] for j in partners]
        total = math.fsum(values)
        if total == 0:
            rows.append([1.0 / len(values)] * len(values) if on_zero == "uniform" else [1.0] + [0.0] * (len(values) - 1))
        else:
            rows.append([v / total for v in values])
    return torch.tensor(rows, dtype=torch.float64).reshape(len(anchors), k + 1)


@given(data=st.data())
def test_mixing_weights_follow_eq_10_11_or_name_the_argument(data):
    gen = seeded(data.draw)
    n = data.draw(st.integers(0, 12), label="N")
    k = data.draw(st.integers(0, 4), label="K")
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES))
    values = [data.draw(st.sampled_from([0.0, 1.0, 1e-30, 0.5, 1e-7])) if data.draw(st.booleans())
              else data.draw(st.floats(0, 1)) for _ in range(n)]
    clean_prob = torch.tensor(values, dtype=torch.float64).to(dtype)
    use_anchors = data.draw(st.booleans())
    m = data.draw(st.integers(0, 6)) if use_anchors and n else n
    neighbours = torch.randint(0, max(n, 1), (m, k), generator=gen)
    anchors = torch.randint(0, max(n, 1), (m,), generator=gen) if use_anchors else None
    mode = data.draw(st.sampled_from(["gmm", "gmm", "avg", "rdm", "mixup"]))
    kwargs = dict(mode=mode, anchors=anchors, on_zero=data.draw(st.sampled_from(["uniform", "anchor"])))
    if data.draw(st.booleans()):
        kwargs["alpha"] = data.draw(st.sampled_from([1.0, 0.2, 4.0, 1e-3, 1e-300, 1e-310, 1e300, 1.7e308]))
    if data.draw(st.booleans()):
        kwargs["generator"] = torch.Generator().manual_seed(data.draw(st.integers(0, 99)))
    broken = set()
    how = data.draw(st.sampled_from([None, None, "clean_prob", "neighbours", "anchors", "mode", "alpha", "on_zero",
                                     "generator"]))
    if how == "clean_prob":
        bad = clean_prob.clone().double()
        if n:
            bad[data.draw(st.integers(0, n - 1))] = data.draw(st.sampled_from([-0.1, 1.5, math.nan, math.inf]))
        clean_prob = data.draw(st.sampled_from([bad, clean_prob.reshape(1, -1), clean_prob.long(), values]))
        broken = {"clean_prob"}
        if isinstance(clean_prob, torch.Tensor) and clean_prob.ndim == 1 and clean_prob.is_floating_point() and n == 0:
            broken = set()  # an empty vector has no bad value
    elif how == "neighbours":
        bad = neighbours.clone()
        if bad.numel():
            bad[0, 0] = data.draw(st.sampled_from([n, -1, 2**40]))
        neighbours = data.draw(st.sampled_from([bad, neighbours.to(torch.int32), neighbours.float(),
                                                neighbours.reshape(-1), neighbours.tolist()]))
        broken = {"neighbours"}
        if isinstance(neighbours, torch.Tensor) and neighbours.dtype == torch.int64 and neighbours.ndim == 2 \
                and neighbours.numel() == 0:
            broken = set()
    elif how == "anchors":
        kwargs["anchors"] = data.draw(st.sampled_from([torch.full((m,), n), torch.full((m,), -1),
                                                       torch.zeros(m + 1, dtype=torch.int64),
                                                       torch.zeros(m, dtype=torch.int32), [0] * m]))
        broken = {"anchors", "neighbours"}
        if isinstance(kwargs["anchors"], torch.Tensor) and kwargs["anchors"].dtype == torch.int64 and m == 0 \
                and kwargs["anchors"].shape == (0,):
            broken = set()
    elif how == "mode":
        kwargs["mode"], broken = data.draw(st.sampled_from(["GMM", "", None, ["gmm"], "mix"])), {"mode"}
    elif how == "alpha":
        kwargs["alpha"] = data.draw(st.sampled_from([0.0, -1.0, math.nan, math.inf, "1", None, -1e-300]))
        broken = {"alpha"}
    elif how == "on_zero":
        kwargs["on_zero"], broken = data.draw(st.sampled_from(["zero", None, ["anchor"]])), {"on_zero"}
    elif how == "generator":
        kwargs["generator"], broken = data.draw(st.sampled_from([0, "gen", np.random.default_rng(0)])), {"generator"}
    if not broken and kwargs["mode"] == "mixup" and k != 1:
        broken = {"mode", "K"}
    if not broken and not use_anchors and neighbours.shape[0] != n:
        broken = {"neighbours"}
    if broken:
        expect_error(broken, mixing_weights, clean_prob, neighbours, **kwargs)
        return
    weights = mixing_weights(clean_prob, neighbours, **kwargs)
    assert weights.shape == (m, k + 1) and weights.dtype == torch.float32
    assert bool(torch.isfinite(weights).all()) and bool((weights >= 0).all()), weights
    torch.testing.assert_close(weights.double().sum(dim=1), torch.ones(m, dtype=torch.float64), rtol=0, atol=1e-6)
    if kwargs["mode"] == "gmm":
        expected = eq_10_11(clean_prob.double().tolist(), (anchors if use_anchors else torch.arange(n)).tolist(),
                            neighbours.tolist(), kwargs["on_zero"], k)
        torch.testing.assert_close(weights.double(), expected.reshape(m, k + 1), rtol=1e-6, atol=1e-7)
    elif kwargs["mode"] == "avg":
        assert bool((weights == torch.full((m, k + 1), 1.0 / (k + 1))).all())
    elif kwargs["mode"] == "mixup" and m:
        assert bool((weights == weights[:1]).all()), "mixup shares one lambda per call"


@given(n=st.one_of(st.integers(1, 40), st.integers(2040, 2100), st.sampled_from([0, -1, 1.5, True, "3", None])),
       data=st.data())
def test_random_partners_are_distinct_others_or_name_the_argument(n, data):
    valid_n = isinstance(n, int) and not isinstance(n, bool) and n >= 1
    k = data.draw(st.one_of(st.integers(0, 3), st.integers(-1, (n if valid_n else 3) + 1),
                            st.sampled_from([1.0, None, "1"])), label="k")
    generator = data.draw(st.sampled_from([None, "seeded", "bad"]))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 99))) if generator == "seeded" \
        else (0 if generator == "bad" else None)
    device = data.draw(st.sampled_from([None, None, "cpu", torch.device("cpu"), "nowhere", 3.5, "cuda:7"]))
    names = set()
    if not valid_n:
        names.add("n")
    if not (isinstance(k, int) and not isinstance(k, bool) and valid_n and 0 <= k <= n - 1):
        names.add("k")
    if generator == 0:
        names.add("generator")
    if device not in (None, "cpu") and not isinstance(device, torch.device):
        names.add("device")
    if names:
        expect_error(names, random_partners, n, k, generator, device=device)
        return
    partners = random_partners(n, k, generator, device=device)
    assert partners.shape == (n, k) and partners.dtype == torch.int64
    assert bool(((partners >= 0) & (partners < n)).all())
    assert not bool((partners == torch.arange(n).unsqueeze(1)).any()), "a sample is its own partner"
    if k > 1:
        ordered = partners.sort(dim=1).values
        assert not bool((ordered[:, 1:] == ordered[:, :-1]).any()), "a repeated partner"


# ============================================================================ soft targets

def corrupt_targets_state(draw, state: dict, n: int, classes: int):
    state = dict(state)
    key = draw(st.sampled_from(["targets", "labels", "num_classes", "momentum", "start_epoch", "update_every",
                                "missing", "type"]))
    if key == "missing":  # "kind" may be missing: checkpoints from before the top-k store have none
        del state[draw(st.sampled_from(sorted(set(state) - {"kind"})))]
    elif key == "type":
        return draw(st.sampled_from([None, 3, "state", [("targets", 1)]]))
    else:
        state[key] = draw(st.sampled_from({
            "targets": [torch.zeros(n + 1, classes), torch.full((n, classes), math.nan), torch.zeros(n, classes).tolist(),
                        torch.full((n, classes), -1.0), torch.zeros(n, classes, dtype=torch.int64), None] if n
            else [torch.zeros(n + 1, classes), None, "t"],
            "labels": [torch.full((n,), classes), torch.full((n,), -1), torch.zeros(n + 1, dtype=torch.int64),
                       torch.zeros(n), [0] * n, None] if n else [torch.zeros(1, dtype=torch.int64), None, "l"],
            "num_classes": [classes + 1, 0, "3", None, 2.5],
            "momentum": [-0.1, 1.5, math.nan, "0.9", None, [0.9]],
            "start_epoch": [-1, 1.5, "60", None],
            "update_every": [0, -1, 2.5, "1", None, True],
        }[key]))
    return state


@given(n=st.integers(0, 8), classes=st.integers(1, 5), data=st.data())
def test_soft_targets_follow_the_ema_or_name_the_argument(n, classes, data):
    gen = seeded(data.draw)
    labels = torch.randint(0, classes, (n,), generator=gen)
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    momentum = data.draw(st.sampled_from([0.9, 0.0, 1.0, 0.5, 0.99]))
    start, every = data.draw(st.integers(0, 3)), data.draw(st.integers(1, 3))
    store = SoftTargets(labels, classes, momentum=momentum, start_epoch=start, update_every=every, dtype=dtype)
    expected = torch.nn.functional.one_hot(labels, classes).double() if n else torch.zeros(0, classes, dtype=torch.float64)
    steps = 0
    for epoch in range(data.draw(st.integers(1, 6), label="epochs")):
        ids = data.draw(st.lists(st.integers(0, max(n - 1, 0)), unique=True, max_size=n) if n else st.just([]))
        logits = torch.randn(len(ids), classes, generator=gen, dtype=torch.float64) * 3
        probabilities = torch.softmax(logits, dim=1).to(data.draw(st.sampled_from(FLOAT_DTYPES)))
        indices = torch.tensor(ids, dtype=torch.int64)
        how = data.draw(st.sampled_from([None, None, None, "indices", "probabilities", "epoch", "load", "bad_load"]))
        before = store.state_dict()
        if how == "indices":
            bad = data.draw(st.sampled_from([indices.to(torch.int32), torch.tensor(ids + [n]), torch.tensor(ids + [-1]),
                                             torch.tensor(ids + ids[:1]) if ids else torch.tensor([n]), ids, indices.float()]))
            expect_error({"indices", "probabilities"}, store.update, bad, probabilities, epoch)
        elif how == "probabilities":
            bad = probabilities.double().clone()
            if ids:
                bad[0, 0] = data.draw(st.sampled_from([math.nan, -0.5, math.inf, 5.0]))
            else:
                bad = torch.zeros(1, classes)
            bad = data.draw(st.sampled_from([bad, probabilities.long(), probabilities.reshape(-1, 1, classes),
                                             probabilities.tolist() if ids else "p", torch.zeros(len(ids), classes + 1)]))
            expect_error({"probabilities"}, store.update, indices, bad, epoch)
        elif how == "epoch":
            expect_error({"epoch"}, store.update, indices, probabilities, data.draw(st.sampled_from([1.0, "1", None, True])))
        elif how == "bad_load":
            expect_error({"state"}, store.load_state_dict, corrupt_targets_state(data.draw, before, n, classes))
        if how is not None and how != "load":  # a refused call changes nothing
            after = store.state_dict()
            assert torch.equal(before["targets"], after["targets"]) and torch.equal(before["labels"], after["labels"])
            assert {key: before[key] for key in ("momentum", "start_epoch", "update_every")} == \
                {key: after[key] for key in ("momentum", "start_epoch", "update_every")}
            continue
        if how == "load":
            other = SoftTargets(torch.zeros(n, dtype=torch.int64), classes, dtype=dtype)
            other.load_state_dict(before)
            store = other
        applied = store.update(indices, probabilities if data.draw(st.booleans())
                               else probabilities.clone().requires_grad_(), epoch)
        assert applied == (epoch >= start and (epoch - start) % every == 0)
        if applied:
            steps += 1
            expected[ids] = momentum * expected[ids] + (1 - momentum) * probabilities.double()
        # each applied step computes in float32 (float64 storage: float64) and rounds once to storage
        step_error = {torch.float32: 2.0**-23, torch.float64: 2.0**-51, torch.float16: 2.0**-10,
                      torch.bfloat16: 2.0**-7}[dtype]
        work_error = 2.0**-23 if dtype != torch.float64 else 2.0**-51
        torch.testing.assert_close(store.targets.double(), expected, rtol=0,
                                   atol=(steps + 1) * (step_error + work_error + 2.0**-10 * (
                                       probabilities.dtype in (torch.float16, torch.bfloat16))))
    assert not store.targets.requires_grad and store.targets.grad_fn is None


@given(labels=st.one_of(st.lists(st.integers(-1, 5), max_size=6).map(lambda v: torch.tensor(v, dtype=torch.int64)),
                        st.sampled_from([torch.zeros(3), torch.zeros(2, 2, dtype=torch.int64), [0, 1], None,
                                         torch.zeros(3, dtype=torch.int32)])),
       num_classes=st.one_of(st.integers(-1, 6), st.sampled_from([2.0, True, "3", None])),
       momentum=st.one_of(st.floats(-0.5, 1.5), st.sampled_from([math.nan, math.inf, "0.9", None])),
       start_epoch=st.sampled_from([0, 60, -1, 1.5, None]), update_every=st.sampled_from([1, 10, 0, -1, 2.0]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, "float32"]),
       device=st.sampled_from([None, "cpu", torch.device("cpu"), "nowhere", "cuda:9", 2.5]))
def test_soft_targets_construction_is_checked(labels, num_classes, momentum, start_epoch, update_every, dtype, device):
    names = set()
    valid_c = isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes >= 1
    if not valid_c:
        names.add("num_classes")
    if not (isinstance(labels, torch.Tensor) and labels.ndim == 1 and labels.dtype == torch.int64
            and (not valid_c or labels.numel() == 0 or (int(labels.min()) >= 0 and int(labels.max()) < num_classes))):
        names.add("labels")
    if not (isinstance(momentum, float) and 0 <= momentum <= 1):
        names.add("momentum")
    if not (isinstance(start_epoch, int) and start_epoch >= 0):
        names.add("start_epoch")
    if not (isinstance(update_every, int) and not isinstance(update_every, bool) and update_every >= 1):
        names.add("update_every")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        names.add("dtype")
    if not (device is None or str(device) == "cpu"):
        names.add("device")
    kwargs = dict(momentum=momentum, start_epoch=start_epoch, update_every=update_every, dtype=dtype, device=device)
    if names:
        expect_error(names, SoftTargets, labels, num_classes, **kwargs)
        return
    store = SoftTargets(labels, num_classes, **kwargs)
    assert store.targets.shape == (labels.numel(), num_classes) and store.targets.dtype == dtype
    if labels.numel():
        assert torch.equal(store.corrected_labels(), labels)


# ============================================================================ label noise

def expected_replacement(kind: str, c: int, transition=None) -> np.ndarray:
    """Each kind's replacement matrix R, written out here (noise.py's docstring)."""
    if kind == "symmetric_uniform":
        return np.full((c, c), 1.0 / c)
    if kind == "symmetric_flip":
        return (1.0 - np.eye(c)) / (c - 1)
    if kind == "pairflip":
        return np.eye(c)[[(i + 1) % c for i in range(c)]]
    if kind == "custom":
        matrix = np.asarray(transition, dtype=np.float64)
        return matrix / matrix.sum(axis=1, keepdims=True)
    mapping = {"asymmetric_cifar10": {9: 1, 2: 0, 4: 7, 3: 5, 5: 3},
               "asymmetric_fashion_mnist": {0: 6, 6: 0, 2: 4, 4: 2, 5: 7, 7: 9},
               "asymmetric_cifar100": {i: i // 5 * 5 + (i + 1) % 5 for i in range(100)}}[kind]
    out = np.eye(c)
    for source, target in mapping.items():
        out[source] = np.eye(c)[target]
    return out


REQUIRED_CLASSES = {"asymmetric_cifar10": 10, "asymmetric_fashion_mnist": 10, "asymmetric_cifar100": 100}


@st.composite
def noise_calls(draw):
    kind = draw(st.sampled_from(KINDS))
    c = REQUIRED_CLASSES.get(kind) or draw(st.integers(2, 8))
    n = draw(st.integers(0, 200))
    labels = np.asarray(draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)), dtype=np.int64)
    if draw(st.booleans()):
        labels = labels.astype(draw(st.sampled_from([np.int32, np.uint8, np.int16]))) if c <= 100 else labels
    rate = draw(st.one_of(st.floats(0, 1), st.sampled_from([0.0, 1.0, 0.5])))
    kwargs = dict(labels=labels, kind=kind, rate=rate, num_classes=c,
                  seed=draw(st.one_of(st.integers(0, 2**64), st.just(np.random.default_rng(0)))),
                  sampling=draw(st.sampled_from(["exact", "independent"])))
    if kind == "custom":
        matrix = np.asarray([[draw(st.sampled_from([0.0, 0.0, 0.1, 1.0, 3.0])) for _ in range(c)] for _ in range(c)])
        matrix[np.arange(c), draw(st.permutations(range(c)))] += 1.0  # no zero row
        kwargs["transition"] = (matrix / matrix.sum(axis=1, keepdims=True)).tolist()
    return kwargs


def break_noise_call(draw, kwargs: dict) -> set:
    how = draw(st.sampled_from(["labels", "kind", "rate", "num_classes", "seed", "transition", "sampling"]))
    c = kwargs["num_classes"]
    if how == "labels":
        kwargs["labels"] = draw(st.sampled_from([np.array([c]), np.array([-1]), np.array([[0]]), np.array([0.5]),
                                                 [[0], [0, 1]], "0", np.array([True]), np.array(3), None]))
    elif how == "kind":
        kwargs["kind"] = draw(st.sampled_from(["uniform", "", None, ["pairflip"]]))
    elif how == "rate":
        kwargs["rate"] = draw(st.sampled_from([-0.1, 1.01, math.nan, math.inf, "0.2", None, True, [0.2]]))
    elif how == "num_classes":
        kwargs["num_classes"] = draw(st.sampled_from([1, 0, -3, 2.5, "10", None, True]))
        if kwargs["num_classes"] == 1:
            kwargs["labels"] = np.zeros(2, dtype=np.int64)
    elif how == "seed":
        kwargs["seed"] = draw(st.sampled_from([-1, 1.5, "0", None, True, 2**200]))
        if kwargs["seed"] == 2**200:
            return set()  # any non-negative int seeds numpy
    elif how == "transition":
        if kwargs["kind"] == "custom":
            kwargs["transition"] = draw(st.sampled_from([None, np.ones((c, c)), -np.eye(c), np.eye(c + 1),
                                                         np.full((c, c), math.nan), [["a"] * c] * c, [[1.0], [0.0, 1.0]],
                                                         np.eye(c) * 1j]))
        else:
            kwargs["transition"] = np.eye(c)
    else:
        kwargs["sampling"] = draw(st.sampled_from(["systematic", None, ["exact"]]))
    return {how}


@given(call=noise_calls(), data=st.data())
def test_corrupt_realises_the_transition_matrix_or_names_the_argument(call, data):
    broken = break_noise_call(data.draw, call) if data.draw(st.booleans()) else set()
    if broken:
        if "num_classes" in broken or "kind" in broken:  # the kind's class count is checked against it
            broken |= {"num_classes", "kind"}
        expect_error(broken, corrupt, **call)
        return
    result = corrupt(**call)
    labels, c, rate = np.asarray(call["labels"]).astype(np.int64), call["num_classes"], call["rate"]
    expected = (1 - rate) * np.eye(c) + rate * expected_replacement(call["kind"], c, call.get("transition"))
    np.testing.assert_allclose(result.transition, expected, rtol=0, atol=1e-12)
    assert bool((result.transition >= 0).all())
    np.testing.assert_allclose(result.transition.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert result.labels.shape == labels.shape and result.labels.dtype == np.int64
    assert bool(((result.labels >= 0) & (result.labels < c)).all())
    np.testing.assert_array_equal(result.clean_labels, labels)
    np.testing.assert_array_equal(result.mask, result.labels != labels)
    assert result.rate == (float(result.mask.mean()) if labels.size else 0.0)
    counts = result.counts()
    assert bool((counts[result.transition == 0] == 0).all()), "a label drawn with probability 0"
    if call["sampling"] == "exact":  # every cell is T[i, j] * n_i rounded up or down
        per_class = np.bincount(labels, minlength=c)[:, None]
        target = result.transition * per_class
        assert bool((counts >= np.floor(target - 1e-9)).all() and (counts <= np.ceil(target + 1e-9)).all())
    if not isinstance(call["seed"], np.random.Generator):  # the same seed, the same noise
        np.testing.assert_array_equal(corrupt(**call).labels, result.labels)


@given(kind=st.one_of(st.sampled_from(KINDS), st.sampled_from(["nope", None])),
       rate=st.one_of(st.floats(-0.5, 1.5), st.sampled_from([math.nan, math.inf, "0.1", None, True])),
       num_classes=st.one_of(st.integers(-2, 12), st.sampled_from([100, 2.5, "10", None, True])),
       with_transition=st.booleans())
def test_transition_matrix_is_row_stochastic_or_names_the_argument(kind, rate, num_classes, with_transition):
    valid_c = isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes >= 2
    transition = np.full((num_classes, num_classes), 1.0 / num_classes) if valid_c and with_transition else None
    names = set()
    if kind not in KINDS:
        names.add("kind")
    if not (isinstance(rate, float) and 0 <= rate <= 1):
        names.add("rate")
    if not valid_c or (kind in REQUIRED_CLASSES and num_classes != REQUIRED_CLASSES[kind]):
        names |= {"num_classes"}
    if (kind == "custom") != (transition is not None) and kind in KINDS:
        names.add("transition")
    if names:
        expect_error(names | ({"kind"} if "num_classes" in names and kind in REQUIRED_CLASSES else set()),
                     transition_matrix, kind, rate, num_classes, transition)
        return
    matrix = transition_matrix(kind, rate, num_classes, transition)
    expected = (1 - rate) * np.eye(num_classes) + rate * expected_replacement(kind, num_classes, transition)
    np.testing.assert_allclose(matrix, expected, rtol=0, atol=1e-12)
    assert matrix.shape == (num_classes, num_classes) and bool((matrix >= 0).all())
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, rtol=0, atol=1e-12)


# ============================================================================ regressions
# Concrete inputs the properties above found, each failing before its fix.


def _small_mix_call():
    images = torch.arange(2 * 2 * 2 * 3, dtype=torch.uint8).reshape(2, 2, 2, 3)
    return images, torch.tensor([0]), torch.tensor([[1]]), torch.tensor([[0.75, 0.25]])


@pytest.mark.parametrize("num_threads", [0, -3, 10**5, 2**31 - 1, 1.5, "2", True])
def test_regression_num_threads_is_checked_before_openmp_sees_it(num_threads):
    # 10**5 segfaulted inside libgomp, 2**31 - 1 aborted the process ("Out of memory allocating
    # ... bytes"), 0 and -3 ran silently on one thread
    images, anchors, partners, weights = _small_mix_call()
    expect_error({"num_threads"}, mix_images, images, anchors, partners, weights, num_threads=num_threads)
    expect_error({"num_threads"}, mix_targets, torch.eye(3), anchors, partners, weights, num_threads=num_threads)


@pytest.mark.parametrize("argument,value", [
    ("anchors", [[0], [0, 1]]), ("anchors", [None]), ("anchors", [2**70]), ("anchors", ["0"]),
    ("anchors", np.array([0], dtype=object)), ("anchors", torch.tensor([0]).to_sparse()),
    ("weights", [[0.5], [0.5, 0.5]]), ("weights", torch.tensor([[0.75, 0.25]]).to_sparse()),
    ("in_layout", ["NHWC"]), ("out_dtype", [torch.float32]), ("weight_tolerance", "0.1"),
    ("weight_tolerance", math.nan), ("mean", "abc"), ("mean", [1j]), ("std", [None]),
])
def test_regression_unreadable_arguments_are_named(argument, value):
    # each raised a bare ValueError / TypeError / RuntimeError / NotImplementedError from torch,
    # numpy or a dict lookup, naming nothing (weight_tolerance=nan silently accepted any weights)
    images, anchors, partners, weights = _small_mix_call()
    kwargs = dict(images=images, anchors=anchors, partners=partners, weights=weights)
    kwargs[argument] = value
    expect_error({argument}, mix_images, **kwargs)


def test_regression_numpy_views_torch_cannot_wrap_are_copied():
    # negative strides and a non-native byte order raised torch's ValueError naming nothing
    images, anchors, partners, weights = _small_mix_call()
    expected = mix_images(images, anchors, partners, weights)
    flipped = images.numpy()[::-1].copy()[::-1]  # the same values through a negative stride
    assert any(step < 0 for step in flipped.strides)
    torch.testing.assert_close(mix_images(flipped, anchors.numpy().astype(">i8"), partners, weights), expected)


def test_regression_empty_index_lists_are_an_empty_batch():
    # [] became a float32 tensor: "anchors: expected an integer tensor"
    out = mix_images(torch.zeros(3, 2, 2, 1, dtype=torch.uint8), [], torch.empty(0, 1, dtype=torch.int64),
                     torch.empty(0, 2))
    assert out.shape == (0, 1, 2, 2)


def test_regression_scalar_std_and_mean_values_are_checked_before_broadcasting():
    # a scalar std of 0 (or a NaN mean) was broadcast to zero channels first and so accepted
    empty = torch.zeros(1, 2, 2, 0, dtype=torch.uint8)
    expect_error({"std"}, mix_images, empty, [0], [[0]], [[0.5, 0.5]], std=0.0)
    expect_error({"mean"}, mix_images, empty, [0], [[0]], [[0.5, 0.5]], mean=math.nan)


def test_regression_normalised_weights_near_float32_max_are_not_zeroed():
    # the float32 row sums overflowed to inf and every weight became 0: an all-zero output
    images, anchors, partners, _ = _small_mix_call()
    expected = mix_images(images, anchors, partners, torch.tensor([[0.75, 0.25]]))
    for weights in (torch.tensor([[3e38, 1e38]]), torch.tensor([[3e-50, 1e-50]], dtype=torch.float64),
                    torch.tensor([[3e300, 1e300]], dtype=torch.float64)):
        torch.testing.assert_close(mix_images(images, anchors, partners, weights, normalize_weights=True), expected)


def test_regression_out_may_not_overlap_any_input():
    # only an overlap with images was refused; out sharing memory with the weights gave a silently
    # wrong result (row 0's output overwrote row 1's weights before row 1 read them)
    buffer = torch.zeros(8)
    weights = buffer[:4].view(2, 2)
    weights.copy_(torch.tensor([[0.25, 0.75], [1.0, 0.0]]))
    expect_error({"out"}, mix_targets, torch.eye(4)[:3], torch.tensor([0, 1]), torch.tensor([[1], [2]]), weights,
                 out=buffer.view(2, 4))


def test_regression_reference_mixer_takes_an_empty_batch():
    # reshape(0, -1) cannot infer K: RuntimeError from torch
    from mixnn_fast.mix.reference import mix_targets_reference

    out = mix_images_reference(torch.zeros(3, 2, 2, 1, dtype=torch.uint8), torch.empty(0, dtype=torch.int64),
                               torch.empty(0, 1, dtype=torch.int64), torch.empty(0, 2))
    assert out.shape == (0, 1, 2, 2)
    assert mix_targets_reference(torch.rand(3, 2), torch.empty(0, dtype=torch.int64),
                                 torch.empty(0, 0, dtype=torch.int64), torch.empty(0, 1)).shape == (0, 2)


def test_regression_losses_that_require_grad_are_fitted_as_detached():
    # RuntimeError from torch: "sub(): functions with out=... arguments don't support automatic
    # differentiation"; LossHistory kept the graph of every recorded loss
    losses = torch.rand(50, generator=torch.Generator().manual_seed(0))
    expected = clean_probability(losses)
    torch.testing.assert_close(clean_probability(losses.clone().requires_grad_()), expected)
    torch.testing.assert_close(GMM1D().fit_predict_proba(losses.clone().requires_grad_()),
                               GMM1D().fit_predict_proba(losses))
    history = LossHistory(50, 2)
    history.update(None, losses.clone().requires_grad_())
    assert not history.values.requires_grad


@pytest.mark.parametrize("seed", [2**64, 2**70, -(2**63) - 1])
def test_regression_gmm_seed_outside_torch_range_is_named(seed):
    # ValueError("Overflow when unpacking long long") from the k-means++ generator, and only when
    # k-means ran (not for degenerate data)
    expect_error({"seed"}, GMM1D, seed=seed)
    expect_error({"seed"}, clean_probability, torch.zeros(3), seed=seed)


@pytest.mark.parametrize("kwargs", [dict(device="not a device"), dict(device="cuda:9"), dict(dtype="float32")])
def test_regression_loss_history_construction_names_the_argument(kwargs):
    # RuntimeError from torch's device parser, AttributeError for a str dtype
    expect_error(set(kwargs), LossHistory, 4, 2, **kwargs)


@pytest.mark.parametrize("device", ["not a device", "cuda:9", 2.5])
def test_regression_device_arguments_are_named(device):
    # RuntimeError from torch's device parser (or its first allocation on an absent GPU)
    expect_error({"device"}, random_partners, 5, 1, device=device)
    expect_error({"device"}, SoftTargets, torch.tensor([0, 1]), 2, device=device)


@pytest.mark.parametrize("key,value", [
    ("next", torch.full((4,), 7)), ("counts", torch.full((4,), -1)), ("values", torch.full((4, 2), math.nan)),
    ("values", [[0.0] * 2] * 4), ("counts", torch.zeros(4)), (None, None),
])
def test_regression_loss_history_refuses_a_corrupted_state(key, value):
    # next = 7 loaded fine and the following update failed with IndexError inside; negative counts
    # gave -0.0 means; a list raised AttributeError; a non-dict state a TypeError naming nothing
    history = LossHistory(4, 2)
    history.update(None, torch.rand(4))
    before = history.state_dict()
    state = None if key is None else {**before, key: value}
    expect_error({"state"}, history.load_state_dict, state)
    assert all(torch.equal(before[k], history.state_dict()[k]) for k in before)
    history.update(None, torch.rand(4))  # still usable


def test_regression_exact_search_of_tiny_features_is_exact():
    # float32 features of magnitude 1e-30: every product of the expansion underflowed to 0 and the
    # error bound, relative only, "proved" arbitrary candidates: 40% of the rows were wrong
    features = torch.randn(30, 4, generator=torch.Generator().manual_seed(0)) * 1e-30
    exact = torch.cdist(features.double() * 1e30, features.double() * 1e30)
    exact.fill_diagonal_(math.inf)
    assert torch.equal(nearest_neighbours(features, 1, backend="exact")[:, 0], exact.argmin(dim=1))


def test_regression_exact_search_never_returns_an_excluded_row():
    # float32 features near 1e37: the float32 expansion overflowed, the masked self tied at inf
    # with every other row, and the direct float64 distance (0) ranked it first: each row came
    # back as its own neighbour
    features = torch.tensor([[1.0e37], [-2.0e37], [3.0e36]])
    assert nearest_neighbours(features, 1, backend="exact").tolist() == [[2], [2], [0]]
    assert NeighbourIndex(features, backend="exact").query(features[:1] * 2, 1, exclude=torch.tensor([0])).tolist() \
        == [[2]]


def test_regression_hnsw_seed_beyond_size_t_is_named():
    # TypeError from hnswlib's init_index argument conversion
    expect_error({"seed"}, NeighbourIndex, torch.randn(5, 2), seed=2**64)
    expect_error({"num_threads"}, NeighbourIndex, torch.randn(5, 2), num_threads=10**6)


@pytest.mark.parametrize("backend", ["hnsw", "faiss"])
def test_regression_huge_features_find_other_rows(backend):
    # float32 features near 1e37: the float32 re-ranking overflowed and hnsw and faiss raised
    # RuntimeError("... returned fewer than k=1 valid neighbours ...")
    features = torch.tensor([[1.0e37], [-2.0e37], [3.0e36]])
    assert nearest_neighbours(features, 1, backend=backend).tolist() == [[2], [2], [0]]
    assert NeighbourIndex(features, backend=backend).query(features[:1] * 2, 1, exclude=torch.tensor([0])).tolist() \
        == [[2]]


@pytest.mark.parametrize("scale", [1e200, 1e-200])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_regression_float64_features_beyond_float64_squares(scale, metric):
    # float64 squares overflow beyond ~1e154 and underflow below ~1e-154: Euclidean search returned
    # each row itself or ties; cosine turned 1e200 rows into zeros (silently wrong) and called
    # 1e-200 rows all-zero (a false ValueError)
    features = torch.tensor([[1.0, 0.0], [2.0, 1.0], [1.1, 0.0], [-1.0, 0.5]], dtype=torch.float64)
    expected = nearest_neighbours(features, 1, backend="exact", metric=metric)
    assert torch.equal(nearest_neighbours(features * scale, 1, backend="exact", metric=metric), expected)


def test_regression_random_partners_for_many_partners_terminates():
    # n > 2049 uses rejection of whole rows; with k (k - 1) >> n a row almost never comes out without
    # a repeat: n = 2049, k = 150 did not finish in minutes (k = 100 took 5 s)
    for n, k in [(2049, 150), (2049, 1025), (2050, 2049)]:
        partners = random_partners(n, k, torch.Generator().manual_seed(0))
        ordered = partners.sort(dim=1).values
        assert not bool((ordered[:, 1:] == ordered[:, :-1]).any())
        assert not bool((partners == torch.arange(n).unsqueeze(1)).any())


def test_regression_partners_redrawn_entry_by_entry_are_uniform():
    # the replacement for rejection redraws only repeated entries: every ordered k-tuple of
    # distinct offsets must stay equally likely
    from scipy import stats

    from mixnn_fast.refresh.weights import _distinct_by_redrawing_repeats

    generator = torch.Generator().manual_seed(1)
    draws = torch.cat([_distinct_by_redrawing_repeats(7, 3, generator, torch.device("cpu")) for _ in range(4000)])
    tuples, counts = torch.unique(draws, dim=0, return_counts=True)
    assert len(tuples) == 6 * 5 * 4
    assert stats.chisquare(counts.numpy()).pvalue > 1e-6


@pytest.mark.parametrize("mode,k", [("rdm", 2), ("mixup", 1)])
def test_regression_tiny_alpha_gives_vertices_not_nan(mode, k):
    # alpha ~ 1e-310: log(U) / alpha was -inf in every entry of a row and softmax gave NaN
    weights = mixing_weights(torch.rand(5), torch.zeros(5, k, dtype=torch.int64), mode, alpha=1e-310,
                             generator=torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(weights).all()) and bool(((weights == 0) | (weights == 1)).all())
    assert bool((weights.sum(dim=1) == 1).all())


@pytest.mark.parametrize("key,value", [
    ("update_every", 0), ("momentum", 7.0), ("momentum", "abc"), ("momentum", math.nan),
    ("targets", torch.full((3, 3), math.nan)), ("targets", [[1.0, 0.0, 0.0]] * 3), ("labels", torch.tensor([5, -1, 9])),
    ("start_epoch", -1), (None, None),
])
def test_regression_soft_targets_refuse_a_corrupted_state(key, value):
    # update_every = 0 loaded fine and the next update raised ZeroDivisionError; momentum 7, NaN
    # targets and out-of-range labels loaded silently; "abc" raised after the targets were
    # overwritten; a list raised AttributeError
    store = SoftTargets(torch.tensor([0, 1, 2]), 3, start_epoch=0)
    before = store.state_dict()
    state = None if key is None else {**before, key: value}
    expect_error({"state"}, store.load_state_dict, state)
    after = store.state_dict()
    assert torch.equal(before["targets"], after["targets"]) and after["update_every"] == 1
    assert store.update(torch.tensor([0]), torch.tensor([[0.0, 1.0, 0.0]]), epoch=1)


def test_regression_soft_targets_do_not_keep_the_graph_of_predictions():
    # the store became part of the autograd graph (grad_fn IndexPutBackward0) and grew with every update
    store = SoftTargets(torch.tensor([0, 1, 2]), 3, start_epoch=0)
    logits = torch.randn(3, 3, requires_grad=True)
    store.update(torch.arange(3), torch.softmax(logits, dim=1), epoch=0)
    assert not store.targets.requires_grad and store.targets.grad_fn is None


@pytest.mark.parametrize("call,names", [
    (lambda: corrupt([0, 1], "symmetric_flip", 0.5, 2, -1), {"seed"}),
    (lambda: corrupt([[0], [0, 1]], "symmetric_flip", 0.5, 2, 0), {"labels"}),
    (lambda: corrupt([0, 1], "custom", 0.5, 2, 0, transition=[[1.0], [0.0, 1.0]]), {"transition"}),
    (lambda: corrupt([0, 1], "custom", 0.5, 2, 0, transition=np.eye(2) * (1 + 1j)), {"transition"}),
    (lambda: transition_matrix("symmetric_flip", 2.0, 3), {"rate"}),
    (lambda: transition_matrix("pairflip", math.nan, 3), {"rate"}),
    (lambda: transition_matrix("symmetric_flip", 0.5, 1), {"num_classes"}),
    (lambda: transition_matrix("symmetric_uniform", 0.5, 0), {"num_classes"}),
    (lambda: transition_matrix("pairflip", 0.5, 2.5), {"num_classes"}),
])
def test_regression_noise_arguments_are_named(call, names):
    # numpy's "expected non-negative integer" / inhomogeneous-shape ValueErrors; a complex matrix
    # lost its imaginary part with a warning; transition_matrix returned negative "probabilities"
    # (rate 2), NaN (rate NaN, symmetric_flip with C = 1) or raised ZeroDivisionError (C = 0)
    expect_error(names, call)
