"""The host path for in-memory images (mixnn_fast.pipeline.host_batches): the shift-and-flip
kernel against an independent pad-and-crop reference, the host loaders against the DALI
loaders batch for batch and bit for bit (odd sizes, 1 and 3 channels, partners, shards,
resumes, skipped samples, layouts), the ``backend`` option, the pool buffers, and a run
in a fresh interpreter where DALI cannot be found (the machine without DALI).

This module needs only NumPy, torch and scikit-learn (no DALI, PIL or Hypothesis at import),
so that its no-DALI tests run on a machine that has nothing else; the images are random
bytes, where any misplaced pixel shows."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from mixnn_fast.data.description import DatasetDescription
from mixnn_fast.pipeline import EvalLoader, LoaderOptions, MixNNLoader
from mixnn_fast.pipeline.host_batches import ShiftFlipKernel, center_window
from mixnn_fast.pipeline.options import resolve_backend
from mixnn_fast.refresh.partners import PartnerTable, mixup_table

ROOT = Path(__file__).resolve().parent.parent


def has_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


needs_dali = pytest.mark.skipif(not has_dali(), reason="the reference path needs NVIDIA DALI")


def array_set(n: int, shape: tuple[int, int, int], seed: int) -> DatasetDescription:
    """``n`` random uint8 images of ``shape`` (H, W, C), 4 classes."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n,) + tuple(shape), dtype=np.uint8)
    return DatasetDescription(f"arrays{shape}", ["a", "b", "c", "d"], rng.integers(0, 4, n), images=images)


def random_table(n: int, k: int, seed: int) -> PartnerTable:
    rng = np.random.default_rng(seed)
    nbrs = (np.arange(n)[:, None] + rng.integers(1, n, (n, k))) % n
    weights = rng.dirichlet(np.ones(k + 1), size=n).astype(np.float32)
    return PartnerTable.build(np.arange(n), nbrs, weights, n)


def reference_shift_flip(image: np.ndarray, dy: int, dx: int, flip: bool, pad: int) -> np.ndarray:
    """The CIFAR augmentation as it is usually written: zero-pad by ``pad``, cut the original
    size at (pad + dy, pad + dx), mirror."""
    h, w = image.shape[:2]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    window = padded[pad + dy:pad + dy + h, pad + dx:pad + dx + w]
    return window[:, ::-1] if flip else window


# ---------------------------------------------------------------------------------------------
# the kernel


KERNEL_CASES = [  # (h, w, c, pad, n, m): odd and tiny images, shifts past the image, empty batches
    (1, 1, 1, 0, 1, 3), (1, 1, 3, 2, 2, 4), (2, 3, 1, 5, 3, 6), (5, 4, 2, 1, 4, 0), (7, 9, 4, 3, 5, 8),
    (9, 2, 3, 11, 2, 5), (8, 8, 1, 4, 6, 7), (6, 7, 3, 0, 3, 5), (3, 8, 1, 8, 4, 8), (9, 9, 3, 9, 6, 8),
]


@pytest.mark.parametrize("h,w,c,pad,n,m", KERNEL_CASES)
def test_kernel_equals_pad_and_crop(h, w, c, pad, n, m):
    """Every case with and without shifts and flips, several draws each (repeated ids
    included): the kernel gives the padded-and-cropped, mirrored images, and writes every
    element of its output."""
    rng = np.random.default_rng([h, w, c, pad, n, m])
    images = rng.integers(0, 256, (n, h, w, c), dtype=np.uint8)
    kernel = ShiftFlipKernel(pad)
    for use_shifts in (True, False):
        for use_flips in (True, False):
            for _ in range(3):  # later draws reuse the scratch buffer
                ids = rng.integers(0, n, m)
                shifts = rng.integers(-pad, pad + 1, (m, 2)).astype(np.int32) if use_shifts else None
                flips = rng.integers(0, 2, m).astype(np.int32) if use_flips else None
                out = np.full((m, h, w, c), 77, dtype=np.uint8)  # stale content
                kernel(images, ids, shifts, flips, out)
                for i in range(m):
                    dy, dx = (0, 0) if shifts is None else (int(shifts[i, 0]), int(shifts[i, 1]))
                    flip = bool(flips is not None and flips[i])
                    np.testing.assert_array_equal(out[i], reference_shift_flip(images[ids[i]], dy, dx, flip, pad))


