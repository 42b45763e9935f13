"""mixnn_fast._C called directly, bypassing mixer.py's validation: every buffer too small for
the sizes it is given, every malformed pointer is a Python exception naming the argument, and
the output, poisoned beforehand, is left untouched.

Indices past the image batch: the CPU binding refuses them (IndexError naming the position,
output untouched).  The CUDA binding does not read them on the host (that would wait for the
device every batch): the kernel checks each row's indices itself, writes a bad row as NaN (0
for uint8) without reading any image, and records it.  The tests run that kernel body on the
emulated grid, with the image batch between two inaccessible pages, so an out-of-bounds read
would crash the test's subprocess."""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from mixnn_fast._native import native

C_ = native()
POISON = np.uint32(0x7FC0DEAD)  # a NaN with a payload no kernel computes


def run_cpu(p):
    C_.mix_images_cpu(p, 1)


def run_emulated(p):
    return C_.mix_images_cuda_emulated(p, 0, 0)


NO_INDEX_ERRORS = (0, None, None)


RUNNERS = [pytest.param(run_cpu, id="cpu"), pytest.param(run_emulated, id="emulated")]


@dataclass
class Call:
    """The arrays of one call (NHWC uint8 images in, NCHW float32 out), and its params."""

    images: np.ndarray
    anchors: np.ndarray
    partners: np.ndarray
    weights: np.ndarray
    mean: np.ndarray
    inv_std: np.ndarray
    out: np.ndarray
    sizes: dict

    def params(self, *, addresses: bool = False, **override):
        """MixImagesParams from the arrays: as buffers (sizes recorded), or as raw addresses
        with ``<name>_nbytes`` declared; ``override`` replaces any array or size first."""
        p = C_.MixImagesParams()
        arrays = {name: override.pop(name, getattr(self, name))
                  for name in ("images", "anchors", "partners", "weights", "mean", "inv_std", "out")}
        for name, array in arrays.items():
            if addresses:
                setattr(p, name, array.ctypes.data)
                setattr(p, f"{name}_nbytes", array.nbytes)
            else:
                setattr(p, name, array)
        p.in_dtype, p.out_dtype, p.in_layout, p.out_layout = 0, 1, 0, 1  # uint8 NHWC -> float32 NCHW
        for name, value in {**self.sizes, **override}.items():
            setattr(p, name, value)
        return p

    def poison(self) -> None:
        self.out.view(np.uint32)[...] = POISON

    def untouched(self, out: np.ndarray | None = None) -> bool:
        out = self.out if out is None else out
        return bool((out.view(np.uint32) == POISON).all())

    def assert_rows(self, bad_rows) -> None:
        """The kernel's bounds handling: rows in ``bad_rows`` all NaN (and not the poison's NaN,
        so they were written), every other row the exact mix."""
        bad = np.zeros(len(self.out), bool)
        bad[list(bad_rows)] = True
        assert np.isnan(self.out[bad]).all()
        assert not (self.out[bad].view(np.uint32) == POISON).any()
        np.testing.assert_allclose(self.out[~bad], self.expected()[~bad], rtol=1e-5, atol=1e-4)

    def expected(self) -> np.ndarray:
        """out[b] = Σ_j w_bj (images[idx_bj] − mean) · inv_std, in float64, NCHW."""
        idx = np.concatenate([self.anchors[:, None], self.partners], axis=1)
        idx = idx.clip(0, len(self.images) - 1)  # rows with a bad index: see assert_rows
        x = (self.images[idx].astype(np.float64) - self.mean) * self.inv_std  # (B, K+1, H, W, C)
        mixed = np.einsum("bk,bkhwc->bhwc", self.weights.astype(np.float64), x)
        return mixed.transpose(0, 3, 1, 2)


def make_call(batch=4, partners=2, num_images=6, height=3, width=5, channels=3, seed=0) -> Call:
    rng = np.random.default_rng(seed)
    weights = rng.random((batch, partners + 1)).astype(np.float32) + 0.1
    weights /= weights.sum(1, keepdims=True)
    call = Call(
        images=rng.integers(0, 256, (num_images, height, width, channels), dtype=np.uint8),
        anchors=rng.integers(0, num_images, batch).astype(np.int64),
        partners=rng.integers(0, num_images, (batch, partners)).astype(np.int64),
        weights=weights,
        mean=rng.random(channels).astype(np.float32) * 100,
        inv_std=(1 / (rng.random(channels) * 50 + 10)).astype(np.float32),
        out=np.empty((batch, channels, height, width), dtype=np.float32),
        sizes=dict(num_images=num_images, height=height, width=width, channels=channels, batch=batch,
                   num_partners=partners),
    )
    call.poison()
    return call


