"""Inputs from other array libraries reach the kernel without a copy: NumPy arrays (writable or
read-only), any ``__dlpack__`` producer, DALI's TensorCPU and dense TensorListCPU, CuPy arrays
(on a GPU).  Checked on the pointer the kernel itself is handed, and by the result."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures import DLPackOnly

from mixnn_fast import mix_images, mix_images_reference, mix_targets
from mixnn_fast.mix import core




@pytest.fixture
def kernel_reads(monkeypatch):
    """The address of every ``images`` buffer handed to the native kernel, in call order."""
    seen: list[int] = []
    params = core._params

    def spy(call):
        seen.append(call.images.data_ptr())
        return params(call)

    monkeypatch.setattr(core, "_params", spy)
    return seen


def small_call(seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    anchors = rng.integers(0, 7, 4)
    partners = rng.integers(0, 7, (4, 2))
    weights = np.full((4, 3), 1 / 3, dtype=np.float32)
    return images, anchors, partners, weights


def expected(images, anchors, partners, weights):
    as_t = [torch.as_tensor(np.ascontiguousarray(a)) for a in (images, anchors, partners, weights)]
    return mix_images_reference(*as_t)


def test_numpy_images_are_not_copied(kernel_reads):
    images, anchors, partners, weights = small_call()
    got = mix_images(images, anchors, partners, weights)
    assert kernel_reads == [images.ctypes.data]
    torch.testing.assert_close(got, expected(images, anchors, partners, weights))
    images[0] = 255 - images[0]  # the kernel reads the array's own memory: a change shows in the next call
    torch.testing.assert_close(mix_images(images, anchors, partners, weights),
                               expected(images, anchors, partners, weights))


def test_read_only_numpy_images_are_not_copied(kernel_reads, recwarn):
    images, anchors, partners, weights = small_call(1)
    images.flags.writeable = False
    got = mix_images(images, anchors, partners, weights)
    if np.lib.NumpyVersion(np.__version__) >= "2.1.0":  # read-only arrays export through DLPack 1.0
        assert kernel_reads == [images.ctypes.data]
    assert not [w for w in recwarn if "not writable" in str(w.message)]
    torch.testing.assert_close(got, expected(images, anchors, partners, weights))


def test_numpy_views_torch_cannot_express_are_copied_correctly(kernel_reads):
    images, anchors, partners, weights = small_call(2)
    flipped = images[:, ::-1]  # negative strides: torch has none, so this one is copied
    got = mix_images(flipped, anchors, partners, weights)
    assert kernel_reads[0] != flipped.ctypes.data
    torch.testing.assert_close(got, expected(flipped, anchors, partners, weights))


def test_any_dlpack_producer_is_not_copied(kernel_reads):
    base = torch.randint(0, 256, (7, 5, 6, 3), dtype=torch.uint8)
    _, anchors, partners, weights = small_call(3)
    got = mix_images(DLPackOnly(base), DLPackOnly(torch.from_numpy(anchors)), partners, weights)
    assert kernel_reads == [base.data_ptr()]
    assert torch.equal(got, mix_images(base, anchors, partners, weights))
    # a NumPy array behind the protocol too
    images = np.ascontiguousarray(base.numpy())
    mix_images(DLPackOnly(images), anchors, partners, weights)
    assert kernel_reads[-1] == images.ctypes.data


def test_strided_dlpack_view_is_copied_once_for_the_kernel(kernel_reads):
    """"Where the layout allows": a view that is not contiguous in the declared layout is made
    contiguous once (the kernel reads one dense block), and still gives the right result."""
    base = torch.randint(0, 256, (7, 5, 12, 3), dtype=torch.uint8)
    view = base[:, :, ::2]
    _, anchors, partners, weights = small_call(4)
    got = mix_images(DLPackOnly(view), anchors, partners, weights)
    assert kernel_reads[0] != view.data_ptr()
    torch.testing.assert_close(got, mix_images_reference(view.contiguous(), torch.from_numpy(anchors),
                                                         torch.from_numpy(partners), torch.from_numpy(weights)))


def test_dlpack_targets_are_read_in_place():
    targets = torch.softmax(torch.randn(7, 4), dim=1)
    _, anchors, partners, weights = small_call(5)
    want = mix_targets(targets, anchors, partners, weights)
    assert torch.equal(mix_targets(DLPackOnly(targets), anchors, partners, weights), want)
    assert torch.equal(mix_targets(targets.numpy(), anchors, partners, weights), want)


# ---- DALI ------------------------------------------------------------------------------------------


def _dali_backend():
    return pytest.importorskip("nvidia.dali.backend", reason="nvidia.dali is not installed")


def test_dali_tensor_cpu_is_not_copied(kernel_reads):
    backend = _dali_backend()
    images, anchors, partners, weights = small_call(6)
    tensor = backend.TensorCPU(images)
    got = mix_images(tensor, anchors, partners, weights)
    assert kernel_reads == [torch.from_dlpack(tensor).data_ptr()]
    torch.testing.assert_close(got, expected(images, anchors, partners, weights))


def test_dali_dense_tensor_list_is_not_copied(kernel_reads):
    backend = _dali_backend()
    images, anchors, partners, weights = small_call(7)
    batch = backend.TensorListCPU(images)  # what a pipeline's run() returns for a uniform batch
    assert not hasattr(batch, "__dlpack__")
    got = mix_images(batch, anchors, partners, weights)
    assert kernel_reads == [batch.as_tensor().data_ptr()]
    torch.testing.assert_close(got, expected(images, anchors, partners, weights))


def test_dali_ragged_tensor_list_is_refused_by_name():
    backend = _dali_backend()
    ragged = backend.TensorListCPU([np.zeros((5, 6, 3), np.uint8), np.zeros((4, 6, 3), np.uint8)])
    with pytest.raises(ValueError, match="images: a DALI TensorList whose samples differ"):
        mix_images(ragged, [0], [[1]], [[0.5, 0.5]])


# ---- CuPy (GPU) --------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_cupy_arrays_are_not_copied(kernel_reads):
    cupy = pytest.importorskip("cupy")
    images, anchors, partners, weights = small_call(8)
    on_gpu = cupy.asarray(images)
    got = mix_images(on_gpu, cupy.asarray(anchors), cupy.asarray(partners), cupy.asarray(weights))
    assert kernel_reads == [on_gpu.data.ptr]
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), expected(images, anchors, partners, weights))