def test_kernel_refuses_bad_arguments():
    images = np.zeros((3, 5, 6, 1), dtype=np.uint8)
    kernel = ShiftFlipKernel(2)
    with pytest.raises(ValueError, match="^out:"):
        kernel(images, np.array([0, 1]), None, None, np.empty((2, 6, 5, 1), dtype=np.uint8))
    with pytest.raises(ValueError, match="^out:"):
        kernel(images, np.array([0, 1]), None, None, np.empty((2, 5, 6, 1), dtype=np.float32))
    with pytest.raises(ValueError, match="^shifts:"):
        kernel(images, np.array([0]), np.array([[3, 0]]), None, np.empty((1, 5, 6, 1), dtype=np.uint8))
    for pad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="^pad:"):
            ShiftFlipKernel(pad)


def test_center_window_rounds_half_away_from_zero():
    assert [center_window(29, crop) for crop in (29, 28, 27, 26, 25)] == [0, 1, 1, 2, 2]


# ---------------------------------------------------------------------------------------------
# host path == DALI path, bit for bit

SHAPES = [(27, 31, 3), (29, 23, 1)]


def assert_same_batches(host: list, dali: list, targets: torch.Tensor | None = None) -> None:
    assert len(host) == len(dali)
    for h, d in zip(host, dali):
        assert (h.index, h.position) == (d.index, d.position)
        for name in ("ids", "anchor_slots", "partner_slots", "labels"):
            assert torch.equal(getattr(h, name), getattr(d, name)), name
        assert (h.weights is None) == (d.weights is None)
        if h.weights is not None:
            assert torch.equal(h.weights, d.weights)
        assert h.images.dtype == d.images.dtype and h.images.shape == d.images.shape
        assert torch.equal(h.images, d.images), f"batch {h.index}: images differ"
        if h.images.dtype == torch.uint8 and (h.weights is not None or not h.partner_slots.shape[1]):
            xh, yh = h.mix(targets)
            xd, yd = d.mix(targets)
            assert torch.equal(xh, xd) and (targets is None or torch.equal(yh, yd))


def both(description, batch: int, options: LoaderOptions, **kwargs) -> tuple[MixNNLoader, MixNNLoader]:
    host = MixNNLoader(description, batch, options.replace(backend="host"), **kwargs)
    dali = MixNNLoader(description, batch, options.replace(backend="dali"), **kwargs)
    assert (host.backend, dali.backend) == ("host", "dali")
    return host, dali


@needs_dali
@pytest.mark.parametrize("shape", SHAPES)
def test_training_batches_equal_the_dali_path(shape):
    """Coherent plan, K = 2 partners with their weights, pad 3 and flips: three epochs, then
    an epoch abandoned after one batch and replayed; every batch and its mix identical."""
    desc = array_set(40, shape, seed=sum(shape))
    n = len(desc)
    targets = torch.from_numpy(np.random.default_rng(1).dirichlet(np.ones(4), size=n).astype(np.float32))
    options = LoaderOptions(device="cpu", num_threads=1, pad=3, seed=11)
    host, dali = both(desc, 6, options, partners=random_table(n, 2, seed=3))
    for _ in range(3):
        assert_same_batches(list(host), list(dali), targets)
    for loader in (host, dali):  # epoch 3 abandoned mid-way
        next(iter(loader))
        loader.set_epoch(3)
    assert_same_batches(list(host), list(dali), targets)


@needs_dali
@pytest.mark.parametrize("shape", SHAPES)
def test_shards_and_resumes_equal_the_dali_path(shape):
    """The second of two shards, resumed at batch 2 of epoch 1, then epoch 2 whole; and a new
    loader resumed there yields the tail of the uninterrupted epoch (host path)."""
    desc = array_set(37, shape, seed=2)
    options = LoaderOptions(device="cpu", num_threads=1, pad=4, seed=5, shard_id=1, num_shards=2)
    host, dali = both(desc, 5, options, mode="naive", partners=random_table(len(desc), 1, seed=4))
    for loader in (host, dali):
        loader.set_epoch(1, start_batch=2)
    first_h, first_d = list(host), list(dali)
    assert first_h and first_h[0].position == 2
    assert_same_batches(first_h, first_d)
    assert_same_batches(list(host), list(dali))  # epoch 2
    whole = MixNNLoader(desc, 5, options.replace(backend="host"), mode="naive",
                        partners=random_table(len(desc), 1, seed=4))
    whole.set_epoch(1)
    assert_same_batches(list(whole)[2:], first_h)


