"""The DALI loader on real images: outputs checked against an independent PIL decode,
slots and ids against the plan, bad files, sharding, and a plain torch loop."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import HAVE_FASHION_MNIST, fashion_mnist_samples, make_jpeg_folder, photo_crops, write_jpeg
from PIL import Image

from mixnn_fast.data.description import DatasetDescription
from mixnn_fast.mix.reference import mix_images_reference, mix_targets_reference
from mixnn_fast.pipeline import EvalLoader, ImageDecodeError, MixNNLoader

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


# ---------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def jpeg_set(tmp_path_factory):
    """24 distinct 64×64 JPEGs cut from scikit-learn's photographs, 3 classes."""
    root = tmp_path_factory.mktemp("jpegs")
    image_set = make_jpeg_folder(root, n_per_class=8, size=64, num_classes=3, seed=1)
    desc = DatasetDescription("photos", image_set.classes, image_set.labels, paths=image_set.paths)
    return desc


def photo_jpeg_set(root, name: str, n: int, shape: tuple[int, int], seed: int) -> DatasetDescription:
    """``n`` distinct photo-crop JPEGs of ``shape`` (height, width) in ``root``, 2 classes."""
    images = photo_crops(n, shape, seed=seed)
    paths = [str(write_jpeg(root / f"{i}.jpg", img)) for i, img in enumerate(images)]
    return DatasetDescription(name, ["a", "b"], np.arange(n) % 2, paths=paths)


@pytest.fixture(scope="module")
def wide_jpeg_set(tmp_path_factory):
    """10 JPEGs of 90×120 (height×width): resize and centre crop have work to do."""
    return photo_jpeg_set(tmp_path_factory.mktemp("wide"), "wide", 10, (90, 120), seed=2)


@pytest.fixture(scope="module")
def tall_jpeg_set(tmp_path_factory):
    """7 JPEGs of 131×77 (portrait, odd sides): the other orientation for the central window."""
    return photo_jpeg_set(tmp_path_factory.mktemp("tall"), "tall", 7, (131, 77), seed=5)


@pytest.fixture(scope="module")
def garments():
    if not HAVE_FASHION_MNIST:
        pytest.skip("Fashion-MNIST (Debian dataset-fashion-mnist) is not installed")
    images, labels = fashion_mnist_samples(50, seed=3)
    classes = [str(c) for c in range(10)]
    return DatasetDescription("fmnist", classes, labels, images=images[..., None])


def pil_rgb(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32)


