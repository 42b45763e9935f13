"""The fused mixer against a float64 plain-torch reference, on every path that computes it:
the CPU kernel for each compiled instruction set, the CUDA kernel's body run over its grid on
the host (emulator), and the CUDA kernel itself where a GPU exists."""
from __future__ import annotations

import itertools
import zlib

import numpy as np
import pytest
import torch

from fixtures import DLPackOnly

from mixnn_fast import mix_images, mix_images_reference, mix_targets, mix_targets_reference
from mixnn_fast._native import allowed_cpu_isas, configured_cpu_isa, native
from mixnn_fast.mix.mixer import cuda_launch_config, mix_images_cuda_emulated

IN_DTYPES = [torch.uint8, torch.float32, torch.float16, torch.bfloat16]
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.uint8]
LAYOUTS = ["NHWC", "NCHW"]
# The kernels this CPU runs, capped by MIXNN_CPU_ISA: under avx2 the same list as an AVX2-only machine's.
ISAS = allowed_cpu_isas()


def seed_of(*parts) -> int:
    """A stable seed per parameter combination (reproducible failures, different data per case)."""
    return zlib.crc32(repr(parts).encode())


def tolerance(out_dtype: torch.dtype, images, weights: torch.Tensor, mean=None, std=None, *,
              normalize_weights: bool = False) -> dict:
    """How far the kernel may be from the float64 reference rounded once to out_dtype.

    The kernel sums K + 1 products w x in float32 (K + 1 roundings of eps / 2, each of at most
    max|x|: the weights sum to 1), then computes (sum - mean sum w) / std: three more roundings of
    max|x| + |mean|, one of 1 / std. That float32 value, off by at most `delta`, then rounds to
    out_dtype: one rounding step of out_dtype more than the reference's, i.e. eps_out of the value
    (and a subnormal step near 0); uint8 rounds to integers, so a value near .5 may go either way.
    The same on every ISA: the vector kernels only reorder which pixel is computed when."""
    if out_dtype == torch.uint8:
        return dict(rtol=0, atol=1)
    k = weights.shape[1] - 1
    mean = torch.zeros(1) if mean is None else torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
    inv_std = torch.ones(1) if std is None else 1 / torch.as_tensor(std, dtype=torch.float64).reshape(-1)
    magnitude = (torch.as_tensor(images).double().abs().max() + mean.abs().max()) * inv_std.max()
    roundings = k + 5
    if normalize_weights:  # w / sum w: K + 1 additions and a division, in the kernel and in the test
        roundings += 2 * (k + 2)
    delta = roundings * torch.finfo(torch.float32).eps / 2 * float(magnitude)
    finfo = torch.finfo(out_dtype)
    # float32 output: the kernel's last rounding is already in delta, the reference's is half a step
    step = finfo.eps / 2 if out_dtype == torch.float32 else finfo.eps
    return dict(rtol=step, atol=delta + finfo.tiny * finfo.eps)


def random_images(gen: torch.Generator, shape, dtype) -> torch.Tensor:
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * 300 - 20).to(dtype)


def random_call(gen, *, num_images, height, width, channels, batch, k, in_dtype, in_layout):
    shape = (num_images, height, width, channels) if in_layout == "NHWC" else (num_images, channels, height, width)
    images = random_images(gen, shape, in_dtype)
    anchors = torch.randint(0, num_images, (batch,), generator=gen)
    partners = torch.randint(0, num_images, (batch, k), generator=gen)
    weights = torch.rand(batch, k + 1, generator=gen, dtype=torch.float64) + 0.05
    weights = (weights / weights.sum(1, keepdim=True)).float()
    return images, anchors, partners, weights


def poisoned(shape, dtype) -> torch.Tensor:
    """An output buffer full of values no correct kernel writes (NaN; 0xAB for uint8 is checked by comparison)."""
    if dtype == torch.uint8:
        return torch.full(shape, 0xAB, dtype=dtype)
    return torch.full(shape, float("nan"), dtype=dtype)


@pytest.fixture(params=ISAS)
def cpu_isa(request):
    native().select_cpu_isa(request.param)
    yield request.param
    native().select_cpu_isa(configured_cpu_isa())  # not "auto": the rest of the run keeps MIXNN_CPU_ISA's kernel