@needs_dali
@pytest.mark.parametrize("shape", SHAPES)
def test_skipped_samples_equal_the_dali_path(shape):
    """Samples marked unreadable (``on_error="skip"``) leave the same batches on both paths:
    anchors dropped with their weights, partners replaced by their anchor, the survivors'
    augmentations unchanged."""
    desc = array_set(30, shape, seed=7)
    options = LoaderOptions(device="cpu", num_threads=1, pad=2, seed=9, on_error="skip")
    host, dali = both(desc, 4, options, partners=random_table(len(desc), 2, seed=8))
    for loader in (host, dali):
        loader._feeder.skip([3, 11, 12, 29], ["marked by the test"] * 4)
    for _ in range(2):
        h, d = list(host), list(dali)
        assert_same_batches(h, d)
        seen = torch.cat([b.ids for b in h]).tolist()
        assert not {3, 11, 12, 29} & set(seen)
    assert host.skipped_anchors == dali.skipped_anchors > 0


@needs_dali
@pytest.mark.parametrize("pad,flip", [(0, True), (5, False), (0, False)])
def test_without_shifts_or_flips_equal_the_dali_path(pad, flip):
    desc = array_set(20, (27, 31, 3), seed=pad)
    producer = lambda plan: mixup_table(plan, len(desc), seed=2, epoch=plan.epoch)  # noqa: E731
    host, dali = both(desc, 7, LoaderOptions(device="cpu", num_threads=1, pad=pad, flip=flip, seed=1), mode="plain",
                      partners=producer)
    for _ in range(2):
        assert_same_batches(list(host), list(dali))


@needs_dali
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout,in_pipeline", [("NCHW", False), ("NHWC", True), ("NCHW", True)])
def test_formats_equal_the_dali_path(shape, layout, in_pipeline):
    """NCHW and normalisation "in the pipeline": the host path's fused mixer (K = 0) against
    DALI's crop_mirror_normalize.  The transposition is exact; the normalisation is the same
    float32 arithmetic ((x - mean) * (1 / std)), equal to within one rounding."""
    desc = array_set(21, shape, seed=3)
    mean, std = ((120.0, 110.0, 100.0), (60.0, 55.0, 50.0)) if shape[2] == 3 else ((100.0,), (50.0,))
    options = LoaderOptions(device="cpu", num_threads=1, pad=3, seed=4, layout=layout, mean=mean, std=std,
                            normalize_in_pipeline=in_pipeline)
    host, dali = both(desc, 5, options, mode="plain")
    h, d = list(host), list(dali)
    if not in_pipeline:
        assert_same_batches(h, d)
        return
    assert len(h) == len(d)
    for a, b in zip(h, d):
        assert a.images.dtype == torch.float32 and a.images.shape == b.images.shape
        torch.testing.assert_close(a.images, b.images, rtol=2.4e-7, atol=1e-6)


@needs_dali
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("crop", [None, 20, 21, 23])
def test_eval_batches_equal_the_dali_path(shape, crop):
    """Evaluation views (central windows of odd and even margins, a subset of ids, NCHW)."""
    desc = array_set(26, shape, seed=6)
    ids = np.random.default_rng(0).permutation(len(desc))[:19]
    for layout in ("NHWC", "NCHW"):
        options = LoaderOptions(device="cpu", num_threads=1, layout=layout)
        host = EvalLoader(desc, 6, options.replace(backend="host"), ids=ids, crop=crop)
        dali = EvalLoader(desc, 6, options.replace(backend="dali"), ids=ids, crop=crop)
        assert_same_batches(list(host), list(dali))


# ---------------------------------------------------------------------------------------------
# the option, the buffers


