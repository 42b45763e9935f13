"""Training augmentations drawn on the host (mixnn_fast.pipeline.augment_params): exact
resume (a fresh loader started mid-epoch sees the augmentations of an uninterrupted pass),
shards, pipeline rebuilds and skipped files that change nothing, the DALI graph applying
exactly the drawn parameters, the distributions (flips, shifts, torchvision's
random-resized crop) and the image headers the windows are drawn from."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import photo_crops, write_jpeg
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from mixnn_fast.refresh.partners import PartnerTable

import mixnn_fast.pipeline.host_resize as host_resize
from mixnn_fast.data.description import DatasetDescription
from mixnn_fast.pipeline import ImageDecodeError, LoaderOptions, MixNNLoader
from mixnn_fast.pipeline.augment_params import (CROP_ATTEMPTS, CropFlip, ShiftFlip, crop_windows, encoded_image_size,
                                                flips_from_uniforms, shifts_from_uniforms, slot_uniforms)

# ---------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def array_set():
    """40 distinct 32×32 RGB photo crops held in memory, 4 classes."""
    images = photo_crops(40, 32, seed=11)
    return DatasetDescription("arrays", list("abcd"), np.arange(40) % 4, images=images)


def jpeg_files(root: Path, n: int, shape: tuple[int, int], seed: int) -> list[str]:
    images = photo_crops(n, shape, seed=seed)
    return [str(write_jpeg(root / f"{i:02d}.jpg", img)) for i, img in enumerate(images)]


@pytest.fixture(scope="module")
def jpeg_set(tmp_path_factory):
    """22 JPEGs of mixed shapes (wide, tall, square), so the windows differ in kind."""
    root = tmp_path_factory.mktemp("aug_jpegs")
    paths = (jpeg_files(root / "wide", 8, (60, 90), seed=21) + jpeg_files(root / "tall", 7, (83, 51), seed=22)
             + jpeg_files(root / "square", 7, (64, 64), seed=23))
    return DatasetDescription("jpegs", ["a", "b"], np.arange(len(paths)) % 2, paths=paths)


def ring(n: int, shift: int = 3) -> PartnerTable:
    """Sample i mixes with i + shift, half and half."""
    return PartnerTable.build(np.arange(n), ((np.arange(n) + shift) % n)[:, None], np.full((n, 2), 0.5), n)


def train_loader(desc, *, batch_size: int = 4, mode: str = "coherent", partners=None, **options) -> MixNNLoader:
    """A CPU training loader; ``options`` are LoaderOptions fields over these defaults."""
    settings = dict(size=40, device="cpu", num_threads=1, seed=3)
    settings.update(options)
    if partners is None and mode in ("coherent", "naive"):
        partners = ring(len(desc))
    return MixNNLoader(desc, batch_size, LoaderOptions(**settings), mode=mode, partners=partners)


def record(loader) -> list[tuple[int, int, list[int], torch.Tensor]]:
    """(plan index, position, ids, images) of every batch of the loader's next epoch."""
    return [(b.index, b.position, b.ids.tolist(), b.images.clone()) for b in loader]


def assert_same_batches(got, expected) -> None:
    assert len(got) == len(expected)
    for (index, position, ids, images), (e_index, e_position, e_ids, e_images) in zip(got, expected):
        assert (index, position, ids) == (e_index, e_position, e_ids)
        assert torch.equal(images, e_images), f"batch {index}: pixels differ"


def per_sample(batches) -> dict[int, torch.Tensor]:
    """sample id -> its image (plain plans: each sample once per epoch)."""
    return {sample: images[slot] for _, _, ids, images in batches for slot, sample in enumerate(ids)}


SOURCES = [pytest.param(dict(), id="arrays"),  # the host path (the CPU default for arrays)
           pytest.param(dict(backend="dali"), id="arrays-dali"),
           pytest.param(dict(resize_backend="torch"), id="jpeg-torch"),
           pytest.param(dict(resize_backend="dali"), id="jpeg-dali")]


def source_for(kwargs, array_set, jpeg_set):
    return jpeg_set if "resize_backend" in kwargs else array_set