def mixed_output_shape(batch, channels, height, width, out_layout):
    return (batch, channels, height, width) if out_layout == "NCHW" else (batch, height, width, channels)


@pytest.mark.parametrize("in_dtype,out_dtype,in_layout,out_layout,k,channels",
                         list(itertools.product(IN_DTYPES, OUT_DTYPES, LAYOUTS, LAYOUTS, [1, 2, 4], [1, 3, 7])))
def test_matches_float64_reference(cpu_isa, in_dtype, out_dtype, in_layout, out_layout, k, channels):
    # odd sizes, M > B; C = 1 and 3 take the compile-time channel paths (and, for NHWC → NCHW
    # float32 with K <= 2, the fused tile), C = 7 the generic one
    gen = torch.Generator().manual_seed(seed_of(in_dtype, out_dtype, in_layout, out_layout, k, channels))
    images, anchors, partners, weights = random_call(gen, num_images=11, height=5, width=3, channels=channels,
                                                     batch=6, k=k, in_dtype=in_dtype, in_layout=in_layout)
    mean = torch.rand(channels, generator=gen) * 100
    std = torch.rand(channels, generator=gen) * 50 + 10
    if out_dtype == torch.uint8:
        mean, std = None, None  # uint8 output is for un-normalised mixing
    out = poisoned(mixed_output_shape(6, channels, 5, 3, out_layout), out_dtype)
    got = mix_images(images, anchors, partners, weights, in_layout=in_layout, mean=mean, std=std,
                     out_layout=out_layout, out_dtype=out_dtype, out=out)
    assert got.data_ptr() == out.data_ptr()
    want = mix_images_reference(images, anchors, partners, weights, in_layout=in_layout, mean=mean, std=std,
                                out_layout=out_layout, out_dtype=out_dtype)
    torch.testing.assert_close(got, want, **tolerance(out_dtype, images, weights, mean, std))


@pytest.mark.parametrize("height,width,channels", [(1, 1, 1), (3, 5, 3), (2, 3, 7), (17, 13, 3), (64, 65, 1)])
@pytest.mark.parametrize("batch,num_images", [(1, 1), (1, 5), (9, 4), (33, 50)])
def test_odd_sizes(cpu_isa, height, width, channels, batch, num_images, rng):
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    images, anchors, partners, weights = random_call(gen, num_images=num_images, height=height, width=width,
                                                     channels=channels, batch=batch, k=2, in_dtype=torch.uint8,
                                                     in_layout="NHWC")
    out = poisoned((batch, channels, height, width), torch.float32)
    mix_images(images, anchors, partners, weights, mean=[0.5] * channels, std=[2.0] * channels, out=out)
    want = mix_images_reference(images, anchors, partners, weights, mean=[0.5] * channels, std=[2.0] * channels)
    tol = tolerance(torch.float32, images, weights, [0.5] * channels, [2.0] * channels)
    torch.testing.assert_close(out, want, **tol)


def test_tiles_cross_rows_and_threads(cpu_isa):
    """Images larger than one tile (4096 floats) and more rows than threads: tile and row seams."""
    gen = torch.Generator().manual_seed(7)
    images, anchors, partners, weights = random_call(gen, num_images=5, height=61, width=47, channels=3,
                                                     batch=7, k=1, in_dtype=torch.uint8, in_layout="NHWC")
    want = mix_images_reference(images, anchors, partners, weights)
    for threads in (1, 2, 3):
        got = mix_images(images, anchors, partners, weights, num_threads=threads)
        torch.testing.assert_close(got, want, **tolerance(torch.float32, images, weights))


def test_repeated_indices_and_self_partner(cpu_isa):
    images = torch.arange(2 * 2 * 2 * 3, dtype=torch.float32).reshape(2, 2, 2, 3)
    anchors = torch.tensor([0, 0, 1])
    partners = torch.tensor([[0, 0], [1, 1], [1, 0]])
    weights = torch.tensor([[0.2, 0.3, 0.5], [0.5, 0.25, 0.25], [0.0, 1.0, 0.0]])
    got = mix_images(images, anchors, partners, weights, out_layout="NHWC")
    torch.testing.assert_close(got[0], images[0])  # everything mixes image 0 with itself
    torch.testing.assert_close(got[1], 0.5 * images[0] + 0.5 * images[1])
    torch.testing.assert_close(got[2], images[1])