def test_backend_option(monkeypatch):
    import mixnn_fast.pipeline.options as options_module

    with pytest.raises(ValueError, match="^backend:"):
        LoaderOptions(backend="numpy")
    arrays = array_set(8, (9, 11, 3), seed=0)
    assert MixNNLoader(arrays, 4, LoaderOptions(device="cpu"), mode="plain").backend == "host"
    assert EvalLoader(arrays, 4, LoaderOptions(device="cpu")).backend == "host"
    assert MixNNLoader(arrays, 4, LoaderOptions(device="cpu", backend="dali"), mode="plain").backend == "dali"
    files = DatasetDescription("files", ["a", "b"], np.array([0, 1]), paths=["/no/such/a.jpg", "/no/such/b.jpg"])
    assert MixNNLoader(files, 2, LoaderOptions(device="cpu"), mode="plain").backend == "dali"
    with pytest.raises(ValueError, match="^backend: 'host' augments in-memory images"):
        MixNNLoader(files, 2, LoaderOptions(device="cpu", backend="host"), mode="plain")
    with pytest.raises(ValueError, match="^backend:"):
        EvalLoader(files, 2, LoaderOptions(device="cpu", backend="host"))
    # on a GPU: DALI when installed, else the host path
    monkeypatch.setattr(options_module, "dali_installed", lambda: True)
    assert resolve_backend("auto", True, "gpu") == "dali" and resolve_backend("auto", True, "cpu") == "host"
    monkeypatch.setattr(options_module, "dali_installed", lambda: False)
    assert resolve_backend("auto", True, "gpu") == "host" and resolve_backend("auto", False, "gpu") == "dali"
    assert resolve_backend("dali", True, "cpu") == "dali" and resolve_backend("host", True, "gpu") == "host"


def test_dali_installed_sees_a_blocked_module(monkeypatch):
    from mixnn_fast.pipeline.options import dali_installed

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    assert not dali_installed()


@pytest.mark.parametrize("copy", [True, False])
def test_host_batches_use_the_pool(copy):
    """copy=True: each batch's images are a pool buffer, kept until released and then reused;
    copy=False: one reused buffer, valid until the next batch."""
    desc = array_set(24, (13, 15, 3), seed=1)
    loader = MixNNLoader(desc, 4, LoaderOptions(device="cpu", pad=2, copy=copy), mode="plain")
    kept = [(b, b.images.clone()) for b in loader]
    pointers = {b.images.data_ptr() for b, _ in kept}
    if copy:
        assert len(pointers) == len(kept) and loader._pool.lent == len(kept)
        for batch, snapshot in kept:
            assert torch.equal(batch.images, snapshot)  # later batches did not overwrite it
            batch.release()
        assert loader._pool.lent == 0
        again = []
        for batch in loader:
            again.append(batch.images.data_ptr())
            batch.release()
        assert set(again) <= pointers  # the released buffers served the next epoch
    else:
        assert len(pointers) == 1 and loader._pool.lent == 0


def test_eval_host_batches_are_views_of_consecutive_ids():
    desc = array_set(12, (9, 9, 1), seed=4)
    batches = list(EvalLoader(desc, 5, LoaderOptions(device="cpu")))
    base = desc.images.ctypes.data
    assert [b.images.data_ptr() for b in batches] == [base + i * 81 for i in (0, 5, 10)]
    np.testing.assert_array_equal(torch.cat([b.images for b in batches]).numpy(), desc.images)


# ---------------------------------------------------------------------------------------------
# without DALI: a fresh interpreter in which ``import nvidia.dali`` fails