# ---------------------------------------------------------------------------------------------
# the good call, both ways of passing pointers


@pytest.mark.parametrize("run", RUNNERS)
@pytest.mark.parametrize("addresses", [False, True], ids=["buffers", "addresses"])
def test_a_valid_direct_call_mixes(run, addresses):
    call = make_call()
    run(call.params(addresses=addresses))
    np.testing.assert_allclose(call.out, call.expected(), rtol=1e-5, atol=1e-4)


def test_buffers_set_their_sizes_and_stay_alive():
    call = make_call()
    p = call.params()
    assert p.out_nbytes == call.out.nbytes and p.anchors_nbytes == call.anchors.nbytes
    assert p.out == call.out.ctypes.data
    out = np.empty_like(call.out)
    out.view(np.uint32)[...] = POISON
    p.out = out
    address = p.out
    del out  # the params hold the buffer: the address stays valid
    run_cpu(p)
    written = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_float * call.out.size).from_address(address))
    np.testing.assert_allclose(written.reshape(call.out.shape), call.expected(), rtol=1e-5, atol=1e-4)
    p.out = call.out.ctypes.data  # an address replaces the buffer; its declared size stays
    assert p.out_nbytes == call.out.nbytes


# ---------------------------------------------------------------------------------------------
# buffers too small for the sizes


def _too_small_cases():
    """(label, params overrides given a Call, expected message) for each kind of short buffer."""
    return [
        ("out one row short", lambda c: dict(out=c.out[:-1].copy()), r"out: buffer holds \d+ bytes, the call needs"),
        ("out wrong dtype (bfloat16-sized)", lambda c: dict(out=np.empty(c.out.shape, np.uint16)),
         r"out: buffer holds \d+ bytes, the call needs"),
        ("weights with too few columns", lambda c: dict(weights=c.weights[:, :-1].copy()),
         r"weights: buffer holds \d+ bytes, the call needs \d+ \(batch \* \(num_partners \+ 1\) float32"),
        ("anchors shorter than batch", lambda c: dict(anchors=c.anchors[:-1].copy()),
         r"anchors: buffer holds 24 bytes, the call needs 32"),
        ("partners with fewer columns", lambda c: dict(partners=c.partners[:, :1].copy()),
         r"partners: buffer holds 32 bytes, the call needs 64"),
        ("num_images past the images buffer", lambda c: dict(num_images=7), r"images: buffer holds \d+ bytes"),
        ("images smaller than height x width", lambda c: dict(images=c.images[:, :2].copy()),
         r"images: buffer holds \d+ bytes"),
        ("mean with fewer channels", lambda c: dict(mean=c.mean[:2].copy()), r"mean: buffer holds 8 bytes, the call needs 12"),
        ("inv_std empty", lambda c: dict(inv_std=np.empty(0, np.float32)), r"inv_std: buffer holds 0 bytes"),
        ("channels larger than every buffer", lambda c: dict(channels=4), r"images: buffer holds"),
        ("batch larger than anchors", lambda c: dict(batch=5), r"anchors: buffer holds 32 bytes, the call needs 40"),
    ]


@pytest.mark.parametrize("run", RUNNERS)
@pytest.mark.parametrize("addresses", [False, True], ids=["buffers", "addresses"])
@pytest.mark.parametrize("label, override, message", _too_small_cases(), ids=[c[0] for c in _too_small_cases()])
def test_buffers_too_small_for_the_sizes(run, addresses, label, override, message):
    call = make_call()
    changes = override(call)
    out = changes.get("out", call.out)
    out.view(np.uint8)[...] = 0xA5
    before = out.tobytes()
    with pytest.raises(ValueError, match=message):
        run(call.params(addresses=addresses, **changes))
    assert out.tobytes() == before