def test_no_partners_is_a_normalised_copy(cpu_isa):
    gen = torch.Generator().manual_seed(3)
    images = random_images(gen, (4, 6, 5, 3), torch.uint8)
    got = mix_images(images, torch.tensor([3, 1]), torch.empty(2, 0, dtype=torch.int64), torch.ones(2, 1),
                     mean=[1, 2, 3], std=[2, 4, 8])
    want = (images[[3, 1]].permute(0, 3, 1, 2).double() - torch.tensor([1., 2, 3]).view(1, 3, 1, 1)) \
        / torch.tensor([2., 4, 8]).view(1, 3, 1, 1)
    torch.testing.assert_close(got, want.float())


def test_unnormalised_weights_with_normalize_flag(cpu_isa):
    gen = torch.Generator().manual_seed(4)
    images, anchors, partners, _ = random_call(gen, num_images=6, height=4, width=4, channels=3, batch=5, k=2,
                                               in_dtype=torch.uint8, in_layout="NHWC")
    raw = torch.rand(5, 3, generator=gen) * 7 + 0.1
    got = mix_images(images, anchors, partners, raw, normalize_weights=True)
    want = mix_images_reference(images, anchors, partners, raw / raw.sum(1, keepdim=True))
    torch.testing.assert_close(got, want, **tolerance(torch.float32, images, raw, normalize_weights=True))


@pytest.mark.parametrize("make_view", [
    lambda x: x[:, :, ::2],                          # strided width
    lambda x: x.permute(0, 2, 1, 3),                 # H and W swapped: non-contiguous NHWC
    lambda x: x[1::2],                               # every other image
], ids=["strided", "transposed", "batch-strided"])
def test_non_contiguous_images_are_copied_correctly(make_view):
    gen = torch.Generator().manual_seed(5)
    base = random_images(gen, (6, 8, 10, 3), torch.uint8)
    view = make_view(base)
    assert not view.is_contiguous()
    anchors, partners = torch.tensor([0, 2, 2]), torch.tensor([[1], [0], [2]])
    weights = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.3, 0.7]])
    got = mix_images(view, anchors, partners, weights)
    want = mix_images_reference(view.contiguous(), anchors, partners, weights)
    torch.testing.assert_close(got, want, **tolerance(torch.float32, view, weights))


def test_numpy_and_dlpack_inputs():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    anchors = rng.integers(0, 7, 4)
    partners = rng.integers(0, 7, (4, 1)).astype(np.int32)
    weights = np.full((4, 2), 0.5, dtype=np.float64)
    want = mix_images_reference(torch.from_numpy(images), torch.from_numpy(anchors), torch.from_numpy(partners),
                                torch.from_numpy(weights))
    torch.testing.assert_close(mix_images(images, anchors, partners, weights), want)

    torch.testing.assert_close(mix_images(DLPackOnly(images), anchors, partners, weights), want)


def test_read_only_numpy_is_not_modified():
    images = np.arange(2 * 3 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 3)
    images.flags.writeable = False
    before = images.copy()
    mix_images(images, [0, 1], [[1], [0]], [[0.5, 0.5], [0.5, 0.5]])
    np.testing.assert_array_equal(images, before)