def pil_eval_view(path: str, resize: int, crop: int) -> np.ndarray:
    """torchvision's Resize(shorter side) + CenterCrop, done with PIL."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        w, h = image.size
        scale = resize / min(w, h)
        image = image.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
        w, h = image.size
        left, top = int(round((w - crop) / 2)), int(round((h - crop) / 2))
        return np.asarray(image.crop((left, top, left + crop, top + crop)), dtype=np.float32)


def ring_neighbours(n: int, k: int = 1, shift: int = 5) -> np.ndarray:
    return (np.arange(n)[:, None] + shift * np.arange(1, k + 1)[None]) % n


def collect(loader):
    return [b for b in loader]


# ---------------------------------------------------------------------------------------------
# outputs against PIL


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_eval_loader_matches_pil_resize_and_centre_crop(wide_jpeg_set, backend):
    desc = wide_jpeg_set
    loader = EvalLoader(desc, batch_size=4, crop=64, resize=72, device="cpu", num_threads=1, resize_backend=backend)
    assert loader.resize_backend == backend
    batches = collect(loader)
    assert [len(b) for b in batches] == [4, 4, 2]
    ids = torch.cat([b.ids for b in batches]).numpy()
    np.testing.assert_array_equal(ids, np.arange(10))  # data-set order
    images = torch.cat([b.images for b in batches]).numpy().astype(np.float32)
    assert images.shape == (10, 64, 64, 3)
    refs = np.stack([pil_eval_view(p, 72, 64) for p in desc.paths])
    for i in range(10):
        own = np.abs(images[i] - refs[i]).mean()
        others = min(np.abs(images[i] - refs[j]).mean() for j in range(10) if j != i)
        assert own < 3.0, f"image {i}: mean |DALI - PIL| = {own:.2f} grey levels"
        assert others > 4 * own + 5
    labels = torch.cat([b.labels for b in batches]).numpy()
    np.testing.assert_array_equal(labels, desc.labels)


def test_train_images_are_the_planned_ids_decoded_and_flipped(jpeg_set):
    """Full-image crops (area 1, aspect 1 on square images) leave only the flip random, so
    every decoded image must equal PIL's decode of the id the plan put in its slot."""
    desc = jpeg_set
    n = len(desc)
    nbrs = ring_neighbours(n, k=1, shift=3)
    loader = MixNNLoader(desc, batch_size=5, neighbours=nbrs, size=64, area=(1.0, 1.0), aspect_ratio=(1.0, 1.0),
                         device="cpu", num_threads=2, seed=4)
    refs = np.stack([pil_rgb(p) for p in desc.paths])
    flips = []
    anchors_seen = []
    for batch in loader:
        images = batch.images.numpy().astype(np.float32)
        assert batch.images.dtype == torch.uint8 and images.shape[1:] == (64, 64, 3)
        assert len(images) == len(batch.ids)
        for img, sample in zip(images, batch.ids.tolist()):
            straight = np.abs(img - refs[sample]).mean()
            flipped = np.abs(img - refs[sample][:, ::-1]).mean()
            assert min(straight, flipped) < 2.0, f"sample {sample} does not match its file"
            nearest_other = min(np.abs(img - refs[j]).mean() for j in range(n) if j != sample)
            assert nearest_other > 5 * min(straight, flipped)
            flips.append(flipped < straight)
        np.testing.assert_array_equal(batch.partner_ids.numpy(), nbrs[batch.anchor_ids.numpy()])
        np.testing.assert_array_equal(batch.labels.numpy(), desc.labels[batch.anchor_ids.numpy()])
        anchors_seen += batch.anchor_ids.tolist()
    assert sorted(anchors_seen) == list(range(n))
    assert 0 < sum(flips) < len(flips), "flips should be random"
    assert loader.plan.stats.extra_decode_fraction < 1.0


def test_random_resized_crop_output_and_independent_augmentation(jpeg_set):
    """Default random-resized crops: right size, and an image decoded twice in one naive
    batch (as anchor and as someone's partner) gets two different augmentations."""
    desc = jpeg_set
    nbrs = ring_neighbours(len(desc), k=1, shift=1)
    loader = MixNNLoader(desc, batch_size=len(desc), neighbours=nbrs, mode="naive", size=32, device="cpu",
                         num_threads=2, seed=5)
    (batch,) = collect(loader)
    assert batch.images.shape == (2 * len(desc), 32, 32, 3)
    ids = batch.ids.numpy()
    images = batch.images.numpy().astype(np.float32)
    different = 0
    for sample in range(len(desc)):
        a, b = np.flatnonzero(ids == sample)
        different += np.abs(images[a] - images[b]).mean() > 1.0
    assert different >= len(desc) - 2


def test_host_resize_equals_dali_resize_within_rounding(wide_jpeg_set):
    """resize_backend="torch" (DALI decodes the windows, torch resizes them) and "dali"
    (fn.resize) draw the same windows and flips from one seed and compute the same
    antialiased bilinear resize: every image agrees within rounding."""
    desc = wide_jpeg_set
    nbrs = ring_neighbours(len(desc), k=1, shift=3)
    images = {}
    for backend in ("dali", "torch"):
        loader = MixNNLoader(desc, batch_size=4, neighbours=nbrs, size=48, device="cpu", seed=7,
                             resize_backend=backend)
        assert loader.resize_backend == backend
        images[backend] = torch.cat([b.images.clone() for b in loader]).float()
    assert images["torch"].shape == images["dali"].shape and images["torch"].shape[1:] == (48, 48, 3)
    per_image = (images["torch"] - images["dali"]).abs().mean(dim=(1, 2, 3))
    assert per_image.max() < 0.5, f"mean |torch - DALI| per image up to {per_image.max():.2f} grey levels"
    assert MixNNLoader(desc, 4, neighbours=nbrs, device="cpu").resize_backend == "torch"  # the CPU default