# ---------------------------------------------------------------------------------------------
# indices outside the image batch


INDEX_CASES = [
    ("anchors", (2,), 6, "anchors[2] = 6 is out of range [0, 6) (num_images)"),
    ("anchors", (0,), -1, "anchors[0] = -1 is out of range [0, 6)"),
    ("anchors", (3,), 2**62, f"anchors[3] = {2**62} is out of range"),
    ("partners", (1, 0), 6, "partners[1, 0] = 6 is out of range [0, 6)"),
    ("partners", (3, 1), -(2**63), f"partners[3, 1] = {-(2**63)} is out of range"),
]


@pytest.mark.parametrize("addresses", [False, True], ids=["buffers", "addresses"])
@pytest.mark.parametrize("name, position, value, message", INDEX_CASES)
def test_the_cpu_binding_refuses_an_index_past_the_image_batch(addresses, name, position, value, message):
    call = make_call()
    getattr(call, name)[position] = value
    with pytest.raises(IndexError, match=re.escape(message)):
        run_cpu(call.params(addresses=addresses))
    assert call.untouched()


@pytest.mark.parametrize("grid", [(0, 0), (1, 1), (3, 2)], ids=["launcher", "one-block", "wrapping"])
@pytest.mark.parametrize("name, position, value, message", INDEX_CASES)
def test_the_cuda_kernel_skips_a_row_with_an_index_past_the_image_batch(grid, name, position, value, message):
    """Every grid shape: the row is written NaN by the threads that own its pixels, and
    recorded once (by the thread that owns pixel 0), whatever the grid-stride loops do."""
    call = make_call()
    getattr(call, name)[position] = value
    errors = C_.mix_images_cuda_emulated(call.params(addresses=True), *grid)
    row = position[0]
    term = 0 if name == "anchors" else position[1] + 1
    assert errors == (1, row, term)
    call.assert_rows([row])


def test_the_cuda_kernel_records_every_bad_row_and_names_its_first_bad_term():
    call = make_call(batch=6, num_images=6)
    call.anchors[1] = 6
    call.partners[1, 1] = -5  # the same row: counted once, named by its first bad term
    call.partners[4, 0] = 99
    call.partners[5, 1] = 6
    errors = C_.mix_images_cuda_emulated(call.params(), 2, 4)
    assert errors == (3, 5, 2)  # the last row the grid met
    call.assert_rows([1, 4, 5])
    call.poison()
    call.partners[5, 1] = 0
    assert C_.mix_images_cuda_emulated(call.params(), 2, 4) == (2, 1, 0)
    call.assert_rows([1, 4])


@pytest.mark.parametrize("out_dtype, bad_value", [(1, "nan"), (2, 0x7E00), (3, 0x7FC0), (0, 0)],
                         ids=["float32", "float16", "bfloat16", "uint8"])
def test_a_skipped_row_is_nan_in_every_output_dtype_and_zero_in_uint8(out_dtype, bad_value):
    call = make_call(batch=3)
    call.partners[1, 0] = 6
    out = np.full(call.out.shape, 0xAB, dtype={0: np.uint8, 1: np.float32, 2: np.uint16, 3: np.uint16}[out_dtype])
    p = call.params(out=out)
    p.out_dtype = out_dtype
    assert C_.mix_images_cuda_emulated(p) == (1, 1, 1)
    if bad_value == "nan":
        assert np.isnan(out[1]).all()
    else:
        assert (out[1] == bad_value).all()
    assert not (out[[0, 2]] == out[1].flat[0]).all()  # the good rows were mixed


def test_no_images_at_all():
    call = make_call()
    with pytest.raises(IndexError, match=re.escape("anchors[0] = ") + r"\d+" + re.escape(" is out of range [0, 0)")):
        run_cpu(call.params(num_images=0))
    assert call.untouched()
    assert run_emulated(call.params(num_images=0)) == (4, 3, 0)
    assert np.isnan(call.out).all() and not (call.out.view(np.uint32) == POISON).any()