@pytest.mark.parametrize("in_dtype", [torch.float16, torch.bfloat16])
def test_every_16_bit_pattern_loads_exactly(cpu_isa, in_dtype):
    """The shared header's half/bfloat16 → float conversion, for all 65,536 bit patterns but NaN."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    values = bits.view(in_dtype)
    finite = values[torch.isfinite(values.float()) | torch.isinf(values.float())]
    images = finite.reshape(-1, 1, 1, 1)
    count = images.shape[0]
    got = mix_images(images, torch.arange(count), torch.empty(count, 0, dtype=torch.int64), torch.ones(count, 1))
    assert torch.equal(got.flatten(), finite.float())


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.uint8])
def test_float_to_narrow_store_rounds_like_torch(cpu_isa, out_dtype):
    """The header's float → half / bfloat16 / uint8 stores: round half to even, subnormals, overflow."""
    gen = torch.Generator().manual_seed(11)
    specials = torch.tensor([0.0, -0.0, 65504.0, 65520.0, 65519.99, 1e6, -1e6, 6.1e-5, 5.96e-8, 2.98e-8,
                             2.99e-8, 1e-10, 0.5, 1.5, 2.5, 254.5, 255.49, 255.5, -0.5, 1.0009765625,
                             float("inf"), float("-inf")])
    randoms = torch.cat([torch.randn(20000, generator=gen) * s for s in (1e-6, 1e-3, 1, 100, 1e4)])
    bits = torch.randint(-2**31, 2**31 - 1, (20000,), generator=gen, dtype=torch.int64).to(torch.int32).view(torch.float32)
    values = torch.cat([specials, randoms, bits[torch.isfinite(bits)]])
    if out_dtype == torch.uint8:
        values = values[torch.isfinite(values)]
    images = values.reshape(-1, 1, 1, 1).contiguous()
    count = images.shape[0]
    got = mix_images(images, torch.arange(count), torch.empty(count, 0, dtype=torch.int64), torch.ones(count, 1),
                     out_dtype=out_dtype).flatten()
    want = values.round().clamp(0, 255).to(torch.uint8) if out_dtype == torch.uint8 else values.to(out_dtype)
    if out_dtype == torch.uint8:
        assert torch.equal(got, want)
    else:
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))


# uint8 NHWC C=3 -> NCHW float32 / bfloat16 / float16 runs a hand-vectorised tile in the avx2 and
# avx512 kernels: images larger than a tile and not a whole number of vector groups, every K it
# specialises (0, 1, 2, 4), the generic loop (3, 6, 15) and K beyond it (16: the portable path).
@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 6, 15, 16])
@pytest.mark.parametrize("height,width", [(37, 29), (61, 47), (1, 5)])
def test_uint8_nhwc3_vector_path(cpu_isa, k, height, width):
    gen = torch.Generator().manual_seed(seed_of("nhwc3", k, height, width))
    images, anchors, partners, weights = random_call(gen, num_images=7, height=height, width=width, channels=3,
                                                     batch=5, k=k, in_dtype=torch.uint8, in_layout="NHWC")
    mean, std = torch.rand(3, generator=gen) * 200, torch.rand(3, generator=gen) * 60 + 1
    outs = {}
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = poisoned((5, 3, height, width), out_dtype)
        outs[out_dtype] = mix_images(images, anchors, partners, weights, mean=mean, std=std, out_dtype=out_dtype,
                                     out=out, num_threads=2)
        want = mix_images_reference(images, anchors, partners, weights, mean=mean, std=std, out_dtype=out_dtype)
        torch.testing.assert_close(outs[out_dtype], want, **tolerance(out_dtype, images, weights, mean, std))
    # the narrow stores are exactly torch's rounding of the kernel's own float32 result
    for out_dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(outs[out_dtype].view(torch.int16), outs[torch.float32].to(out_dtype).view(torch.int16))


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1 + 2**-8, 1 + 2**-11, 300.0, 1e-6, 1.0])
def test_uint8_nhwc3_vector_path_rounds_like_torch(cpu_isa, out_dtype, scale):
    """x * scale for every byte value: exact ties of bfloat16 (1 + 2^-8) and float16 (1 + 2^-11),
    float16 overflow (300) and subnormals (1e-6), through the vectorised stores."""
    values = torch.arange(256, dtype=torch.uint8)
    images = torch.stack([values.roll(s) for s in range(3 * 37)]).reshape(37, 256, 3).unsqueeze(0)
    images = images.contiguous()  # (1, 37, 256, 3): 9,472 pixels, every byte value in every channel
    anchors, partners, weights = torch.tensor([0]), torch.empty(1, 0, dtype=torch.int64), torch.ones(1, 1)
    std = 1.0 / scale
    got32 = mix_images(images, anchors, partners, weights, mean=0.0, std=std)
    got = mix_images(images, anchors, partners, weights, mean=0.0, std=std, out_dtype=out_dtype)
    inv_std = torch.tensor(1.0 / std, dtype=torch.float64).float()
    assert torch.equal(got32, images.permute(0, 3, 1, 2).float() * inv_std)
    assert torch.equal(got.view(torch.int16), got32.to(out_dtype).view(torch.int16))