@pytest.mark.parametrize("crop,resize", [(64, 72), (48, 48), (33, 70)])
def test_eval_host_resize_equals_the_dali_view_within_alignment(wide_jpeg_set, tall_jpeg_set, crop, resize):
    """EvalLoader(resize_backend="torch"): DALI decodes the central window, torch resizes it;
    the views agree with DALI's resize-then-crop to within half a source pixel of alignment
    per edge. These small photo crops are sharp (a one-pixel shift changes them by 6-10 grey
    levels on average), so the bound below catches a misplaced window; images never swap."""
    for desc in (wide_jpeg_set, tall_jpeg_set):
        views = {}
        for backend in ("dali", "torch"):
            loader = EvalLoader(desc, batch_size=4, crop=crop, resize=resize, device="cpu", resize_backend=backend)
            views[backend] = torch.cat([b.images.clone() for b in loader]).float()
        assert views["torch"].shape == views["dali"].shape == (len(desc), crop, crop, 3)
        diff = (views["torch"] - views["dali"]).abs().mean(dim=(1, 2, 3))
        assert diff.max() < 4.0, f"mean |torch - DALI| per image up to {diff.max():.2f} grey levels"
        others = (views["torch"][:, None] - views["dali"][None]).abs().mean(dim=(2, 3, 4))
        others.fill_diagonal_(float("inf"))
        assert (others.min(dim=1).values > 2 * diff + 3).all()


def test_eval_host_resize_backend_choice_and_errors(wide_jpeg_set, garments):
    assert EvalLoader(wide_jpeg_set, 4, device="cpu").resize_backend == "torch"  # the CPU default
    assert EvalLoader(wide_jpeg_set, 4, crop=80, resize=72, device="cpu").resize_backend == "dali"  # window > image
    with pytest.raises(ValueError, match="crop <= resize"):
        EvalLoader(wide_jpeg_set, 4, crop=80, resize=72, device="cpu", resize_backend="torch")
    with pytest.raises(ValueError, match="resize_backend"):
        EvalLoader(wide_jpeg_set, 4, device="cpu", resize_backend="pil")
    # in-memory sets are never resized: the backend does not change their views
    a = torch.cat([b.images for b in EvalLoader(garments, 8, crop=20, device="cpu", resize_backend="torch")])
    b = torch.cat([b.images for b in EvalLoader(garments, 8, crop=20, device="cpu", resize_backend="dali")])
    assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_host_resize_normalises_and_transposes_like_the_pipeline(wide_jpeg_set, layout):
    """normalize_in_pipeline / layout with the host resize: the uint8 views, normalised
    and transposed exactly; views (copy=False) hold the same pixels as copies."""
    desc = wide_jpeg_set
    kwargs = dict(mode="plain", size=40, device="cpu", seed=8)
    raw = torch.cat([b.images.clone() for b in MixNNLoader(desc, 4, **kwargs)]).float()
    mean, std = torch.tensor(MEAN), torch.tensor(STD)
    expected = (raw - mean) / std
    if layout == "NCHW":
        expected = expected.permute(0, 3, 1, 2)
    for copy in (True, False):
        loader = MixNNLoader(desc, 4, mean=MEAN, std=STD, normalize_in_pipeline=True, layout=layout, copy=copy,
                             **kwargs)
        batches = [b.images.clone() for b in loader]
        normed = torch.cat(batches)
        assert normed.dtype == torch.float32
        torch.testing.assert_close(normed, expected, atol=1e-5, rtol=1e-5)
    u8 = torch.cat([b.images.clone() for b in MixNNLoader(desc, 4, layout=layout, **kwargs)])
    assert u8.dtype == torch.uint8
    torch.testing.assert_close(u8.float(), raw if layout == "NHWC" else raw.permute(0, 3, 1, 2), atol=0, rtol=0)


def test_in_memory_pad_and_crop_is_a_shift_of_the_original(garments):
    desc = garments
    n = len(desc)
    loader = MixNNLoader(desc, batch_size=16, neighbours=ring_neighbours(n, k=2), pad=4, device="cpu",
                         num_threads=1, seed=6)
    shifts = set()
    seen = []
    for batch in loader:
        assert batch.images.shape[1:] == (28, 28, 1) and batch.images.dtype == torch.uint8
        for img, sample in zip(batch.images.numpy(), batch.ids.tolist()):
            padded = np.pad(desc.images[sample], ((4, 4), (4, 4), (0, 0)))
            match = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)
                     if np.array_equal(img, (padded[dy:dy + 28, dx:dx + 28][:, ::-1] if flip
                                             else padded[dy:dy + 28, dx:dx + 28]))]
            assert match, f"sample {sample}: not a shifted (and flipped) copy of the original"
            shifts.add(match[0][:2])
        seen += batch.anchor_ids.tolist()
    assert sorted(seen) == list(range(n))
    assert len(shifts) > 10, "shifts should vary"