GUARDED_RUN = textwrap.dedent("""
    import ctypes, mmap, sys
    import numpy as np
    from mixnn_fast._native import native

    C_ = native()
    PAGE = mmap.PAGESIZE
    # [inaccessible page][one page of images][inaccessible page]: a read of any image outside
    # the batch lands in a guard page (or unmapped memory) and kills the process.
    region = mmap.mmap(-1, 3 * PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for page in (0, 2):
        assert libc.mprotect(base + page * PAGE, PAGE, 0) == 0, ctypes.get_errno()  # PROT_NONE
    if sys.argv[1] == "touch-guard":  # the control: the guard pages do stop a read
        ctypes.string_at(base + 2 * PAGE, 1)
        sys.exit(0)
    num_images, height, width, channels = 4, 16, PAGE // (4 * 16), 1
    images = np.frombuffer(region, np.uint8, count=PAGE, offset=PAGE).reshape(num_images, height, width, channels)
    images[...] = np.arange(PAGE, dtype=np.uint8).reshape(images.shape)
    anchors = np.array([0, 4, -1, 3, 2**62, -(2**63)], np.int64)
    partners = np.array([[1], [2], [0], [-2], [1], [3]], np.int64)
    weights = np.full((6, 2), 0.5, np.float32)
    out = np.zeros((6, channels, height, width), np.float32)
    p = C_.MixImagesParams()
    p.images, p.images_nbytes = base + PAGE, PAGE  # an address: the binding knows only the size
    p.anchors, p.partners, p.weights = anchors, partners, weights
    p.mean, p.inv_std = np.zeros(1, np.float32), np.ones(1, np.float32)
    p.out = out
    p.in_dtype, p.out_dtype, p.in_layout, p.out_layout = 0, 1, 0, 1
    p.num_images, p.height, p.width, p.channels, p.batch, p.num_partners = num_images, height, width, channels, 6, 1
    errors = C_.mix_images_cuda_emulated(p, 1, 1)
    assert errors == (5, 5, 0), errors
    assert np.isnan(out[1:]).all()
    want = (images[0].astype(np.float32) + images[1]) / 2
    np.testing.assert_allclose(out[0], want.transpose(2, 0, 1))
    print("ok")
""")


