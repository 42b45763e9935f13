"""The mixer as registered torch operators: torch.compile(fullgraph=True) traces through
mix_images / mix_targets and computes the same bits as eager calls; torch.library.opcheck
passes; the fake implementation gives the output's metadata; eager calls go through the
operators; value checks survive compilation; nothing is differentiable by accident; and the
operator's default output (a pooled huge-page buffer) is never handed out twice while held."""
from __future__ import annotations

import threading

import pytest
import torch

from mixnn_fast import mix_images, mix_images_reference, mix_targets
from mixnn_fast.mix import op  # noqa: F401  (registers the operators)
from mixnn_fast.mix.outputs import configure_output_pool, output_pool_stats, release_output_pool

MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def sample_call(seed=0, *, num_images=7, height=9, width=11, channels=3, batch=5, k=2, in_dtype=torch.uint8,
                in_layout="NHWC", device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    shape = (num_images, height, width, channels) if in_layout == "NHWC" else (num_images, channels, height, width)
    if in_dtype == torch.uint8:
        images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    else:
        images = (torch.rand(shape, generator=gen) * 255).to(in_dtype)
    anchors = torch.randint(0, num_images, (batch,), generator=gen)
    partners = torch.randint(0, num_images, (batch, k), generator=gen)
    weights = torch.rand(batch, k + 1, generator=gen) + 0.05
    weights = weights / weights.sum(1, keepdim=True)
    targets = torch.softmax(torch.randn(num_images, 10, generator=gen), dim=1)
    return [t.to(device) for t in (images, anchors, partners, weights, targets)]


def pipeline(images, anchors, partners, weights, targets):
    """What a training step does around the mixer: mix, then a little torch arithmetic."""
    x = mix_images(images, anchors, partners, weights, mean=MEAN, std=STD)
    x16 = mix_images(images, anchors, partners, weights, out_layout="NHWC", out_dtype=torch.bfloat16)
    y = mix_targets(targets, anchors, partners, weights)
    return x, x16, y, x * 0.5 + x16.permute(0, 3, 1, 2).float().mean(), (y + 1e-6).log()


def assert_same_bits(got, want, arithmetic_exact=True):
    """The mixer's outputs (the first three) bit for bit; the torch arithmetic after them too, or,
    for inductor's own vectorised log and reductions, to float32 rounding."""
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        if i < 3 or arithmetic_exact:
            assert torch.equal(g, w), i
        else:
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_matches_eager_bit_for_bit(backend):
    torch._dynamo.reset()
    args = sample_call()
    want = pipeline(*args)
    got = torch.compile(pipeline, fullgraph=True, backend=backend)(*args)
    assert_same_bits(got, want)


@pytest.mark.slow
def test_compile_fullgraph_inductor_matches_eager():
    """The default backend (about 20 s of compilation on 2 cores)."""
    torch._dynamo.reset()
    args = sample_call(1)
    want = pipeline(*args)
    got = torch.compile(pipeline, fullgraph=True)(*args)
    assert_same_bits(got, want, arithmetic_exact=False)


def test_compile_with_out_and_dynamic_batch():
    """out= inside a compiled function (functionalised: the op mutates its out argument), and a
    second batch size through the same compiled function."""
    torch._dynamo.reset()

    def into(images, anchors, partners, weights, out):
        mix_images(images, anchors, partners, weights, mean=MEAN, std=STD, out=out)
        return out.sum(dim=(1, 2, 3))

    compiled = torch.compile(into, fullgraph=True, backend="aot_eager", dynamic=True)
    for batch in (5, 8):
        images, anchors, partners, weights, _ = sample_call(batch, batch=batch)
        want_out = torch.empty(batch, 3, 9, 11)
        want = into(images, anchors, partners, weights, want_out)
        out = torch.full((batch, 3, 9, 11), float("nan"))
        got = compiled(images, anchors, partners, weights, out)
        assert torch.equal(out, want_out) and torch.equal(got, want)


def test_compiled_code_keeps_the_value_checks():
    torch._dynamo.reset()
    images, anchors, partners, weights, targets = sample_call()
    compiled = torch.compile(pipeline, fullgraph=True, backend="aot_eager")
    compiled(images, anchors, partners, weights, targets)
    with pytest.raises(ValueError, match=r"anchors: indices must lie in \[0, 7\)"):
        compiled(images, anchors + 7, partners, weights, targets)
    with pytest.raises(ValueError, match="weights: each row must sum to 1"):
        compiled(images, anchors, partners, weights * 2, targets)
    bad = targets.clone()
    bad[anchors[0]] = float("nan")
    with pytest.raises(ValueError, match="targets: rows used by this batch contain NaN"):
        compiled(images, anchors, partners, weights, bad)


def test_structural_errors_surface_while_tracing():
    torch._dynamo.reset()
    images, anchors, partners, weights, targets = sample_call()
    compiled = torch.compile(pipeline, fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="weights: expected shape"):
        compiled(images, anchors, partners, weights[:, :2], targets)


# ---- torch.library.opcheck ----------------------------------------------------------------------


def _image_samples(device="cpu"):
    images, anchors, partners, weights, _ = sample_call(device=device)
    mean = torch.tensor(MEAN, dtype=torch.float64, device=device)
    std = torch.tensor(STD, dtype=torch.float64, device=device)
    f16, a16, p16, w16, _ = sample_call(2, in_dtype=torch.float16, in_layout="NCHW", channels=5, k=0, device=device)
    samples = [
        ((images, anchors, partners, weights), {}),
        ((images, anchors, partners, weights, mean, std), {"out_dtype": torch.bfloat16}),
        ((images, anchors, partners, weights * 3), {"normalize_weights": True, "out_layout": "NHWC",
                                                     "out_dtype": torch.uint8}),
        ((f16, a16, p16, w16), {"in_layout": "NCHW", "out_dtype": torch.float16, "num_threads": 1,
                                "check_finite": True}),
    ]
    return samples


def test_opcheck_mix_images():
    for args, kwargs in _image_samples():
        torch.library.opcheck(torch.ops.mixnn_fast.mix_images.default, args, kwargs)


def test_opcheck_mix_images_out():
    for args, kwargs in _image_samples():
        want = torch.ops.mixnn_fast.mix_images(*args, **kwargs)
        out = torch.empty_like(want)
        torch.library.opcheck(torch.ops.mixnn_fast.mix_images_out.default, (*args[:4], out, *args[4:]), kwargs)
        torch.ops.mixnn_fast.mix_images_out(*args[:4], out, *args[4:], **kwargs)  # opcheck works on clones
        assert torch.equal(out, want)


def test_opcheck_mix_targets():
    _, anchors, partners, weights, targets = sample_call()
    for kwargs in ({}, {"out_dtype": torch.bfloat16}, {"normalize_weights": True, "num_threads": 1}):
        torch.library.opcheck(torch.ops.mixnn_fast.mix_targets.default, (targets, anchors, partners, weights), kwargs)
        out = torch.empty(5, 10, dtype=kwargs.get("out_dtype", torch.float32))
        torch.library.opcheck(torch.ops.mixnn_fast.mix_targets_out.default,
                              (targets, anchors, partners, weights, out), kwargs)


# ---- the fake (meta) implementation ---------------------------------------------------------------


@pytest.mark.parametrize("in_layout,out_layout,out_dtype", [("NHWC", "NCHW", torch.float32),
                                                            ("NCHW", "NHWC", torch.bfloat16),
                                                            ("NHWC", "NHWC", torch.uint8)])
def test_fake_implementation_gives_the_output_metadata(in_layout, out_layout, out_dtype):
    images, anchors, partners, weights, targets = (t.to("meta") for t in sample_call(in_layout=in_layout))
    out = torch.ops.mixnn_fast.mix_images(images, anchors, partners, weights, in_layout=in_layout,
                                          out_layout=out_layout, out_dtype=out_dtype)
    assert out.device.type == "meta" and out.dtype == out_dtype
    assert out.shape == ((5, 3, 9, 11) if out_layout == "NCHW" else (5, 9, 11, 3))
    mixed = torch.ops.mixnn_fast.mix_targets(targets, anchors, partners, weights, out_dtype=torch.float16)
    assert mixed.device.type == "meta" and mixed.dtype == torch.float16 and mixed.shape == (5, 10)
    with pytest.raises(ValueError, match="partners: expected shape"):
        torch.ops.mixnn_fast.mix_images(images, anchors, partners[:3], weights, in_layout=in_layout)


# ---- eager calls go through the operators; no gradients -------------------------------------------


def test_eager_calls_dispatch_to_the_registered_operators():
    images, anchors, partners, weights, targets = sample_call()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        mix_images(images, anchors, partners, weights)
        mix_images(images, anchors, partners, weights, out=torch.empty(5, 3, 9, 11))
        mix_targets(targets, anchors, partners, weights)
    names = {event.name for event in prof.events()}
    assert {"mixnn_fast::mix_images", "mixnn_fast::mix_images_out", "mixnn_fast::mix_targets"} <= names


def test_direct_operator_call_matches_the_function():
    images, anchors, partners, weights, _ = sample_call()
    mean, std = torch.tensor(MEAN), torch.tensor(STD)
    got = torch.ops.mixnn_fast.mix_images(images, anchors, partners, weights, mean, std)
    assert torch.equal(got, mix_images(images, anchors, partners, weights, mean=MEAN, std=STD))
    torch.testing.assert_close(got, mix_images_reference(images, anchors, partners, weights, mean=MEAN, std=STD))
    with pytest.raises(ValueError, match="anchors"):
        torch.ops.mixnn_fast.mix_images(images, anchors + 100, partners, weights)


def test_inputs_that_require_grad_are_refused():
    images, anchors, partners, weights, targets = sample_call(in_dtype=torch.float32)
    with pytest.raises(ValueError, match="images: requires grad, but mix_images is not differentiable"):
        mix_images(images.requires_grad_(), anchors, partners, weights)
    with pytest.raises(ValueError, match="weights: requires grad"):
        mix_targets(targets, anchors, partners, weights.clone().requires_grad_())
    with torch.no_grad():  # no graph is built: allowed
        assert not mix_images(images, anchors, partners, weights).requires_grad
    # the operator itself, called directly: the forward runs, a backward through it says why it cannot
    out = torch.ops.mixnn_fast.mix_images(images, anchors, partners, weights)
    assert out.requires_grad
    with pytest.raises(RuntimeError, match="mixnn_fast::mix_images is not differentiable"):
        out.sum().backward()


# ---- the default call's output: pooled huge-page buffers (mixnn_fast/mix/outputs.py) -------------


def _large_call(seed=0):
    """A call whose float32 output (4 x 3 x 160 x 160, 1.2 MiB) is large enough for the pool."""
    return sample_call(seed, num_images=5, height=160, width=160, batch=4, k=1)[:4]


def test_default_output_is_pooled_and_bit_identical_to_out():
    images, anchors, partners, weights = _large_call()
    before = output_pool_stats()
    got = mix_images(images, anchors, partners, weights)
    assert output_pool_stats()["live_blocks"] == before["live_blocks"] + 1
    assert got.is_contiguous() and got.shape == (4, 3, 160, 160) and got.dtype == torch.float32
    into = mix_images(images, anchors, partners, weights, out=torch.full((4, 3, 160, 160), float("nan")))
    assert torch.equal(got, into)
    del got
    assert output_pool_stats()["live_blocks"] == before["live_blocks"]
    hits = output_pool_stats()["hits"]
    for out_dtype in (torch.float32, torch.bfloat16):  # a released buffer of the size is reused
        again = mix_images(images, anchors, partners, weights, out_dtype=out_dtype)
        assert torch.equal(again, into.to(out_dtype))
        del again
    assert output_pool_stats()["hits"] >= hits + 1


@pytest.mark.parametrize("keep", ["view", "numpy", "storage", "thread"])
def test_a_result_still_referenced_is_never_reused(keep):
    """Whatever holds the result (a view, a NumPy array, its storage, another thread's tensor),
    later calls write elsewhere; the buffer returns to the pool only once all of them are gone."""
    images, anchors, partners, weights = _large_call(1)
    first = mix_images(images, anchors, partners, weights)
    expected_first = first.clone()
    if keep == "view":
        holder = first[1:]
    elif keep == "numpy":
        holder = first.numpy()
    elif keep == "storage":
        holder = first.untyped_storage()
    else:
        box = [first]
        thread = threading.Thread(target=lambda: box.append(box[0] + 0))  # uses it, keeps it
        thread.start()
        thread.join()
        holder = box
    address = first.data_ptr()
    del first
    other = torch.flip(weights, dims=[1]).contiguous()
    results = [mix_images(images, anchors, partners, other) for _ in range(6)]  # more than the pool holds
    assert all(r.data_ptr() != address for r in results)
    restored = {"view": lambda: holder, "numpy": lambda: torch.from_numpy(holder),
                "storage": lambda: torch.tensor([], dtype=torch.float32).set_(holder),
                "thread": lambda: holder[0]}[keep]()
    assert torch.equal(restored.flatten()[-expected_first[1:].numel():], expected_first[1:].flatten())
    del holder, restored, results


def test_buffers_released_on_another_thread_return_to_the_pool():
    images, anchors, partners, weights = _large_call(2)
    before = output_pool_stats()["live_blocks"]
    results = [mix_images(images, anchors, partners, weights) for _ in range(3)]
    assert output_pool_stats()["live_blocks"] == before + 3
    thread = threading.Thread(target=results.clear)  # the deleters run on that thread
    thread.start()
    thread.join()
    assert output_pool_stats()["live_blocks"] == before


def test_output_pool_settings():
    images, anchors, partners, weights = _large_call(3)
    saved = output_pool_stats()
    try:
        configure_output_pool(max_cached_blocks=0)  # nothing kept: every call maps a new buffer
        mix_images(images, anchors, partners, weights)
        assert output_pool_stats()["cached_blocks"] == 0
        configure_output_pool(enabled=False)  # plain torch.empty: resizable storage
        plain = mix_images(images, anchors, partners, weights)
        plain.resize_(5, 3, 160, 160)
        with pytest.raises(ValueError, match="max_cached_bytes"):
            configure_output_pool(max_cached_bytes=-1)
        with pytest.raises(TypeError, match="huge_pages"):
            configure_output_pool(huge_pages="yes")
    finally:
        configure_output_pool(enabled=saved["enabled"], max_cached_bytes=saved["max_cached_bytes"],
                              max_cached_blocks=saved["max_cached_blocks"], huge_pages=saved["huge_pages"])
    with pytest.raises(RuntimeError, match="not resizable"):
        mix_images(images, anchors, partners, weights).resize_(5, 3, 160, 160)
    pooled = mix_images(images, anchors, partners, weights)
    pooled.share_memory_()  # moves to shared memory (a copy); the pool gets its buffer back
    assert pooled.is_shared()
    assert torch.equal(pooled, mix_images(images, anchors, partners, weights, out=torch.empty_like(pooled)))
    assert release_output_pool() >= 0 and output_pool_stats()["cached_blocks"] == 0


def test_small_outputs_are_plain_tensors():
    images, anchors, partners, weights, _ = sample_call(4, num_images=3, height=8, width=8, batch=2, k=1)
    before = output_pool_stats()
    small = mix_images(images, anchors, partners, weights)
    assert output_pool_stats()["live_blocks"] == before["live_blocks"]
    small.resize_(3, 3, 8, 8)  # torch.empty's storage


# ---- CUDA ------------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    args = sample_call(device="cuda")
    want = pipeline(*args)
    got = torch.compile(pipeline, fullgraph=True, backend="aot_eager")(*args)
    assert_same_bits(got, want)
    assert got[0].device.type == "cuda"


@pytest.mark.cuda
def test_cuda_opcheck():
    for args, kwargs in _image_samples("cuda"):
        torch.library.opcheck(torch.ops.mixnn_fast.mix_images.default, args, kwargs)
    _, anchors, partners, weights, targets = sample_call(device="cuda")
    torch.library.opcheck(torch.ops.mixnn_fast.mix_targets.default, (targets, anchors, partners, weights))