@pytest.mark.parametrize("height,width", [(1024, 1024), (1000, 1001)])
def test_uint8_nhwc3_vector_path_large_output(cpu_isa, height, width):
    """Outputs of 16 MiB or more, when their pages are already mapped (a reused, poisoned buffer),
    take non-temporal stores where the planes are aligned (1024²: all tiles; 1000×1001: some);
    fresh outputs take ordinary stores.  Both give the same bits."""
    gen = torch.Generator().manual_seed(seed_of("large", height, width))
    images, anchors, partners, weights = random_call(gen, num_images=3, height=height, width=width, channels=3,
                                                     batch=3, k=2, in_dtype=torch.uint8, in_layout="NHWC")
    mean, std = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
    call = dict(mean=mean, std=std, num_threads=2)
    got32 = mix_images(images, anchors, partners, weights, out=poisoned((3, 3, height, width), torch.float32), **call)
    want = mix_images_reference(images, anchors, partners, weights, mean=mean, std=std)
    torch.testing.assert_close(got32, want, **tolerance(torch.float32, images, weights, mean, std))
    assert torch.equal(mix_images(images, anchors, partners, weights, **call), got32)
    for out_dtype in (torch.bfloat16, torch.float16):
        reused = poisoned((3, 3, height, width), out_dtype)
        for got in (mix_images(images, anchors, partners, weights, out_dtype=out_dtype, out=reused, **call),
                    mix_images(images, anchors, partners, weights, out_dtype=out_dtype, **call)):
            assert torch.equal(got.view(torch.int16), got32.to(out_dtype).view(torch.int16))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_uint8_nhwc3_vector_path_nan_and_inf_like_base(out_dtype):
    """std so small that 1/std is inf: 0 * inf is NaN and x > 0 gives inf; every ISA writes the same
    bits as the portable kernel (the header's NaN encoding, not torch's)."""
    values = torch.arange(256, dtype=torch.uint8).repeat(3 * 40)
    images = values.reshape(1, 40, 256, 3).contiguous()
    call = dict(anchors=torch.tensor([0, 0]), partners=torch.tensor([[0], [0]]),
                weights=torch.tensor([[0.25, 0.75], [1.0, 0.0]]), mean=0.0, std=1e-40, out_dtype=out_dtype)
    results = {}
    for isa in ISAS:
        native().select_cpu_isa(isa)
        try:
            results[isa] = mix_images(images, **call)
        finally:
            native().select_cpu_isa(configured_cpu_isa())
    assert results["base"].isnan().any() and results["base"].isinf().any()
    bits = {isa: r.view(torch.int32 if out_dtype == torch.float32 else torch.int16) for isa, r in results.items()}
    for isa in ISAS:
        assert torch.equal(bits[isa], bits["base"]), isa


def test_targets_match_reference(rng):
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    for n, c, b, k in [(1, 1, 1, 1), (10, 14, 7, 1), (50, 100, 33, 4), (9, 1000, 3, 2)]:
        targets = torch.softmax(torch.randn(n, c, generator=gen), dim=1)
        anchors = torch.randint(0, n, (b,), generator=gen)
        partners = torch.randint(0, n, (b, k), generator=gen)
        weights = torch.rand(b, k + 1, generator=gen) + 0.01
        weights /= weights.sum(1, keepdim=True)
        out = torch.full((b, c), float("nan"))
        got = mix_targets(targets, anchors, partners, weights, out=out)
        assert got.data_ptr() == out.data_ptr()
        torch.testing.assert_close(got, mix_targets_reference(targets, anchors, partners, weights))
        torch.testing.assert_close(got.sum(1), torch.ones(b))  # convex mix of distributions stays one