def test_in_memory_eval_is_exact(garments):
    loader = EvalLoader(garments, batch_size=7, device="cpu", num_threads=1)
    images = torch.cat([b.images for b in loader]).numpy()
    np.testing.assert_array_equal(images, garments.images)
    cropped = torch.cat([b.images for b in EvalLoader(garments, 7, crop=20, device="cpu")]).numpy()
    np.testing.assert_array_equal(cropped, garments.images[:, 4:24, 4:24])


@pytest.mark.parametrize("ids", [None, "subset"])
def test_in_memory_eval_host_path_equals_the_dali_path(garments, ids, rng):
    """In-memory eval batches are slices of the array (no DALI); they must be exactly what the
    DALI pipeline gives: the same images, ids, labels and normalisation, batch by batch."""
    from mixnn_fast.pipeline.loader import _DaliLoader

    if ids == "subset":
        ids = np.sort(rng.choice(len(garments), len(garments) // 2 + 1, replace=False))
    loader = EvalLoader(garments, batch_size=6, ids=ids, mean=[120.0], std=[60.0], device="cpu", num_threads=1)
    assert loader._host_path()
    host = list(loader)
    dali = list(_DaliLoader.__iter__(loader))
    assert len(host) == len(dali) == len(loader)
    for h, d in zip(host, dali):
        assert torch.equal(h.images, d.images) and torch.equal(h.ids, d.ids) and torch.equal(h.labels, d.labels)
        torch.testing.assert_close(h.mix(torch.ones(len(h), 1))[0], d.mix(torch.ones(len(d), 1))[0], rtol=0, atol=0)
    expected = np.arange(len(garments)) if ids is None else ids
    np.testing.assert_array_equal(torch.cat([b.anchor_ids for b in host]).numpy(), expected)


def test_normalising_in_the_pipeline_equals_normalising_after(wide_jpeg_set):
    plain = torch.cat([b.images for b in EvalLoader(wide_jpeg_set, 5, crop=48, device="cpu")]).float()
    normed = torch.cat([b.images for b in EvalLoader(wide_jpeg_set, 5, crop=48, mean=MEAN, std=STD,
                                                     normalize_in_pipeline=True, device="cpu")])
    assert normed.dtype == torch.float32
    expected = (plain - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(normed, expected, atol=1e-4, rtol=1e-4)


def test_file_reader_pipeline_shares_the_eval_processing(wide_jpeg_set):
    """DALI's named file reader + DALIGenericIterator gives the same views as our external source."""
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    from mixnn_fast.pipeline.dali_pipelines import READER_NAME, file_reader_eval_pipeline

    desc = wide_jpeg_set
    pipe = file_reader_eval_pipeline(desc.paths, desc.labels.tolist(), resize=72, crop=64, batch_size=4,
                                     num_threads=1, device_id=None)
    it = DALIGenericIterator(pipe, ["images", "labels"], reader_name=READER_NAME,
                             last_batch_policy=LastBatchPolicy.PARTIAL)
    images, labels = [], []
    for (out,) in it:
        images.append(out["images"])
        labels.append(out["labels"].reshape(-1))
    ours = torch.cat([b.images for b in EvalLoader(desc, 4, crop=64, resize=72, device="cpu", resize_backend="dali")])
    torch.testing.assert_close(torch.cat(images), ours, atol=0, rtol=0)
    np.testing.assert_array_equal(torch.cat(labels).numpy(), desc.labels)


# ---------------------------------------------------------------------------------------------
# mixing


def test_mix_uses_slots_and_global_targets(garments):
    desc = garments
    n = len(desc)
    nbrs = ring_neighbours(n, k=2, shift=7)
    loader = MixNNLoader(desc, batch_size=9, neighbours=nbrs, device="cpu", num_threads=1, seed=8,
                         mean=[72.9], std=[90.0])
    rng = np.random.default_rng(0)
    table = rng.dirichlet(np.ones(3), size=n).astype(np.float32)  # (N, K+1) per-sample weights
    targets = torch.from_numpy(rng.dirichlet(np.ones(10), size=n).astype(np.float32))
    for batch in loader:
        weights = torch.from_numpy(table[batch.anchor_ids.numpy()])
        x, y = batch.mix(weights, targets)
        assert x.shape == (len(batch), 1, 28, 28) and x.dtype == torch.float32
        ref = mix_images_reference(batch.images, batch.anchor_slots, batch.partner_slots, weights,
                                   mean=[72.9], std=[90.0])
        torch.testing.assert_close(x, ref, atol=1e-4, rtol=1e-5)
        # by hand for the first anchor: λ·norm(anchor) + Σ β_k·norm(partner_k)
        imgs = (batch.images.double() - 72.9) / 90.0
        a, p = batch.anchor_slots[0], batch.partner_slots[0]
        w = weights[0].double()
        manual = w[0] * imgs[a] + w[1] * imgs[p[0]] + w[2] * imgs[p[1]]
        torch.testing.assert_close(x[0].double(), manual.permute(2, 0, 1), atol=1e-4, rtol=1e-5)
        y_ref = mix_targets_reference(targets, batch.anchor_ids, batch.partner_ids, weights)
        torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-6)
        aid, pid = batch.anchor_ids[0], batch.partner_ids[0]
        torch.testing.assert_close(y[0], w[0].float() * targets[aid] + w[1].float() * targets[pid[0]]
                                   + w[2].float() * targets[pid[1]], atol=1e-6, rtol=1e-6)


def test_plugs_into_a_plain_torch_loop(garments):
    """Two epochs of MixNN steps with a tiny model: batches, mixing, backward, optimiser."""
    torch.manual_seed(0)
    desc = garments
    n = len(desc)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    targets = torch.nn.functional.one_hot(torch.from_numpy(desc.labels), 10).float()
    weights = torch.full((n, 2), 0.5)
    loader = MixNNLoader(desc, batch_size=16, neighbours=ring_neighbours(n), device="cpu", num_threads=1,
                         mean=[72.9], std=[90.0], drop_last=True)
    steps = 0
    for epoch in range(2):
        loader.set_epoch(epoch)
        for batch in loader:
            x, y = batch.mix(weights[batch.anchor_ids], targets)
            loss = -(y * torch.log_softmax(model(x), dim=1)).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            assert torch.isfinite(loss)
            steps += 1
    assert steps == 2 * (n // 16)


# ---------------------------------------------------------------------------------------------
# epochs, shards, restarts


def test_epochs_differ_and_restart_after_break(jpeg_set):
    desc = jpeg_set
    loader = MixNNLoader(desc, batch_size=4, neighbours=ring_neighbours(len(desc)), size=32, device="cpu",
                         num_threads=1)

    def run_epoch():
        batches = [(b.anchor_ids.tolist(), b.images.clone()) for b in loader]
        return [a for a, _ in batches], [x for _, x in batches]

    first, first_images = run_epoch()  # epoch 0
    for batch in loader:  # epoch 1, abandoned after one batch
        break
    loader.set_epoch(0)
    again, again_images = run_epoch()  # epoch 0 replayed on a fresh pipeline
    assert again == first
    # the augmentations too: drawn per (seed, epoch, batch, slot), not by the pipeline's RNG
    assert all(torch.equal(x, y) for x, y in zip(again_images, first_images, strict=True))
    second, _ = run_epoch()  # epoch 1, complete
    assert sorted(sum(second, [])) == list(range(len(desc)))
    assert second != first


def test_shards_split_the_epoch(jpeg_set):
    desc = jpeg_set
    nbrs = ring_neighbours(len(desc))
    per_shard = []
    for shard in range(3):
        loader = MixNNLoader(desc, batch_size=3, neighbours=nbrs, size=32, device="cpu", num_threads=1,
                             shard_id=shard, num_shards=3, seed=9)
        per_shard.append([b.anchor_ids.tolist() for b in loader])
    assert len({len(s) for s in per_shard}) == 1, "every process steps equally often"
    flat = [a for shard in per_shard for batch in shard for a in batch]
    # 8 batches of 3 over 3 shards: 9 slots, the last one repeats a batch (padding)
    assert sorted(set(flat)) == list(range(len(desc))) and len(flat) == 27


def test_anchor_subset_with_partners_outside_it(jpeg_set):
    desc = jpeg_set
    nbrs = ring_neighbours(len(desc), shift=11)
    subset = np.arange(0, len(desc), 2)
    loader = MixNNLoader(desc, batch_size=4, neighbours=nbrs, anchor_ids=lambda epoch: subset, size=32,
                         device="cpu", num_threads=1)
    anchors = []
    for batch in loader:
        np.testing.assert_array_equal(batch.partner_ids.numpy(), nbrs[batch.anchor_ids.numpy()])
        anchors += batch.anchor_ids.tolist()
    assert sorted(anchors) == subset.tolist()


# ---------------------------------------------------------------------------------------------
# bad files


@pytest.fixture
def damaged_set(tmp_path):
    """12 good JPEGs plus: a missing file (id 3), a text file (id 5), a truncated JPEG (id 8)."""
    images = photo_crops(12, 48, seed=7)
    paths = [str(write_jpeg(tmp_path / f"{i:02d}.jpg", img)) for i, img in enumerate(images)]
    Path(paths[3]).unlink()
    Path(paths[5]).write_text("this is not an image\n")
    raw = Path(paths[8]).read_bytes()
    Path(paths[8]).write_bytes(raw[: len(raw) // 3])
    return DatasetDescription("damaged", ["a", "b"], np.arange(12) % 2, paths=paths)


@pytest.mark.parametrize("bad, error, hint", [(3, FileNotFoundError, "cannot read"),
                                              (5, ImageDecodeError, "not a recognised image format"),
                                              (8, ImageDecodeError, "truncated")])
def test_bad_file_raises_naming_it(damaged_set, bad, error, hint):
    keep = [i for i in range(12) if i not in {3, 5, 8} - {bad}]
    desc = damaged_set.subset(keep)
    loader = EvalLoader(desc, batch_size=3, crop=32, device="cpu", num_threads=1)
    name = Path(damaged_set.paths[bad]).name
    with pytest.raises(error, match=f"(?i){name}.*{hint}|{hint}.*{name}") as info:
        collect(loader)
    if isinstance(info.value, ImageDecodeError):
        assert info.value.paths and info.value.paths[0].endswith(name)


def test_batches_before_a_bad_file_are_delivered(damaged_set):
    desc = damaged_set.subset([0, 1, 2, 4, 6, 7, 3, 9])  # the missing file sits in the third batch
    loader = EvalLoader(desc, batch_size=3, crop=32, device="cpu", num_threads=1)
    delivered = []
    with pytest.raises(FileNotFoundError, match="03.jpg"):
        for batch in loader:
            delivered += batch.ids.tolist()
    assert delivered == [0, 1, 2, 3, 4, 5]


def test_skip_drops_and_counts_bad_samples(damaged_set):
    desc = damaged_set
    n = len(desc)
    nbrs = ring_neighbours(n, shift=1)  # i mixes with i+1: anchors 2, 4, 7 lose their partner
    loader = MixNNLoader(desc, batch_size=4, neighbours=nbrs, size=32, device="cpu", num_threads=1,
                         on_error="skip", seed=2)
    batches = list(loader)
    anchors = [a for b in batches for a in b.anchor_ids.tolist()]
    assert set(loader.skipped) == {3, 5, 8}
    assert "03.jpg" in loader.skipped[3] and "05.jpg" in loader.skipped[5] and "08.jpg" in loader.skipped[8]
    expected = sorted(set(range(n)) - {3, 5, 8})  # only the unreadable images are lost
    assert sorted(anchors) == expected
    assert loader.skipped_anchors == 3
    # anchors whose partner is unreadable are mixed with themselves in its place (x~ = x, y~ = t)
    partner_of = {a: p for b in batches for a, p in zip(b.anchor_ids.tolist(), b.partner_ids[:, 0].tolist())}
    assert all(partner_of[a] == a for a in (2, 4, 7))
    assert all(partner_of[a] == (a + 1) % n for a in expected if a not in (2, 4, 7))
    # the next epoch knows the bad files already: same anchors, nothing counted twice
    anchors = [a for b in loader for a in b.anchor_ids.tolist()]
    assert sorted(anchors) == expected and loader.skipped_anchors == 6
    assert set(loader.skipped) == {3, 5, 8}


def test_eval_skip_returns_every_good_sample(damaged_set):
    loader = EvalLoader(damaged_set, batch_size=5, crop=32, device="cpu", num_threads=1, on_error="skip")
    ids = [i for b in loader for i in b.ids.tolist()]
    assert ids == [i for i in range(12) if i not in (3, 5, 8)]


# ---------------------------------------------------------------------------------------------
# validation


def test_bad_arguments_name_themselves(jpeg_set):
    nbrs = ring_neighbours(len(jpeg_set))
    with pytest.raises(ValueError, match="batch_size"):
        MixNNLoader(jpeg_set, 0, neighbours=nbrs, device="cpu")
    with pytest.raises(ValueError, match="batch_size"):
        EvalLoader(jpeg_set, -2, device="cpu")
    with pytest.raises(ValueError, match="on_error"):
        MixNNLoader(jpeg_set, 4, neighbours=nbrs, on_error="ignore", device="cpu")
    with pytest.raises(ValueError, match="neighbours"):
        MixNNLoader(jpeg_set, 4, neighbours=nbrs[:5], device="cpu")
    with pytest.raises(ValueError, match="device"):
        MixNNLoader(jpeg_set, 4, neighbours=nbrs, device="tpu")
    with pytest.raises(ValueError, match="mode"):
        MixNNLoader(jpeg_set, 4, neighbours=nbrs, mode="random", device="cpu")
    with pytest.raises(ValueError, match="shard_id"):
        MixNNLoader(jpeg_set, 4, neighbours=nbrs, shard_id=2, num_shards=2, device="cpu")
    with pytest.raises(ValueError, match="mean"):
        MixNNLoader(jpeg_set, 4, neighbours=nbrs, mean=[1.0, 2.0], device="cpu")
    with pytest.raises(ValueError, match="resize_backend"):
        MixNNLoader(jpeg_set, 4, neighbours=nbrs, resize_backend="pil", device="cpu")
    with pytest.raises(ValueError, match="area"):
        MixNNLoader(jpeg_set, 4, neighbours=nbrs, area=(0.5, 1.5), device="cpu")
    with pytest.raises(ValueError, match="partners.*None"):
        collect(MixNNLoader(jpeg_set, 4, neighbours=None, mode="coherent", device="cpu"))
    bad = nbrs.copy()
    bad[3, 0] = 99
    with pytest.raises(ValueError, match=r"partners\[3, 0\] = 99"):
        collect(MixNNLoader(jpeg_set, 4, neighbours=bad, device="cpu"))


# ---------------------------------------------------------------------------------------------
# GPU (skipped without a CUDA device)


@pytest.mark.cuda
def test_gpu_eval_matches_cpu(wide_jpeg_set):
    cpu = torch.cat([b.images for b in EvalLoader(wide_jpeg_set, 4, crop=64, resize=72, device="cpu",
                                                  resize_backend="dali")])
    gpu = torch.cat([b.images for b in EvalLoader(wide_jpeg_set, 4, crop=64, resize=72, device="gpu")])
    assert gpu.is_cuda
    assert (gpu.cpu().float() - cpu.float()).abs().mean() < 3.0  # nvJPEG vs libjpeg-turbo


@pytest.mark.cuda
def test_gpu_training_batches_mix_on_the_gpu(garments):
    loader = MixNNLoader(garments, 8, neighbours=ring_neighbours(len(garments)), device="gpu", mean=[72.9],
                         std=[90.0])
    for batch in loader:
        assert batch.images.is_cuda
        x, _ = batch.mix(torch.full((len(batch), 2), 0.5))
        assert x.is_cuda and x.shape == (len(batch), 1, 28, 28)


def test_nchw_layout_is_a_permutation_and_mixes_alike(garments):
    nhwc = torch.cat([b.images for b in EvalLoader(garments, 8, device="cpu")])
    nchw = torch.cat([b.images for b in EvalLoader(garments, 8, layout="NCHW", device="cpu")])
    torch.testing.assert_close(nchw, nhwc.permute(0, 3, 1, 2).contiguous(), atol=0, rtol=0)
    (batch,) = [b for b in EvalLoader(garments, 50, layout="NCHW", device="cpu", mean=[72.9], std=[90.0])]
    x, _ = batch.mix(torch.ones(50, 1))
    torch.testing.assert_close(x, (nhwc.permute(0, 3, 1, 2).float() - 72.9) / 90.0, atol=1e-5, rtol=1e-5)


def test_views_hold_the_same_pixels_as_copies(wide_jpeg_set):
    """copy=False hands out DALI's buffers; consumed before the next batch they equal the copies."""
    copied = [b.images.clone() for b in EvalLoader(wide_jpeg_set, 4, crop=48, device="cpu")]
    viewed = [b.images.clone() for b in EvalLoader(wide_jpeg_set, 4, crop=48, device="cpu", copy=False)]
    assert len(copied) == len(viewed) == 3
    for x, y in zip(copied, viewed):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["train", "eval"])
def test_kept_batches_are_never_recycled(jpeg_set, kind):
    """copy=True recycles a batch's buffer only once nothing refers to it: batches kept in
    a list (or through a view, or a NumPy array) keep their pixels; batches dropped are recycled."""
    def loader():
        if kind == "train":  # host resize, then the loader's own buffers
            return MixNNLoader(jpeg_set, 4, mode="plain", size=32, device="cpu", seed=9)
        return EvalLoader(jpeg_set, 4, crop=48, device="cpu")  # DALI's output copied out

    reference = [b.images.clone() for b in loader()]
    kept = [b.images for b in loader()]
    views = [b.images[1:] for b in loader()]
    arrays = [b.images.numpy() for b in loader()]
    for ref, whole, view, array in zip(reference, kept, views, arrays, strict=True):
        torch.testing.assert_close(whole, ref, atol=0, rtol=0)
        torch.testing.assert_close(view, ref[1:], atol=0, rtol=0)
        np.testing.assert_array_equal(array, ref.numpy())
    pointers = [b.images.data_ptr() for b in loader()]
    assert len(set(pointers)) < len(pointers), "buffers of dropped batches should be recycled"


def test_mix_outputs_are_recycled_only_when_free(jpeg_set):
    """LoaderBatch.mix without ``out`` returns a fresh-looking output: kept ones keep their
    values, dropped ones are reused."""
    nbrs = ring_neighbours(len(jpeg_set))

    def mixed():
        loader = MixNNLoader(jpeg_set, 4, neighbours=nbrs, size=32, device="cpu", seed=10, mean=MEAN, std=STD)
        for b in loader:
            yield b.mix(torch.full((len(b), 2), 0.5))[0]

    reference = [x.clone() for x in mixed()]
    kept = list(mixed())
    assert all(x.shape == (len(r), 3, 32, 32) for x, r in zip(kept, reference))
    for x, ref in zip(kept, reference, strict=True):
        torch.testing.assert_close(x, ref, atol=0, rtol=0)
    pointers = [x.data_ptr() for x in mixed()]
    assert len(set(pointers)) < len(pointers)


def test_len_matches_the_epoch(jpeg_set):
    loader = MixNNLoader(jpeg_set, 5, neighbours=ring_neighbours(len(jpeg_set)), size=32, device="cpu",
                         drop_last=True)
    expected = len(loader)
    assert expected == len(jpeg_set) // 5
    assert len(collect(loader)) == expected


def test_with_the_data_sources(tmp_path):
    """image_folder's description and a per-epoch class-balanced draw (Clothing1M style)
    as the anchors: partners outside the draw are decoded, labels follow the folders."""
    from mixnn_fast.data import balanced_subset, image_folder

    make_jpeg_folder(tmp_path, n_per_class=6, size=40, num_classes=3, seed=3)
    desc = image_folder(tmp_path)
    nbrs = ring_neighbours(len(desc), shift=4)
    draws = {}

    def anchors(epoch):
        draws[epoch] = balanced_subset(desc, num_batches=2, batch_size=4, seed=epoch)
        return draws[epoch]

    loader = MixNNLoader(desc, 4, neighbours=nbrs, anchor_ids=anchors, size=32, device="cpu", num_threads=1)
    for epoch in range(2):
        seen = []
        for batch in loader:
            np.testing.assert_array_equal(batch.labels.numpy(), desc.labels[batch.anchor_ids.numpy()])
            np.testing.assert_array_equal(batch.partner_ids.numpy(), nbrs[batch.anchor_ids.numpy()])
            seen += batch.anchor_ids.tolist()
        assert sorted(seen) == sorted(draws[epoch].tolist())