# ---------------------------------------------------------------------------------------------
# exact resume


@pytest.mark.parametrize("kwargs", SOURCES)
def test_a_fresh_loader_resumes_mid_epoch_with_the_same_pixels(array_set, jpeg_set, kwargs):
    """Epoch e in full, then a NEW loader (fresh pipeline) started at batch s: batches s..
    are bit-identical, for s = 0, 1, the middle, the last batch and len(plan)."""
    desc = source_for(kwargs, array_set, jpeg_set)
    epoch = 2
    full_loader = train_loader(desc, **kwargs)
    full_loader.set_epoch(epoch)
    n = len(full_loader)
    full = record(full_loader)
    assert [p for _, p, _, _ in full] == list(range(n)) and n >= 5
    for start in (0, 1, n // 2, n - 1, n):
        resumed = train_loader(desc, **kwargs)
        resumed.set_epoch(epoch, start_batch=start)
        assert len(resumed) == n  # the plan's length, not what is left of it
        assert_same_batches(record(resumed), full[start:])
        assert resumed.epoch == epoch + 1 and resumed.start_batch == 0
        nxt = record(resumed)  # the next iteration is the next epoch, from its start
        assert len(nxt) == n and nxt[0][1] == 0


@pytest.mark.parametrize("kwargs", SOURCES)
def test_same_epoch_twice_is_identical_and_other_epochs_differ(array_set, jpeg_set, kwargs):
    desc = source_for(kwargs, array_set, jpeg_set)
    loader = train_loader(desc, mode="plain", **kwargs)
    loader.set_epoch(4)
    first = record(loader)
    for _ in loader:  # epoch 5 abandoned after one batch: the pipeline is rebuilt next time
        break
    loader.set_epoch(4)
    assert_same_batches(record(loader), first)
    loader.set_epoch(4)
    assert_same_batches(record(loader), first)  # a reused (reset) pipeline, too
    other = per_sample(record(loader))  # epoch 5
    this = per_sample(first)
    assert set(other) == set(this) == set(range(len(desc)))
    same = sum(torch.equal(this[s], other[s]) for s in this)
    assert same <= len(desc) // 8, f"{same} of {len(desc)} samples got the same augmentation in two epochs"


def test_the_augmentation_ignores_the_loader_history(array_set):
    """A batch's pixels depend on (seed, epoch, index, slot), not on what ran before: the
    same epoch after other epochs, on a loader with a different prefetch depth and thread
    count, is identical; another seed differs."""
    fresh = train_loader(array_set, mode="plain")
    fresh.set_epoch(3)
    reference = record(fresh)
    busy = train_loader(array_set, mode="plain", prefetch_queue_depth=3, num_threads=2)
    for epoch in (0, 7, 1):
        busy.set_epoch(epoch)
        record(busy)
    busy.set_epoch(3)
    assert_same_batches(record(busy), reference)
    reseeded = train_loader(array_set, mode="plain", seed=4)
    reseeded.set_epoch(3)
    this, other = per_sample(reference), per_sample(record(reseeded))
    assert sum(torch.equal(this[s], other[s]) for s in this) <= len(this) // 8


def test_batches_before_start_batch_are_not_read(jpeg_set):
    """A missing file in batch 0 only: a full pass fails on it, a pass started at batch 1
    never reads it (on_error="raise")."""
    probe = train_loader(jpeg_set, mode="plain")
    plan = probe.make_plan(1)
    victim = int(plan[0].ids[0])
    assert all(victim not in plan[b].ids for b in range(1, len(plan)))
    paths = list(jpeg_set.paths)
    paths[victim] = paths[victim] + ".missing"
    broken = DatasetDescription("broken", jpeg_set.classes, jpeg_set.labels, paths=paths)
    loader = train_loader(broken, mode="plain")
    loader.set_epoch(1)
    with pytest.raises(FileNotFoundError, match=r"\.missing"):
        record(loader)
    loader.set_epoch(1, start_batch=1)
    resumed = record(loader)
    assert [b[1] for b in resumed] == list(range(1, len(plan)))
    probe.set_epoch(1)
    assert_same_batches(resumed, record(probe)[1:])


# ---------------------------------------------------------------------------------------------
# shards, skipped files, decoding failures


@pytest.mark.parametrize("kwargs", SOURCES[:3])
def test_a_batch_looks_the_same_on_every_shard(array_set, jpeg_set, kwargs):
    """Each batch's augmentation depends on its plan index only: the batches of shard 0 and
    shard 1 of a 2-shard loader are the single-process batches of the same index (the
    padding batch of the short shard repeats batch 0, pixel for pixel)."""
    desc = source_for(kwargs, array_set, jpeg_set)
    kwargs = dict(kwargs, batch_size=5 if "resize_backend" in kwargs else 6)  # an odd number of batches: 5 or 7
    whole = train_loader(desc, **kwargs)
    whole.set_epoch(1)
    by_index = {b[0]: b for b in record(whole)}
    assert len(by_index) % 2 == 1, "an odd number of batches exercises the padding"
    seen = []
    for shard in range(2):
        loader = train_loader(desc, shard_id=shard, num_shards=2, **kwargs)
        loader.set_epoch(1)
        batches = record(loader)
        assert [b[1] for b in batches] == list(range(len(batches)))
        for index, _, ids, images in batches:
            assert ids == by_index[index][2] and torch.equal(images, by_index[index][3])
            seen.append(index)
    assert sorted(set(seen)) == sorted(by_index) and len(seen) == len(by_index) + 1
    # resuming one shard mid-epoch
    loader = train_loader(desc, shard_id=1, num_shards=2, **kwargs)
    loader.set_epoch(1, start_batch=2)
    for index, _, ids, images in record(loader):
        assert torch.equal(images, by_index[index][3])


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, jpeg_set):
    """(good, damaged): the JPEG set, and a copy where sample 4 is missing and sample 9 is
    truncated (DALI fails its batch; the loader names it, rebuilds and replays)."""
    root = tmp_path_factory.mktemp("aug_damaged")
    paths = []
    for i, src in enumerate(jpeg_set.paths):
        dst = root / f"{i:02d}.jpg"
        raw = Path(src).read_bytes()
        if i == 9:
            dst.write_bytes(raw[: len(raw) // 3])
        if i != 4 and i != 9:
            dst.write_bytes(raw)
        paths.append(str(dst))
    return jpeg_set, DatasetDescription("damaged", jpeg_set.classes, jpeg_set.labels, paths=paths)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_skipped_files_and_replays_leave_the_other_augmentations_alone(damaged, backend):
    """With on_error="skip", the surviving images of a batch that lost a sample, and the
    batches replayed on a rebuilt pipeline after DALI failed on a truncated file, carry
    exactly the augmentations they get when every file is good."""
    good, bad = damaged
    ref = train_loader(good, resize_backend=backend)
    ref.set_epoch(0)
    expected = {(index, sample): images[slot] for index, _, ids, images in record(ref)
                for slot, sample in enumerate(ids)}
    loader = train_loader(bad, resize_backend=backend, on_error="skip")
    loader.set_epoch(0)
    got = record(loader)
    assert set(loader.skipped) == {4, 9}
    checked = 0
    for index, _, ids, images in got:
        assert 4 not in ids and 9 not in ids
        for slot, sample in enumerate(ids):
            assert torch.equal(images[slot], expected[(index, sample)]), f"batch {index}, sample {sample}"
            checked += 1
    assert checked >= len(good) - 6


# ---------------------------------------------------------------------------------------------
# the graph applies exactly the drawn parameters


@pytest.mark.parametrize("backend", ["host", "dali"])
def test_arrays_are_shifted_and_flipped_exactly_as_drawn(array_set, backend):
    """Every in-memory image equals NumPy's pad, crop and flip with the host parameters of
    its (epoch, batch index, slot), on either path."""
    pad = 5
    loader = train_loader(array_set, pad=pad, mode="naive", partners=ring(len(array_set), 1), backend=backend)
    loader.set_epoch(6)
    spec = ShiftFlip(pad)
    shifts_seen, flips = set(), []
    for batch in loader:
        planned = loader.plan[batch.position]
        slots = np.arange(len(planned.ids))
        shifts, mirror = spec.params(3, 6, batch.index, len(slots), slots)
        for slot, sample in enumerate(batch.ids.tolist()):
            padded = np.pad(array_set.images[sample], ((pad, pad), (pad, pad), (0, 0)))
            dy, dx = shifts[slot]
            view = padded[pad + dy:pad + dy + 32, pad + dx:pad + dx + 32]
            view = view[:, ::-1] if mirror[slot] else view
            np.testing.assert_array_equal(batch.images[slot].numpy(), view)
            shifts_seen.add((int(dy), int(dx)))
            flips.append(int(mirror[slot]))
    assert len(shifts_seen) > 20 and 0 < sum(flips) < len(flips)


@pytest.mark.parametrize("backend", ["host", "dali"])
@pytest.mark.parametrize("pad,flip", [(0, False), (0, True), (3, False)])
def test_arrays_without_shifts_or_flips(array_set, pad, flip, backend, recwarn):
    """pad=0 and/or flip=False: the pipeline reads only the parameters it uses (DALI warns
    about unused source outputs otherwise), and the images are the originals, mirrored
    and/or shifted as drawn, on either path."""
    loader = train_loader(array_set, pad=pad, flip=flip, mode="plain", backend=backend)
    loader.set_epoch(1)
    for batch in loader:
        params = ShiftFlip(pad, flip).params(3, 1, batch.index, len(batch.ids), np.arange(len(batch.ids)))
        shifts = params[0] if pad else np.zeros((len(batch.ids), 2), dtype=np.int32)
        mirror = params[-1] if flip else np.zeros(len(batch.ids), dtype=np.int32)
        for slot, sample in enumerate(batch.ids.tolist()):
            padded = np.pad(array_set.images[sample], ((pad, pad), (pad, pad), (0, 0)))
            dy, dx = shifts[slot]
            view = padded[pad + dy:pad + dy + 32, pad + dx:pad + dx + 32]
            np.testing.assert_array_equal(batch.images[slot].numpy(), view[:, ::-1] if mirror[slot] else view)
    assert not [w for w in recwarn if "not used" in str(w.message)]


def test_jpeg_windows_are_decoded_as_drawn(jpeg_set, monkeypatch):
    """The decoded windows have the drawn shapes and hold the drawn region of the image (PIL
    decode, cropped there; JPEG decoders agree to a few grey levels); the flips reach the
    resize.  With the DALI resize, the result is the torch path's within rounding."""
    windows, mirrors = [], []
    resize = host_resize.resize_windows

    def spy(wins, mirror, size, out):
        windows.extend(np.array(wins[i]) for i in range(len(wins)))
        mirrors.extend(np.asarray(mirror).tolist())
        return resize(wins, mirror, size, out)

    monkeypatch.setattr(host_resize, "resize_windows", spy)
    loader = train_loader(jpeg_set, mode="plain", resize_backend="torch")
    loader.set_epoch(2)
    batches = record(loader)
    spec = CropFlip()
    decoded = {i: np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) for i, p in enumerate(jpeg_set.paths)}
    k = 0
    kinds = set()
    for index, position, ids, _ in batches:
        sizes = np.array([decoded[s].shape[:2] for s in ids])
        slots = np.arange(len(ids))
        anchors, shapes, flips = spec.params(3, 2, index, len(ids), slots, sizes)
        no_flip = CropFlip(flip=False).params(3, 2, index, len(ids), slots, sizes)
        assert len(no_flip) == 2 and np.array_equal(no_flip[0], anchors) and np.array_equal(no_flip[1], shapes)
        for slot, sample in enumerate(ids):
            (y, x), (h, w) = anchors[slot], shapes[slot]
            win = windows[k].astype(np.float32)
            assert win.shape == (h, w, 3)
            assert mirrors[k] == flips[slot]
            ref = decoded[sample][y:y + h, x:x + w]
            assert np.abs(win - ref).mean() < 3.0, f"sample {sample}: window content differs from PIL's"
            kinds.add((int(h), int(w)))
            k += 1
    assert k == len(jpeg_set) and len(kinds) > len(jpeg_set) // 2  # windows vary
    monkeypatch.setattr(host_resize, "resize_windows", resize)
    dali = train_loader(jpeg_set, mode="plain", resize_backend="dali")
    dali.set_epoch(2)
    for (_, _, ids, a), (_, _, ids_b, b) in zip(batches, record(dali), strict=True):
        assert ids == ids_b
        per_image = (a.float() - b.float()).abs().mean(dim=(1, 2, 3))
        assert per_image.max() < 0.5, f"torch vs DALI resize differ by {per_image.max():.2f} grey levels"


def test_exif_rotated_jpegs_get_windows_in_the_rotated_frame(tmp_path):
    """DALI decodes EXIF orientations 5-8 turned a quarter: the windows are drawn in that
    frame (the whole rotated image with area 1), so none falls outside it."""
    paths = []
    for i, img in enumerate(photo_crops(6, (30, 70), seed=4)):
        exif = Image.Exif()
        exif[0x0112] = (6, 8, 1)[i % 3]
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(img).save(path, format="JPEG", quality=92, exif=exif)
        paths.append(str(path))
    desc = DatasetDescription("rotated", ["a"], np.zeros(6, dtype=np.int64), paths=paths)
    for backend in ("torch", "dali"):
        loader = MixNNLoader(desc, 3, LoaderOptions(size=30, area=(1.0, 1.0), aspect_ratio=(0.3, 3.0), flip=False,
                                                    device="cpu", resize_backend=backend), mode="plain")
        for batch in loader:
            for img, sample in zip(batch.images.numpy().astype(np.float32), batch.ids.tolist()):
                with Image.open(paths[sample]) as im:
                    ref = np.asarray(ImageOps.exif_transpose(im).convert("RGB").resize((30, 30), Image.BILINEAR),
                                     dtype=np.float32)
                assert np.abs(img - ref).mean() < 6.0, f"sample {sample}: not the whole oriented image"


@pytest.mark.cuda
@pytest.mark.parametrize("kwargs", [dict(), dict(resize_backend="dali")], ids=["arrays", "jpeg"])
def test_gpu_resume_is_exact_and_draws_the_cpu_augmentation(array_set, jpeg_set, kwargs):
    """On the GPU (arrays moved there, JPEG windows decoded by the 'mixed' decoder): a fresh
    loader resumed at batch 2 repeats the full pass exactly, and the views are the CPU
    pipeline's (the same parameters; arrays bit-identical, JPEGs within decoder rounding)."""
    desc = source_for(kwargs, array_set, jpeg_set)
    full_loader = train_loader(desc, device="gpu", **kwargs)
    full_loader.set_epoch(2)
    full = record(full_loader)
    assert full[0][3].is_cuda
    resumed = train_loader(desc, device="gpu", **kwargs)
    resumed.set_epoch(2, start_batch=2)
    assert_same_batches(record(resumed), full[2:])
    cpu_loader = train_loader(desc, device="cpu", **kwargs)
    cpu_loader.set_epoch(2)
    for (_, _, ids, gpu), (_, _, cpu_ids, cpu) in zip(full, record(cpu_loader), strict=True):
        assert ids == cpu_ids
        if "resize_backend" not in kwargs:
            assert torch.equal(gpu.cpu(), cpu)
        else:
            per_image = (gpu.cpu().float() - cpu.float()).abs().mean(dim=(1, 2, 3))
            assert per_image.max() < 3.0, f"GPU vs CPU views differ by {per_image.max():.2f} grey levels"


# ---------------------------------------------------------------------------------------------
# distributions


def test_slot_rows_do_not_depend_on_the_batch_size():
    a = slot_uniforms(1, 2, 3, 5, 7)
    b = slot_uniforms(1, 2, 3, 40, 7)
    np.testing.assert_array_equal(a, b[:5])
    assert not np.array_equal(a, slot_uniforms(1, 2, 4, 5, 7)) and not np.array_equal(a, slot_uniforms(1, 3, 3, 5, 7))
    with pytest.raises(ValueError, match="epoch"):
        slot_uniforms(1, -1, 3, 5, 7)


def test_flip_rate_and_shift_range():
    """Flags 1 with probability 1/2 and shifts uniform over [-pad, pad] on both axes, within
    5 standard deviations of the binomial counts of n draws."""
    pad, n = 4, 40_000
    u = np.concatenate([slot_uniforms(0, 0, index, 400, 3) for index in range(n // 400)])
    shifts, flips = ShiftFlip(pad).params(0, 0, 0, n, np.arange(n))  # one batch of n slots
    assert shifts.dtype == np.int32 and flips.dtype == np.int32
    for s, f in ((shifts, flips), (shifts_from_uniforms(u[:, :2], pad), flips_from_uniforms(u[:, 2]))):
        assert abs(f.mean() - 0.5) < 5 * math.sqrt(0.25 / n)
        p = 1 / (2 * pad + 1)
        for axis in range(2):
            counts = np.bincount(s[:, axis] + pad, minlength=2 * pad + 1)
            assert len(counts) == 2 * pad + 1, "a shift outside [-pad, pad]"
            assert (np.abs(counts - n * p) < 5 * math.sqrt(n * p * (1 - p))).all(), counts
        assert abs(np.corrcoef(s[:, 0], s[:, 1])[0, 1]) < 5 / math.sqrt(n)
    # unused parameters are not handed to the pipeline; the others keep their values
    (no_flip,) = ShiftFlip(pad, flip=False).params(0, 0, 0, n, np.arange(n))
    (no_shift,) = ShiftFlip(0).params(0, 0, 0, n, np.arange(n))
    np.testing.assert_array_equal(no_flip, shifts)
    np.testing.assert_array_equal(no_shift, flips)


@settings(max_examples=200)
@given(height=st.integers(1, 700), width=st.integers(1, 700),
       area=st.tuples(st.floats(0.01, 1.0), st.floats(0.01, 1.0)).map(sorted),
       ratio=st.tuples(st.floats(0.1, 10.0), st.floats(0.1, 10.0)).map(sorted), seed=st.integers(0, 2**32 - 1))
def test_every_window_lies_inside_its_image(height, width, area, ratio, seed):
    spec = CropFlip(tuple(area), tuple(ratio))
    m = 64
    anchors, shapes, flips = spec.params(seed, 0, 0, m, np.arange(m), np.tile([height, width], (m, 1)))
    assert anchors.dtype == shapes.dtype == np.int32 and anchors.shape == shapes.shape == (m, 2)
    assert (shapes >= 1).all() and (anchors >= 0).all()
    assert (anchors[:, 0] + shapes[:, 0] <= height).all() and (anchors[:, 1] + shapes[:, 1] <= width).all()
    assert set(np.unique(flips)) <= {0, 1}


class _FakeTorch:
    """``torch`` for torchvision's ``get_params`` with its random draws replaced by given
    uniforms: ``empty(1).uniform_(a, b)`` -> a + u (b - a), ``randint(lo, hi)`` -> lo +
    floor(u (hi - lo)); ``tensor`` in float64, as our NumPy code computes."""

    def __init__(self, ranges: list[float], positions: list[float]):
        self.ranges, self.positions = list(ranges), list(positions)

    def empty(self, *shape):
        fake = self

        class _Draw:
            def uniform_(self, a, b):
                u = fake.ranges.pop(0)
                return torch.tensor([float(a) + u * (float(b) - float(a))], dtype=torch.float64)
        return _Draw()

    def randint(self, low, high, size):
        u = self.positions.pop(0)
        return torch.tensor([low + int(u * (high - low))])

    def tensor(self, data):
        return torch.tensor(data, dtype=torch.float64)

    def __getattr__(self, name):
        return getattr(torch, name)


def test_windows_equal_torchvisions_get_params_on_the_same_uniforms(monkeypatch, rng):
    """torchvision's own get_params, fed our uniforms, returns our window for every image
    (first fitting attempt, corner, central fallback): the algorithm is the same."""
    import torchvision.transforms.transforms as tvt

    shapes = [(64, 64), (90, 120), (131, 77), (20, 400), (400, 20), (1, 1), (3, 500), (427, 640)]
    ranges = [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.5, 1.0), (0.2, 5.0)), ((1.0, 1.0), (1.0, 1.0)),
              ((0.9, 1.0), (2.0, 3.0))]
    fallbacks = 0
    for area, ratio in ranges:
        for height, width in shapes:
            m = 150
            u = rng.random((m, 2 * CROP_ATTEMPTS + 2))
            a = CROP_ATTEMPTS
            anchors, sizes = crop_windows(u[:, :a], u[:, a:2 * a], u[:, 2 * a:], np.full(m, height),
                                          np.full(m, width), area, ratio)
            image = torch.zeros(1, height, width)
            for i in range(m):
                interleaved = np.stack([u[i, :a], u[i, a:2 * a]], axis=1).ravel().tolist()
                fake = _FakeTorch(interleaved, u[i, 2 * a:].tolist())
                monkeypatch.setattr(tvt, "torch", fake)
                top, left, h, w = tvt.RandomResizedCrop.get_params(image, list(area), list(ratio))
                monkeypatch.setattr(tvt, "torch", torch)
                assert (top, left, h, w) == (*anchors[i], *sizes[i]), (height, width, area, ratio, i)
                fallbacks += len(fake.positions) == 2  # no corner drawn: the central fallback
    assert fallbacks > 100, "the fallback should be exercised"


@pytest.mark.parametrize("height,width,area,ratio", [(64, 64, (0.08, 1.0), (3 / 4, 4 / 3)),
                                                     (90, 120, (0.08, 1.0), (3 / 4, 4 / 3)),
                                                     (131, 77, (0.25, 0.9), (0.5, 2.0)),
                                                     (24, 300, (0.08, 1.0), (3 / 4, 4 / 3))])
def test_window_distribution_matches_torchvision(height, width, area, ratio):
    """Relative area, aspect ratio and corner of n windows against n from torchvision's
    get_params on its own RNG: two-sample KS distances below the critical value at
    alpha = 1e-4 for samples of that size (c(alpha) sqrt(2 / n))."""
    from torchvision.transforms import RandomResizedCrop

    n = 4000
    torch.manual_seed(height * 1000 + width)
    image = torch.zeros(1, height, width)
    theirs = np.array([RandomResizedCrop.get_params(image, list(area), list(ratio)) for _ in range(n)], dtype=float)
    sizes = np.tile([height, width], (n, 1))
    anchors, shapes, _ = CropFlip(area, ratio).params(17, 0, 0, n, np.arange(n), sizes)
    ours = np.concatenate([anchors, shapes], axis=1).astype(float)
    critical = math.sqrt(-math.log(1e-4 / 2) / 2) * math.sqrt(2 / n)

    def ks(a, b):
        grid = np.union1d(a, b)
        return np.abs(np.searchsorted(np.sort(a), grid, side="right") / len(a)
                      - np.searchsorted(np.sort(b), grid, side="right") / len(b)).max()

    def features(p):
        top, left, h, w = p.T
        free_y, free_x = height - h, width - w
        rel_y = np.divide(top, free_y, out=np.full(len(p), 0.5), where=free_y > 0)
        rel_x = np.divide(left, free_x, out=np.full(len(p), 0.5), where=free_x > 0)
        return {"area": h * w / (height * width), "aspect": w / h, "corner y": rel_y, "corner x": rel_x}

    mine, ref = features(ours), features(theirs)
    for name in mine:
        d = ks(mine[name], ref[name])
        assert d < critical, f"{name}: KS distance {d:.4f} >= {critical:.4f}"


# ---------------------------------------------------------------------------------------------
# image headers


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    """One 40×100 (height×width) picture in several formats, EXIF orientations 1, 3, 6, 8."""
    root = tmp_path_factory.mktemp("formats")
    img = Image.fromarray(photo_crops(1, (40, 100), seed=9)[0])
    files = []
    for fmt, ext in (("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("TIFF", "tif")):
        for orientation in (1, 3, 6, 8):
            exif = Image.Exif()
            exif[0x0112] = orientation
            path = root / f"o{orientation}.{ext}"
            img.save(path, format=fmt, exif=exif)
            files.append(str(path))
    for fmt, ext in (("BMP", "bmp"), ("PPM", "ppm"), ("JPEG2000", "jp2")):
        path = root / f"plain.{ext}"
        img.save(path, format=fmt)
        files.append(str(path))
    progressive = root / "progressive.jpg"
    img.save(progressive, format="JPEG", progressive=True)
    files.append(str(progressive))
    return files


def test_header_sizes_equal_dalis(formats):
    """encoded_image_size agrees with DALI's own reading of every file (peek_image_shape,
    which applies the EXIF orientation as the decoders do)."""
    from nvidia.dali import fn, pipeline_def
    from nvidia.dali import types as dtypes

    raws = [np.fromfile(p, dtype=np.uint8) for p in formats]

    @pipeline_def(batch_size=len(raws), num_threads=1, device_id=None)
    def peek():
        encoded = fn.external_source(source=lambda: raws, batch=True, dtype=dtypes.UINT8, ndim=1)
        return fn.peek_image_shape(encoded)

    pipe = peek()
    pipe.build()
    (shapes,) = pipe.run()
    for i, path in enumerate(formats):
        dali = tuple(int(v) for v in np.array(shapes[i])[:2])
        assert encoded_image_size(raws[i]) == dali, path
        assert encoded_image_size(raws[i].tobytes()) == dali
    assert {encoded_image_size(r) for r in raws} == {(40, 100), (100, 40)}


@pytest.mark.parametrize("raw", [b"", b"\xff\xd8\xff", b"\xff\xd8\xff\xe0\x00\x10JFIF", b"\x89PNG\r\n\x1a\n",
                                 b"not an image at all", b"\xff\xd8" + b"\xff\xda\x00\x02" + b"\x00" * 40])
def test_unreadable_headers_give_none(raw):
    assert encoded_image_size(np.frombuffer(raw, dtype=np.uint8)) is None


def test_a_file_without_a_readable_header_is_named(tmp_path, jpeg_set):
    """A JPEG cut inside its header: "raise" names it, "skip" drops it."""
    paths = list(jpeg_set.paths[:8])
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(Path(paths[2]).read_bytes()[:40])
    paths[2] = str(cut)
    desc = DatasetDescription("cut", ["a", "b"], np.arange(8) % 2, paths=paths)
    with pytest.raises(ImageDecodeError, match="cut.jpg.*header") as info:
        record(train_loader(desc, mode="plain"))
    assert info.value.paths == [str(cut)]
    loader = train_loader(desc, mode="plain", on_error="skip")
    ids = [s for b in record(loader) for s in b[2]]
    assert sorted(ids) == [0, 1, 3, 4, 5, 6, 7] and "header" in loader.skipped[2]


# ---------------------------------------------------------------------------------------------
# start_batch validation


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2", None])
def test_set_epoch_rejects_a_bad_start_batch(array_set, bad):
    loader = train_loader(array_set)
    with pytest.raises(ValueError, match="start_batch"):
        loader.set_epoch(0, start_batch=bad)
    with pytest.raises(ValueError, match="epoch"):
        loader.set_epoch(-1)


@settings(max_examples=25)
@given(start=st.integers(-3, 14), epoch=st.integers(0, 3))
def test_start_batch_property(array_set, start, epoch):
    """Any start: negative -> ValueError at set_epoch; past len(plan) -> ValueError naming
    start_batch when the iteration starts, and the loader is left as it was; else
    positions start..len-1, the same batches as a full pass."""
    loader = train_loader(array_set, batch_size=5, mode="plain")
    n = len(loader.make_plan(epoch))  # 8
    if start < 0:
        with pytest.raises(ValueError, match="start_batch"):
            loader.set_epoch(epoch, start_batch=start)
        return
    loader.set_epoch(epoch, start_batch=start)
    if start > n:
        with pytest.raises(ValueError, match=f"start_batch: {start} .*{n} batches"):
            record(loader)
        assert loader.epoch == epoch and loader.start_batch == start
        return
    got = record(loader)
    assert [b[1] for b in got] == list(range(start, n))
    full_loader = train_loader(array_set, batch_size=5, mode="plain")
    full_loader.set_epoch(epoch)
    assert_same_batches(got, record(full_loader)[start:])