# ---- the CUDA kernel's body, executed on the host over its own grid ------------------------------


@pytest.mark.parametrize("in_dtype,out_dtype,in_layout,out_layout",
                         list(itertools.product(IN_DTYPES, OUT_DTYPES, LAYOUTS, LAYOUTS)))
def test_cuda_kernel_body_on_emulated_grid(in_dtype, out_dtype, in_layout, out_layout):
    gen = torch.Generator().manual_seed(seed_of(in_dtype, out_dtype, in_layout, out_layout))
    channels = 3 if in_layout == "NHWC" else 5
    images, anchors, partners, weights = random_call(gen, num_images=9, height=23, width=13, channels=channels,
                                                     batch=5, k=2, in_dtype=in_dtype, in_layout=in_layout)
    mean, std = (None, None) if out_dtype == torch.uint8 else (torch.rand(channels) * 10, torch.rand(channels) + 1)
    want = mix_images_reference(images, anchors, partners, weights, in_layout=in_layout, mean=mean, std=std,
                                out_layout=out_layout, out_dtype=out_dtype)
    # the launcher's grid, then grids so small that both grid-stride loops wrap several times
    for grid in [(0, 0), (1, 1), (1, 2), (2, 3)]:
        out = poisoned(want.shape, out_dtype)
        got = mix_images_cuda_emulated(images, anchors, partners, weights, grid=grid, in_layout=in_layout,
                                       mean=mean, std=std, out_layout=out_layout, out_dtype=out_dtype, out=out)
        torch.testing.assert_close(got, want, **tolerance(out_dtype, images, weights, mean, std))


def test_cuda_launch_config_covers_the_work():
    (gx, gy, gz), (bx, by, bz) = cuda_launch_config(70000, 300, 301)
    assert (by, bz, gz) == (1, 1, 1)
    assert gy == 65535  # hardware limit on grid.y; rows beyond it come from the grid-stride loop
    assert gx * bx >= min(300 * 301, 1024 * bx)
    (gx, gy, _), (bx, _, _) = cuda_launch_config(3, 5, 7)
    assert gy == 3 and gx * bx >= 35 and gx == 1


def test_emulator_covers_more_rows_than_grid_y():
    gen = torch.Generator().manual_seed(2)
    images, anchors, partners, weights = random_call(gen, num_images=3, height=2, width=2, channels=1, batch=40,
                                                     k=1, in_dtype=torch.uint8, in_layout="NHWC")
    want = mix_images_reference(images, anchors, partners, weights)
    got = mix_images_cuda_emulated(images, anchors, partners, weights, grid=(1, 7))
    torch.testing.assert_close(got, want)


# ---- the real CUDA kernel (skipped without a GPU) -------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("in_dtype,out_dtype,in_layout,out_layout",
                         list(itertools.product(IN_DTYPES, OUT_DTYPES, LAYOUTS, LAYOUTS)))
def test_cuda_kernel_matches_reference(in_dtype, out_dtype, in_layout, out_layout):
    gen = torch.Generator().manual_seed(1)
    images, anchors, partners, weights = random_call(gen, num_images=33, height=37, width=29, channels=3,
                                                     batch=17, k=2, in_dtype=in_dtype, in_layout=in_layout)
    want = mix_images_reference(images, anchors, partners, weights, in_layout=in_layout, out_layout=out_layout,
                                out_dtype=out_dtype)
    cuda = [t.cuda() for t in (images, anchors, partners, weights)]
    out = poisoned(want.shape, out_dtype).cuda()
    got = mix_images(*cuda, in_layout=in_layout, out_layout=out_layout, out_dtype=out_dtype, out=out)
    torch.testing.assert_close(got.cpu(), want, **tolerance(out_dtype, images, weights))


@pytest.mark.cuda
def test_cuda_rejects_mixed_devices():
    with pytest.raises(ValueError, match="anchors"):
        mix_images(torch.zeros(2, 2, 2, 3, dtype=torch.uint8, device="cuda"), torch.zeros(1, dtype=torch.int64),
                   torch.zeros(1, 1, dtype=torch.int64, device="cuda"), torch.full((1, 2), 0.5, device="cuda"))