def test_the_cuda_kernel_reads_no_image_outside_the_batch():
    """The images sit between two PROT_NONE pages; bad anchors and partners (one past the end,
    -1, -2, 2**62, -2**63) must not reach them.  In a subprocess: a fault is a failed test."""
    control = subprocess.run([sys.executable, "-c", GUARDED_RUN, "touch-guard"], capture_output=True, text=True)
    assert control.returncode != 0  # the guard pages do stop a read (SIGSEGV)
    result = subprocess.run([sys.executable, "-c", GUARDED_RUN, "mix"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# malformed pointers and sizes


@pytest.mark.parametrize("run", RUNNERS)
def test_out_overlapping_an_input(run):
    call = make_call()
    for name in ("anchors", "partners", "weights", "images", "mean"):
        array = getattr(call, name)
        p = call.params(addresses=True)
        setattr(p, "out", array.ctypes.data)  # writing the mix over its own inputs
        before = array.tobytes()
        with pytest.raises(ValueError, match=f"out: overlaps {name} in memory"):
            run(p)
        assert array.tobytes() == before


@pytest.mark.parametrize("run", RUNNERS)
@pytest.mark.parametrize("name", ["images", "anchors", "partners", "weights", "mean", "inv_std", "out"])
def test_null_pointers(run, name):
    call = make_call()
    p = call.params(addresses=True)
    setattr(p, name, 0)
    setattr(p, f"{name}_nbytes", -1)
    with pytest.raises(ValueError, match=f"{name}: pointer is null"):
        run(p)
    assert call.untouched()


@pytest.mark.parametrize("run", RUNNERS)
@pytest.mark.parametrize("size, value, message", [
    ("batch", -1, "batch must be >= 0, got -1"),
    ("num_images", -3, "num_images must be >= 0"),
    ("height", -1, "height must be >= 0"),
    ("channels", -2, "channels must be >= 0"),
    ("num_partners", -1, "num_partners must be >= 0"),
    ("num_partners", 2**63 - 1, "num_partners \\+ 1 overflows int64"),
    ("height", 2**61, "height \\* width \\* channels overflows int64"),
    ("num_images", 2**60, "images size overflows int64"),
    ("width", 2**62, "height \\* width \\* channels overflows int64"),
    ("out_nbytes", -2, "out_nbytes must be >= 0 \\(or -1: undeclared\\)"),
])
def test_bad_sizes(run, size, value, message):
    call = make_call()
    with pytest.raises(ValueError, match=message):
        run(call.params(addresses=True, **{size: value}))
    assert call.untouched()


@pytest.mark.parametrize("run", RUNNERS)
def test_an_empty_call_touches_nothing(run):
    """Torchvision's order: inputs checked, then an early return before any pointer is used."""
    p = C_.MixImagesParams()
    p.images, p.anchors, p.weights, p.mean, p.inv_std, p.out = 16, 24, 32, 40, 48, 56  # not memory
    p.num_images, p.height, p.width, p.channels, p.num_partners = 5, 4, 4, 3, 2
    run(p)  # batch 0: no work, no access
    p.batch, p.height = 3, 0
    run(p)  # empty images: no work either
    p.out_nbytes = 10
    p.batch, p.height = 0, 4
    run(p)
    p.batch = -1
    with pytest.raises(ValueError, match="batch must be >= 0"):
        run(p)


def test_buffers_that_cannot_be_used_as_they_are():
    call = make_call()
    p = C_.MixImagesParams()
    with pytest.raises(ValueError, match=r"MixImagesParams.images: the buffer is not C-contiguous"):
        p.images = call.images[:, ::2]
    with pytest.raises(ValueError, match=r"MixImagesParams.out: the buffer is not C-contiguous"):
        p.out = np.empty((3, 4, 8), np.float32).transpose(2, 0, 1)
    with pytest.raises(ValueError, match=r"MixImagesParams.anchors: expected int64 elements, got buffer format 'i'"):
        p.anchors = call.anchors.astype(np.int32)
    with pytest.raises(ValueError, match=r"MixImagesParams.weights: expected float32 elements"):
        p.weights = call.weights.astype(np.float64)
    readonly = call.out.copy()
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match=r"MixImagesParams.out: needs a writable buffer"):
        p.out = readonly
    p.images = readonly  # inputs may be read-only
    with pytest.raises(ValueError, match=r"MixImagesParams.out: an address must be an int in \[0, 2\*\*64\)"):
        p.out = -8
    with pytest.raises(TypeError, match=r"MixImagesParams.out: expected an address \(int\) or a C-contiguous buffer"):
        p.out = 1.5
    with pytest.raises(TypeError, match=r"MixImagesParams.mean: expected an address"):
        p.mean = True
    # size-1 dimensions may carry any stride; an empty buffer is contiguous
    p.anchors = np.zeros((3, 4), np.int64)[1:2]
    p.anchors = np.zeros((0, 3), np.int64)[:, ::2]
    assert p.anchors_nbytes == 0


def test_emulator_grid_and_launch_config_sizes():
    call = make_call()
    with pytest.raises(ValueError, match=r"grid_x must lie in \[0, 2\*\*31 - 1\]"):
        C_.mix_images_cuda_emulated(call.params(), 2**31, 0)
    with pytest.raises(ValueError, match=r"grid_y must lie in \[0, 65535\]"):
        C_.mix_images_cuda_emulated(call.params(), 0, -1)
    assert call.untouched()
    C_.mix_images_cuda_emulated(call.params(), 3, 2)  # a small grid: the grid-stride loops wrap
    np.testing.assert_allclose(call.out, call.expected(), rtol=1e-5, atol=1e-4)
    p = C_.MixImagesParams()
    p.batch, p.height, p.width, p.channels = -4, 8, 8, 1
    with pytest.raises(ValueError, match="cuda_launch_config: batch must be >= 0"):
        C_.cuda_launch_config(p)


def test_the_mixer_front_still_runs_through_the_checks():
    call = make_call(batch=5, partners=1, num_images=7, height=6, width=4)
    from mixnn_fast import mix_images

    out = mix_images(torch.from_numpy(call.images), torch.from_numpy(call.anchors), torch.from_numpy(call.partners),
                     torch.from_numpy(call.weights), mean=call.mean.tolist(), std=(1 / call.inv_std).tolist())
    np.testing.assert_allclose(out.numpy(), call.expected(), rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# the CUDA binding (skipped without a GPU)


def _cuda_params(call: Call, **tensors):
    device = {name: torch.from_numpy(getattr(call, name)).cuda()
              for name in ("images", "anchors", "partners", "weights", "mean", "inv_std", "out")}
    device.update(tensors)
    p = C_.MixImagesParams()
    for name, tensor in device.items():
        setattr(p, name, tensor.data_ptr())
        setattr(p, f"{name}_nbytes", tensor.numel() * tensor.element_size())
    p.in_dtype, p.out_dtype, p.in_layout, p.out_layout = 0, 1, 0, 1
    for name, value in call.sizes.items():
        setattr(p, name, value)
    return p, device


def _cuda_binding():
    if not C_.cuda_compiled():
        pytest.skip("built without nvcc")
    device = torch.cuda.current_device()
    C_.cuda_take_index_errors(device)  # start from a clean record
    return device, torch.cuda.current_stream().cuda_stream


@pytest.mark.cuda
def test_cuda_binding_checks_pointers_and_sizes():
    device, stream = _cuda_binding()
    call = make_call()
    p, on_device = _cuda_params(call)
    C_.mix_images_cuda(p, stream)
    torch.cuda.synchronize()
    np.testing.assert_allclose(on_device["out"].cpu().numpy(), call.expected(), rtol=1e-5, atol=1e-4)

    p, on_device = _cuda_params(call)
    p.out = call.out.ctypes.data  # host memory handed to the GPU kernel
    with pytest.raises(ValueError, match="out: is not memory the GPU can read"):
        C_.mix_images_cuda(p, stream)
    assert call.untouched()
    p, on_device = _cuda_params(call)
    p.weights_nbytes = 8
    with pytest.raises(ValueError, match="weights: buffer holds 8 bytes"):
        C_.mix_images_cuda(p, stream)
    assert C_.cuda_take_index_errors(device) == NO_INDEX_ERRORS


@pytest.mark.cuda
def test_cuda_kernel_skips_bad_rows_and_a_later_call_reports_them():
    device, stream = _cuda_binding()
    call = make_call()
    call.partners[2, 1] = 6
    call.anchors[0] = -(2**63)
    p, on_device = _cuda_params(call)
    C_.mix_images_cuda(p, stream)  # no exception: the indices are not read on the host
    got = on_device["out"].cpu().numpy()  # waits for the kernel and its record's copy
    call.out[...] = got
    call.assert_rows([0, 2])

    call.partners[2, 1], call.anchors[0] = 0, 0
    p, on_device = _cuda_params(call)
    on_device["out"].view(torch.int32).fill_(int(POISON.view(np.int32)))
    torch.cuda.synchronize()
    with pytest.raises(IndexError, match=r"mix_images_cuda: an earlier call on CUDA device \d+ met an index outside "
                                         r"\[0, num_images\) in 2 output row\(s\).*this call was not run"):
        C_.mix_images_cuda(p, stream)
    assert bool((on_device["out"].view(torch.int32) == int(POISON.view(np.int32))).all())
    C_.mix_images_cuda(p, stream)  # reported once: the next good call runs
    torch.cuda.synchronize()
    np.testing.assert_allclose(on_device["out"].cpu().numpy(), call.expected(), rtol=1e-5, atol=1e-4)
    assert C_.cuda_take_index_errors(device) == NO_INDEX_ERRORS

    call.partners[3, 0] = 7
    p, on_device = _cuda_params(call)
    C_.mix_images_cuda(p, stream)
    assert C_.cuda_take_index_errors(device) == (1, 3, 1)  # waits, reports and clears
    C_.mix_images_cuda(_cuda_params(make_call())[0], stream)  # nothing left to report
    assert C_.cuda_take_index_errors(device) == NO_INDEX_ERRORS


@pytest.mark.cuda
def test_cuda_binding_does_not_wait_for_the_device():
    """The trusted path's call returns while earlier work is still queued on the stream."""
    device, stream = _cuda_binding()
    call = make_call()
    p, on_device = _cuda_params(call)
    C_.mix_images_cuda(p, stream)  # the record exists from here on
    a = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    for _ in range(20):  # tens of milliseconds of queued work
        a = a @ a / 64
    C_.mix_images_cuda(p, stream)
    still_busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert still_busy