NO_DALI_SCRIPT = textwrap.dedent('''
    import importlib.machinery
    import sys

    class HideDali:
        """The path finder, blind to nvidia.dali: ``import nvidia.dali`` raises
        ModuleNotFoundError and ``importlib.util.find_spec`` returns None, as on a machine
        where DALI is not installed."""
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "nvidia.dali" or name.startswith("nvidia.dali."):
                return None
            return importlib.machinery.PathFinder.find_spec(name, path, target)

        @staticmethod
        def invalidate_caches():
            importlib.machinery.PathFinder.invalidate_caches()

    sys.meta_path[:] = [HideDali if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
    assert HideDali in sys.meta_path
    device = sys.argv[1]

    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    import mixnn_fast.pipeline
    from mixnn_fast.data.description import DatasetDescription
    from mixnn_fast.pipeline import EvalLoader, LoaderOptions, MixNNLoader
    from mixnn_fast.pipeline.options import dali_installed, resolve_backend
    from mixnn_fast.refresh.partners import PartnerTable

    assert not dali_installed() and resolve_backend("auto", True, "gpu") == "host"

    digits = load_digits()  # 1797 8x8 grey images, 0-16: shipped with scikit-learn, no download
    images = np.ascontiguousarray((digits.images * 15.9375).round().astype(np.uint8)[..., None])
    n = len(images)
    desc = DatasetDescription("digits", [str(k) for k in range(10)], digits.target, images=images)
    flat = images.reshape(n, -1).astype(np.float32)  # partners: each image's nearest other image
    squares = (flat * flat).sum(1)
    distances = squares[:, None] + squares[None] - 2 * flat @ flat.T
    np.fill_diagonal(distances, np.inf)
    nbrs = distances.argmin(1)[:, None]
    lam = np.random.default_rng(0).uniform(0.5, 1.0, n).astype(np.float32)
    table = PartnerTable.build(np.arange(n), nbrs, np.stack([lam, 1 - lam], 1), n)
    options = LoaderOptions(device=device, pad=1, mean=[60.0], std=[80.0], num_threads=1, seed=3)
    train = MixNNLoader(desc, 128, options, partners=table)
    evaluate = EvalLoader(desc, 256, options.replace(layout="NCHW"))
    assert train.backend == evaluate.backend == "host", (train.backend, evaluate.backend)
    on = torch.device("cuda" if device == "gpu" else "cpu")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                torch.nn.Flatten(), torch.nn.Linear(16 * 4 * 4, 10)).to(on)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    targets = torch.nn.functional.one_hot(torch.from_numpy(digits.target), 10).float().to(on)
    losses = []
    for epoch in range(4):
        for batch in train:
            assert batch.images.device.type == on.type
            x, y = batch.mix(targets)
            loss = -(y * torch.log_softmax(model(x), 1)).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            batch.release()
            losses.append(loss.item())
        correct = 0
        with torch.no_grad():
            for batch in evaluate:
                x, _ = batch.mix()
                correct += int((model(x).argmax(1).cpu() == batch.labels).sum())
                batch.release()
    dali = sorted(m for m in sys.modules if m == "nvidia.dali" or m.startswith("nvidia.dali."))
    assert not dali, dali
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], (losses[0], losses[-1])
    assert correct / n > 0.4, correct / n  # ten classes: chance is 0.1
    try:
        next(iter(MixNNLoader(desc, 128, options.replace(backend="dali"), partners=table)))
    except ImportError:
        pass
    else:
        raise AssertionError("backend='dali' ran without DALI")
    print(f"ok {len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, accuracy {correct / n:.3f}")
''')


def run_without_dali(device: str) -> str:
    result = subprocess.run([sys.executable, "-c", NO_DALI_SCRIPT, device], capture_output=True, text=True,
                            cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_trains_without_dali():
    """scikit-learn's digits, 4 epochs of MixNN steps and an evaluation pass each, on the CPU,
    in an interpreter where DALI cannot be imported: nothing imports it, the loss falls, and
    asking for the DALI path fails with an ImportError."""
    assert run_without_dali("cpu").startswith("ok ")


# ---------------------------------------------------------------------------------------------
# GPU (skipped without a CUDA device)


@pytest.mark.cuda
def test_trains_on_cuda_without_dali():
    """The GPU test machine's case: no DALI, "auto" picks the host path, batches mix on CUDA."""
    assert run_without_dali("gpu").startswith("ok ")


@pytest.mark.cuda
@pytest.mark.parametrize("layout,in_pipeline", [("NHWC", False), ("NCHW", False), ("NCHW", True)])
def test_gpu_host_path_equals_the_cpu_host_path(layout, in_pipeline):
    """Made on the host either way: the GPU batches are the CPU batches, copied once."""
    desc = array_set(30, (27, 31, 3), seed=5)
    options = LoaderOptions(pad=3, seed=2, layout=layout, mean=(120.0, 110.0, 100.0), std=(60.0, 55.0, 50.0),
                            normalize_in_pipeline=in_pipeline, backend="host")
    table = random_table(len(desc), 1, seed=6)
    on_cpu = list(MixNNLoader(desc, 8, options.replace(device="cpu"), partners=table))
    on_gpu = list(MixNNLoader(desc, 8, options.replace(device="gpu"), partners=table))
    assert len(on_cpu) == len(on_gpu)
    for c, g in zip(on_cpu, on_gpu):
        assert g.images.is_cuda and torch.equal(c.ids, g.ids)
        if in_pipeline:
            torch.testing.assert_close(g.images.cpu(), c.images, rtol=2.4e-7, atol=1e-6)
        else:
            assert torch.equal(g.images.cpu(), c.images)
            torch.testing.assert_close(g.mix()[0].cpu(), c.mix()[0], rtol=1e-5, atol=1e-5)
