"""The DALI loaders on real images: outputs checked against an independent PIL decode,
slots, ids and weights against the plan and its PartnerTable, bad files, sharding, the
trusted mixer path against the validated one, the buffer pool and batch release, the
options, and a plain torch loop."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import HAVE_FASHION_MNIST, fashion_mnist_samples, make_jpeg_folder, photo_crops, write_jpeg
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mixnn_fast.data.description import DatasetDescription
from mixnn_fast.mix.reference import mix_images_reference, mix_targets_reference
from mixnn_fast.pipeline import BufferPool, EvalLoader, ImageDecodeError, LoaderBatch, LoaderOptions, MixNNLoader
from mixnn_fast.refresh.partners import PartnerTable, mixup_table

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


def table_of(nbrs: np.ndarray, weights=None) -> PartnerTable:
    """Every sample an anchor with the partners ``nbrs`` (N, K); equal weights by default."""
    n, k = nbrs.shape
    if weights is None:
        weights = np.full((n, k + 1), 1.0 / (k + 1), dtype=np.float32)
    return PartnerTable.build(np.arange(n), nbrs, weights, n)


def ring_table(n: int, k: int = 1, shift: int = 5, weights=None) -> PartnerTable:
    return table_of(ring_neighbours(n, k, shift), weights)


def cpu(**kwargs) -> LoaderOptions:
    return LoaderOptions(device="cpu", **kwargs)


def collect(loader):
    return [b for b in loader]


# ---------------------------------------------------------------------------------------------
# outputs against PIL


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_eval_loader_matches_pil_resize_and_centre_crop(wide_jpeg_set, backend):
    desc = wide_jpeg_set
    loader = EvalLoader(desc, 4, cpu(num_threads=1, resize_backend=backend), crop=64, resize=72)
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
    lam = np.random.default_rng(4).uniform(0.5, 1.0, n).astype(np.float32)
    weights = np.stack([lam, 1 - lam], axis=1)
    loader = MixNNLoader(desc, 5, cpu(size=64, area=(1.0, 1.0), aspect_ratio=(1.0, 1.0), num_threads=2, seed=4),
                         partners=table_of(nbrs, weights))
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
        # each anchor's weights row travels with it from the table
        assert batch.weights.dtype == torch.float32
        np.testing.assert_array_equal(batch.weights.numpy(), weights[batch.anchor_ids.numpy()])
        anchors_seen += batch.anchor_ids.tolist()
    assert sorted(anchors_seen) == list(range(n))
    assert 0 < sum(flips) < len(flips), "flips should be random"
    assert loader.plan.stats.extra_decode_fraction < 1.0


def test_random_resized_crop_output_and_independent_augmentation(jpeg_set):
    """Default random-resized crops: right size, and an image decoded twice in one naive
    batch (as anchor and as someone's partner) gets two different augmentations."""
    desc = jpeg_set
    loader = MixNNLoader(desc, len(desc), cpu(size=32, num_threads=2, seed=5), mode="naive",
                         partners=ring_table(len(desc), k=1, shift=1))
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
    table = ring_table(len(desc), k=1, shift=3)
    images = {}
    for backend in ("dali", "torch"):
        loader = MixNNLoader(desc, 4, cpu(size=48, seed=7, resize_backend=backend), partners=table)
        assert loader.resize_backend == backend
        images[backend] = torch.cat([b.images.clone() for b in loader]).float()
    assert images["torch"].shape == images["dali"].shape and images["torch"].shape[1:] == (48, 48, 3)
    per_image = (images["torch"] - images["dali"]).abs().mean(dim=(1, 2, 3))
    assert per_image.max() < 0.5, f"mean |torch - DALI| per image up to {per_image.max():.2f} grey levels"
    assert MixNNLoader(desc, 4, cpu(), partners=table).resize_backend == "torch"  # the CPU default


@pytest.mark.parametrize("crop,resize", [(64, 72), (48, 48), (33, 70)])
def test_eval_host_resize_equals_the_dali_view_within_alignment(wide_jpeg_set, tall_jpeg_set, crop, resize):
    """EvalLoader(resize_backend="torch"): DALI decodes the central window, torch resizes it;
    the views agree with DALI's resize-then-crop to within half a source pixel of alignment
    per edge. These small photo crops are sharp (a one-pixel shift changes them by 6-10 grey
    levels on average), so the bound below catches a misplaced window; images never swap."""
    for desc in (wide_jpeg_set, tall_jpeg_set):
        views = {}
        for backend in ("dali", "torch"):
            loader = EvalLoader(desc, 4, cpu(resize_backend=backend), crop=crop, resize=resize)
            views[backend] = torch.cat([b.images.clone() for b in loader]).float()
        assert views["torch"].shape == views["dali"].shape == (len(desc), crop, crop, 3)
        diff = (views["torch"] - views["dali"]).abs().mean(dim=(1, 2, 3))
        assert diff.max() < 4.0, f"mean |torch - DALI| per image up to {diff.max():.2f} grey levels"
        others = (views["torch"][:, None] - views["dali"][None]).abs().mean(dim=(2, 3, 4))
        others.fill_diagonal_(float("inf"))
        assert (others.min(dim=1).values > 2 * diff + 3).all()


def test_eval_host_resize_backend_choice_and_errors(wide_jpeg_set, garments):
    assert EvalLoader(wide_jpeg_set, 4, cpu()).resize_backend == "torch"  # the CPU default
    assert EvalLoader(wide_jpeg_set, 4, cpu(), crop=80, resize=72).resize_backend == "dali"  # window > image
    with pytest.raises(ValueError, match="crop <= resize"):
        EvalLoader(wide_jpeg_set, 4, cpu(resize_backend="torch"), crop=80, resize=72)
    with pytest.raises(ValueError, match="resize_backend"):
        EvalLoader(wide_jpeg_set, 4, cpu(resize_backend="pil"))
    # in-memory sets are never resized: the backend does not change their views
    a = torch.cat([b.images for b in EvalLoader(garments, 8, cpu(resize_backend="torch"), crop=20)])
    b = torch.cat([b.images for b in EvalLoader(garments, 8, cpu(resize_backend="dali"), crop=20)])
    assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_host_resize_normalises_and_transposes_like_the_pipeline(wide_jpeg_set, layout):
    """normalize_in_pipeline / layout with the host resize: the uint8 views, normalised
    and transposed exactly; views (copy=False) hold the same pixels as copies."""
    desc = wide_jpeg_set
    base = cpu(size=40, seed=8)
    raw = torch.cat([b.images.clone() for b in MixNNLoader(desc, 4, base, mode="plain")]).float()
    mean, std = torch.tensor(MEAN), torch.tensor(STD)
    expected = (raw - mean) / std
    if layout == "NCHW":
        expected = expected.permute(0, 3, 1, 2)
    for copy in (True, False):
        loader = MixNNLoader(desc, 4, base.replace(mean=MEAN, std=STD, normalize_in_pipeline=True, layout=layout,
                                                   copy=copy), mode="plain")
        batches = [b.images.clone() for b in loader]
        normed = torch.cat(batches)
        assert normed.dtype == torch.float32
        torch.testing.assert_close(normed, expected, atol=1e-5, rtol=1e-5)
    u8 = torch.cat([b.images.clone() for b in MixNNLoader(desc, 4, base.replace(layout=layout), mode="plain")])
    assert u8.dtype == torch.uint8
    torch.testing.assert_close(u8.float(), raw if layout == "NHWC" else raw.permute(0, 3, 1, 2), atol=0, rtol=0)


def test_in_memory_pad_and_crop_is_a_shift_of_the_original(garments):
    desc = garments
    n = len(desc)
    loader = MixNNLoader(desc, 16, cpu(pad=4, num_threads=1, seed=6), partners=ring_table(n, k=2))
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
    loader = EvalLoader(garments, 7, cpu(num_threads=1))
    images = torch.cat([b.images for b in loader]).numpy()
    np.testing.assert_array_equal(images, garments.images)
    cropped = torch.cat([b.images for b in EvalLoader(garments, 7, cpu(), crop=20)]).numpy()
    np.testing.assert_array_equal(cropped, garments.images[:, 4:24, 4:24])


@pytest.mark.parametrize("ids", [None, "subset"])
def test_in_memory_eval_host_path_equals_the_dali_path(garments, ids, rng):
    """In-memory eval batches are slices of the array (no DALI); they must be exactly what the
    DALI pipeline gives: the same images, ids, labels and normalisation, batch by batch."""
    if ids == "subset":
        ids = np.sort(rng.choice(len(garments), len(garments) // 2 + 1, replace=False))
    options = cpu(mean=[120.0], std=[60.0], num_threads=1)
    loader = EvalLoader(garments, 6, options, ids=ids)
    assert loader.backend == "host"  # "auto" on the CPU
    host = list(loader)
    dali = list(EvalLoader(garments, 6, options.replace(backend="dali"), ids=ids))
    assert len(host) == len(dali) == len(loader)
    for h, d in zip(host, dali):
        assert torch.equal(h.images, d.images) and torch.equal(h.ids, d.ids) and torch.equal(h.labels, d.labels)
        assert h.weights is None and h.partner_slots.shape == (len(h), 0)
        x = h.mix()[0]  # no weights, K = 0: weight 1, the trusted path
        torch.testing.assert_close(x, d.mix()[0], rtol=0, atol=0)
        torch.testing.assert_close(x, d.mix(weights=torch.ones(len(d), 1))[0], rtol=0, atol=0)  # the checked path
    expected = np.arange(len(garments)) if ids is None else ids
    np.testing.assert_array_equal(torch.cat([b.anchor_ids for b in host]).numpy(), expected)


def test_normalising_in_the_pipeline_equals_normalising_after(wide_jpeg_set):
    plain = torch.cat([b.images for b in EvalLoader(wide_jpeg_set, 5, cpu(), crop=48)]).float()
    normed = torch.cat([b.images for b in EvalLoader(wide_jpeg_set, 5, cpu(mean=MEAN, std=STD,
                                                                            normalize_in_pipeline=True), crop=48)])
    assert normed.dtype == torch.float32
    expected = (plain - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(normed, expected, atol=1e-4, rtol=1e-4)


def test_file_reader_pipeline_shares_the_eval_processing(wide_jpeg_set):
    """DALI's named file reader + DALIGenericIterator gives the same views as our external source."""
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    from mixnn_fast.pipeline.dali_pipelines import READER_NAME, EvalView, file_reader_eval_pipeline

    desc = wide_jpeg_set
    pipe = file_reader_eval_pipeline(desc.paths, desc.labels.tolist(), EvalView(resize=72, crop=64), batch_size=4,
                                     num_threads=1, device_id=None)
    it = DALIGenericIterator(pipe, ["images", "labels"], reader_name=READER_NAME,
                             last_batch_policy=LastBatchPolicy.PARTIAL)
    images, labels = [], []
    for (out,) in it:
        images.append(out["images"])
        labels.append(out["labels"].reshape(-1))
    ours = torch.cat([b.images for b in EvalLoader(desc, 4, cpu(resize_backend="dali"), crop=64, resize=72)])
    torch.testing.assert_close(torch.cat(images), ours, atol=0, rtol=0)
    np.testing.assert_array_equal(torch.cat(labels).numpy(), desc.labels)


# ---------------------------------------------------------------------------------------------
# mixing


def test_mix_uses_slots_and_global_targets(garments):
    """The batch's own weights (the table's rows), mixed through the trusted path: the
    reference mixer's result, by hand for one anchor, and bit for bit the validated path
    given the same weights explicitly."""
    desc = garments
    n = len(desc)
    nbrs = ring_neighbours(n, k=2, shift=7)
    rng = np.random.default_rng(0)
    table = rng.dirichlet(np.ones(3), size=n).astype(np.float32)  # (N, K+1) per-sample weights
    loader = MixNNLoader(desc, 9, cpu(num_threads=1, seed=8, mean=[72.9], std=[90.0]),
                         partners=table_of(nbrs, table))
    targets = torch.from_numpy(rng.dirichlet(np.ones(10), size=n).astype(np.float32))
    for batch in loader:
        weights = torch.from_numpy(table[batch.anchor_ids.numpy()])
        assert torch.equal(batch.weights, weights)
        x, y = batch.mix(targets)
        x_checked, y_checked = batch.mix(targets, weights=weights)
        assert torch.equal(x, x_checked) and torch.equal(y, y_checked)
        assert x.data_ptr() != x_checked.data_ptr()  # two outputs of the pool, both held by the batch
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
    loader = MixNNLoader(desc, 16, cpu(num_threads=1, mean=[72.9], std=[90.0], drop_last=True),
                         partners=ring_table(n))
    steps = 0
    for epoch in range(2):
        loader.set_epoch(epoch)
        for batch in loader:
            x, y = batch.mix(targets)
            loss = -(y * torch.log_softmax(model(x), dim=1)).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            batch.release()  # after the step: the next batch reuses its buffers
            assert torch.isfinite(loss)
            steps += 1
    assert steps == 2 * (n // 16)
    assert loader._pool.lent == 0


# ---------------------------------------------------------------------------------------------
# epochs, shards, restarts


def test_epochs_differ_and_restart_after_break(jpeg_set):
    desc = jpeg_set
    loader = MixNNLoader(desc, 4, cpu(size=32, num_threads=1), partners=ring_table(len(desc)))

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
    n = len(desc)
    weights = np.random.default_rng(9).dirichlet([1, 1], size=n).astype(np.float32)
    table = ring_table(n, weights=weights)
    per_shard = []
    for shard in range(3):
        loader = MixNNLoader(desc, 3, cpu(size=32, num_threads=1, shard_id=shard, num_shards=3, seed=9),
                             partners=table)
        batches = list(loader)
        for b in batches:  # the weights travel with their batch to its shard
            np.testing.assert_array_equal(b.weights.numpy(), weights[b.anchor_ids.numpy()])
        per_shard.append([b.anchor_ids.tolist() for b in batches])
    assert len({len(s) for s in per_shard}) == 1, "every process steps equally often"
    flat = [a for shard in per_shard for batch in shard for a in batch]
    # 8 batches of 3 over 3 shards: 9 slots, the last one repeats a batch (padding)
    assert sorted(set(flat)) == list(range(len(desc))) and len(flat) == 27


def test_anchor_subset_with_partners_outside_it(jpeg_set):
    desc = jpeg_set
    nbrs = ring_neighbours(len(desc), shift=11)
    subset = np.arange(0, len(desc), 2)
    loader = MixNNLoader(desc, 4, cpu(size=32, num_threads=1), partners=table_of(nbrs),
                         anchor_ids=lambda epoch: subset)
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
    loader = EvalLoader(desc, 3, cpu(num_threads=1), crop=32)
    name = Path(damaged_set.paths[bad]).name
    with pytest.raises(error, match=f"(?i){name}.*{hint}|{hint}.*{name}") as info:
        collect(loader)
    if isinstance(info.value, ImageDecodeError):
        assert info.value.paths and info.value.paths[0].endswith(name)


def test_batches_before_a_bad_file_are_delivered(damaged_set):
    desc = damaged_set.subset([0, 1, 2, 4, 6, 7, 3, 9])  # the missing file sits in the third batch
    loader = EvalLoader(desc, 3, cpu(num_threads=1), crop=32)
    delivered = []
    with pytest.raises(FileNotFoundError, match="03.jpg"):
        for batch in loader:
            delivered += batch.ids.tolist()
    assert delivered == [0, 1, 2, 3, 4, 5]


def test_skip_drops_and_counts_bad_samples(damaged_set):
    desc = damaged_set
    n = len(desc)
    nbrs = ring_neighbours(n, shift=1)  # i mixes with i+1: anchors 2, 4, 7 lose their partner
    weights = np.random.default_rng(2).dirichlet([1, 1], size=n).astype(np.float32)
    loader = MixNNLoader(desc, 4, cpu(size=32, num_threads=1, on_error="skip", seed=2),
                         partners=table_of(nbrs, weights))
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
    # dropped anchors lose their weights row, the others keep theirs (also those mixed with themselves)
    for b in batches:
        np.testing.assert_array_equal(b.weights.numpy(), weights[b.anchor_ids.numpy()])
    # the next epoch knows the bad files already: same anchors, nothing counted twice
    anchors = [a for b in loader for a in b.anchor_ids.tolist()]
    assert sorted(anchors) == expected and loader.skipped_anchors == 6
    assert set(loader.skipped) == {3, 5, 8}


def test_eval_skip_returns_every_good_sample(damaged_set):
    loader = EvalLoader(damaged_set, 5, cpu(num_threads=1, on_error="skip"), crop=32)
    ids = [i for b in loader for i in b.ids.tolist()]
    assert ids == [i for i in range(12) if i not in (3, 5, 8)]


# ---------------------------------------------------------------------------------------------
# validation


def test_bad_arguments_name_themselves(jpeg_set):
    n = len(jpeg_set)
    table = ring_table(n)
    with pytest.raises(ValueError, match="batch_size"):
        MixNNLoader(jpeg_set, 0, cpu(), partners=table)
    with pytest.raises(ValueError, match="batch_size"):
        EvalLoader(jpeg_set, -2, cpu())
    with pytest.raises(ValueError, match="on_error"):
        MixNNLoader(jpeg_set, 4, cpu(on_error="ignore"), partners=table)
    with pytest.raises(ValueError, match="device"):
        MixNNLoader(jpeg_set, 4, LoaderOptions(device="tpu"), partners=table)
    with pytest.raises(ValueError, match="mode"):
        MixNNLoader(jpeg_set, 4, cpu(), mode="random", partners=table)
    with pytest.raises(ValueError, match="shard_id"):
        MixNNLoader(jpeg_set, 4, cpu(shard_id=2, num_shards=2), partners=table)
    with pytest.raises(ValueError, match="mean"):
        MixNNLoader(jpeg_set, 4, cpu(mean=[1.0, 2.0]), partners=table)  # 3 channels
    with pytest.raises(ValueError, match="resize_backend"):
        MixNNLoader(jpeg_set, 4, cpu(resize_backend="pil"), partners=table)
    with pytest.raises(ValueError, match="area"):
        MixNNLoader(jpeg_set, 4, cpu(area=(0.5, 1.5)), partners=table)
    with pytest.raises(TypeError, match="options"):
        MixNNLoader(jpeg_set, 4, dict(device="cpu"), partners=table)
    with pytest.raises(TypeError, match="description"):
        EvalLoader(jpeg_set.paths, 4, cpu())
    # partners: a PartnerTable of this data set whose K suits the mode, or an in-batch producer
    with pytest.raises(ValueError, match="partners.*None"):
        collect(MixNNLoader(jpeg_set, 4, cpu(), mode="coherent"))
    with pytest.raises(TypeError, match="partners.*PartnerTable"):
        MixNNLoader(jpeg_set, 4, cpu(), partners=ring_neighbours(n))  # ids without weights
    with pytest.raises(ValueError, match="partners.*covers 5 samples"):
        MixNNLoader(jpeg_set, 4, cpu(), partners=ring_table(5, shift=1))
    with pytest.raises(ValueError, match="partners.*K = 1"):
        MixNNLoader(jpeg_set, 4, cpu(), mode="plain", partners=table)
    with pytest.raises(ValueError, match="partners.*K >= 1"):
        MixNNLoader(jpeg_set, 4, cpu(), partners=PartnerTable.alone(np.arange(n), n))
    with pytest.raises(ValueError, match="partners.*producer"):
        MixNNLoader(jpeg_set, 4, cpu(), mode="naive", partners=lambda plan: table)
    loader = MixNNLoader(jpeg_set, 4, cpu(), mode="plain", partners=lambda plan: "not a table")
    with pytest.raises(TypeError, match="partners.*producer returned a str"):
        len(loader)
    bad = ring_neighbours(n)
    bad[3, 0] = 99
    with pytest.raises(ValueError, match=r"partners.*\[0, 24\)"):
        table_of(bad)  # the table's own check, made once when it is built
    # a table that lacks some anchors: named when the plan is made
    partial = PartnerTable.build(np.arange(n - 2), ring_neighbours(n)[:-2], np.full((n - 2, 2), 0.5), n)
    with pytest.raises(ValueError, match=r"anchor_order.*\[22, 23\].*no row"):
        collect(MixNNLoader(jpeg_set, 4, cpu(), partners=partial))


# ---------------------------------------------------------------------------------------------
# GPU (skipped without a CUDA device)


@pytest.mark.cuda
def test_gpu_eval_matches_cpu(wide_jpeg_set):
    on_cpu = torch.cat([b.images for b in EvalLoader(wide_jpeg_set, 4, cpu(resize_backend="dali"), crop=64,
                                                     resize=72)])
    gpu = torch.cat([b.images for b in EvalLoader(wide_jpeg_set, 4, LoaderOptions(device="gpu"), crop=64, resize=72)])
    assert gpu.is_cuda
    assert (gpu.cpu().float() - on_cpu.float()).abs().mean() < 3.0  # nvJPEG vs libjpeg-turbo


@pytest.mark.cuda
def test_gpu_training_batches_mix_on_the_gpu(garments):
    n = len(garments)
    weights = np.random.default_rng(1).dirichlet([1, 1], size=n).astype(np.float32)
    targets = torch.rand(n, 10)
    loader = MixNNLoader(garments, 8, LoaderOptions(device="gpu", mean=[72.9], std=[90.0]),
                         partners=ring_table(n, weights=weights))
    for batch in loader:
        assert batch.images.is_cuda
        x, y = batch.mix(targets.cuda())  # the trusted path, weights moved to the device
        assert x.is_cuda and x.shape == (len(batch), 1, 28, 28)
        x_checked, y_checked = batch.mix(targets.cuda(), weights=batch.weights)
        assert torch.equal(x, x_checked) and torch.equal(y, y_checked)
        batch.release()


def test_nchw_layout_is_a_permutation_and_mixes_alike(garments):
    nhwc = torch.cat([b.images for b in EvalLoader(garments, 8, cpu())])
    nchw = torch.cat([b.images for b in EvalLoader(garments, 8, cpu(layout="NCHW"))])
    torch.testing.assert_close(nchw, nhwc.permute(0, 3, 1, 2).contiguous(), atol=0, rtol=0)
    (batch,) = [b for b in EvalLoader(garments, 50, cpu(layout="NCHW", mean=[72.9], std=[90.0]))]
    x, _ = batch.mix()
    torch.testing.assert_close(x, (nhwc.permute(0, 3, 1, 2).float() - 72.9) / 90.0, atol=1e-5, rtol=1e-5)


def test_views_hold_the_same_pixels_as_copies(wide_jpeg_set):
    """copy=False hands out DALI's buffers; consumed before the next batch they equal the copies."""
    copied = [b.images.clone() for b in EvalLoader(wide_jpeg_set, 4, cpu(), crop=48)]
    viewed = [b.images.clone() for b in EvalLoader(wide_jpeg_set, 4, cpu(copy=False), crop=48)]
    assert len(copied) == len(viewed) == 3
    for x, y in zip(copied, viewed):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# the trusted mixer path


@pytest.mark.parametrize("layout,in_pipeline", [("NHWC", False), ("NCHW", False), ("NHWC", True)])
@pytest.mark.parametrize("out_layout,out_dtype", [("NCHW", torch.float32), ("NHWC", torch.float16),
                                                  ("NCHW", torch.bfloat16), ("NHWC", torch.uint8)])
def test_trusted_mix_equals_the_checked_mix_bit_for_bit(garments, layout, in_pipeline, out_layout, out_dtype):
    """mix() with the batch's own weights (no per-batch checks) and mix(weights=...) through the
    validated public mixer run the same kernel: identical images and targets, in every layout,
    output dtype and normalisation, targets in float32 and float16."""
    n = len(garments)
    weights = np.random.default_rng(5).dirichlet(np.ones(3), size=n).astype(np.float32)
    options = cpu(num_threads=1, seed=2, mean=[72.9], std=[90.0], layout=layout, normalize_in_pipeline=in_pipeline)
    loader = MixNNLoader(garments, 7, options, partners=ring_table(n, k=2, shift=9, weights=weights))
    targets = torch.from_numpy(np.random.default_rng(6).dirichlet(np.ones(10), size=n).astype(np.float32))
    checked = 0
    for batch in loader:
        for table in (targets, targets.half()):
            x, y = batch.mix(table, out_layout=out_layout, out_dtype=out_dtype)
            x_ref, y_ref = batch.mix(table, weights=batch.weights.clone(), out_layout=out_layout, out_dtype=out_dtype)
            assert x.dtype == out_dtype and torch.equal(x, x_ref) and torch.equal(y, y_ref)
            checked += 1
        out = torch.empty_like(x)
        x_out, _ = batch.mix(out=out, out_layout=out_layout, out_dtype=out_dtype)
        assert x_out is out and torch.equal(out, x)
        batch.release()
    assert checked == 2 * len(loader)


def test_mix_checks_what_is_cheap_to_check(garments):
    """No per-batch data checks on the trusted path, but the arguments' kinds and shapes are
    checked and named; K > 0 without weights is refused."""
    images = torch.from_numpy(garments.images[:3])
    kwargs = dict(ids=torch.tensor([5, 6, 7]), anchor_slots=torch.tensor([0, 1]),
                  partner_slots=torch.tensor([[1], [2]]), labels=torch.zeros(2, dtype=torch.int64), index=0)
    no_weights = LoaderBatch(images, **kwargs)
    with pytest.raises(ValueError, match="weights.*1 partners"):
        no_weights.mix()
    x, _ = no_weights.mix(weights=torch.full((2, 2), 0.5))  # explicit weights: the checked path
    assert x.shape == (2, 1, 28, 28)
    with pytest.raises(ValueError, match="weights"):
        no_weights.mix(weights=torch.full((2, 2), 0.7))  # validated: rows must sum to 1
    batch = LoaderBatch(images, weights=torch.full((2, 2), 0.5), **kwargs)
    with pytest.raises(ValueError, match="targets.*7"):
        batch.mix(torch.full((2, 2), 0.5))  # weights given where the targets go: the old call
    with pytest.raises(TypeError, match="targets"):
        batch.mix(torch.zeros(8, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="out_layout"):
        batch.mix(out_layout="CHW")
    with pytest.raises(TypeError, match="out_dtype"):
        batch.mix(out_dtype=torch.int32)
    with pytest.raises(ValueError, match="out.*shape"):
        batch.mix(out=torch.empty(2, 28, 28, 1))
    x, y = batch.mix(torch.eye(8)[:, :4].contiguous())
    assert y.shape == (2, 4) and torch.equal(y, torch.eye(8)[[5, 6], :4] * 0.5 + torch.eye(8)[[6, 7], :4] * 0.5)


# ---------------------------------------------------------------------------------------------
# buffers: the pool, batch.release()


@pytest.mark.parametrize("kind", ["train", "eval"])
def test_kept_batches_keep_their_buffers_and_released_ones_are_reused(jpeg_set, kind):
    """copy=True: a batch that is never released keeps its buffer for good (kept in a list, or
    through a view, or a NumPy array, the pixels stay); a released batch's buffer serves the
    next batch."""
    def loader():
        if kind == "train":  # host resize, then the loader's own buffers
            return MixNNLoader(jpeg_set, 4, cpu(size=32, seed=9), mode="plain")
        return EvalLoader(jpeg_set, 4, cpu(), crop=48)  # DALI's output copied out

    reference = [b.images.clone() for b in loader()]
    kept = [b.images for b in loader()]
    views = [b.images[1:] for b in loader()]
    arrays = [b.images.numpy() for b in loader()]
    for ref, whole, view, array in zip(reference, kept, views, arrays, strict=True):
        torch.testing.assert_close(whole, ref, atol=0, rtol=0)
        torch.testing.assert_close(view, ref[1:], atol=0, rtol=0)
        np.testing.assert_array_equal(array, ref.numpy())
    assert len({x.data_ptr() for x in kept}) == len(kept), "an unreleased buffer was lent twice"
    pointers = []
    for b, ref in zip(loader(), reference, strict=True):
        torch.testing.assert_close(b.images, ref, atol=0, rtol=0)
        pointers.append(b.images.data_ptr())
        b.release()
    assert len(set(pointers)) == 1, "a released batch's buffer should serve the next batch"


def test_mix_outputs_come_from_the_pool_until_release(jpeg_set):
    """LoaderBatch.mix without ``out``: outputs of batches that are kept keep their values;
    a released batch's output is reused by the next batch (and emptied meanwhile)."""
    table = ring_table(len(jpeg_set))

    def batches():
        return MixNNLoader(jpeg_set, 4, cpu(size=32, seed=10, mean=MEAN, std=STD), partners=table)

    reference = [b.mix()[0].clone() for b in batches()]
    kept = [b.mix()[0] for b in batches()]
    assert all(x.shape == (len(r), 3, 32, 32) for x, r in zip(kept, reference))
    for x, ref in zip(kept, reference, strict=True):
        torch.testing.assert_close(x, ref, atol=0, rtol=0)
    assert len({x.data_ptr() for x in kept}) == len(kept)
    pointers = []
    for b, ref in zip(batches(), reference, strict=True):
        x, _ = b.mix()
        torch.testing.assert_close(x, ref, atol=0, rtol=0)
        pointers.append(x.data_ptr())
        b.release()
        assert x.numel() == 0  # the released output is emptied: no silent use of the next batch's data
    assert len(set(pointers)) == 1


@pytest.mark.parametrize("copy", [True, False])
def test_use_after_release_is_an_error(jpeg_set, copy):
    loader = MixNNLoader(jpeg_set, 4, cpu(size=32, mean=MEAN, std=STD, copy=copy),
                         partners=ring_table(len(jpeg_set)))
    batch = next(iter(loader))
    x, _ = batch.mix()
    weight = torch.ones(3, requires_grad=True)
    loss = (x * weight.view(1, 3, 1, 1)).sum()  # autograd saves x for weight's gradient
    assert not batch.released
    batch.release()
    batch.release()  # idempotent
    assert batch.released and batch.images is None and x.numel() == 0
    assert len(batch) == 4 and batch.anchor_ids.shape == (4,) and batch.weights.shape == (4, 2)
    with pytest.raises(RuntimeError, match="released"):
        batch.mix()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # a copy made with dataclasses.replace owns no buffer: releasing it gives nothing back twice
    import dataclasses

    other = next(iter(loader))
    twin = dataclasses.replace(other)
    twin.release()
    assert other.images is not None and not other.released
    other.release()


def test_buffer_pool_lends_once_and_reuses_what_is_given_back():
    pool = BufferPool(keep=2)
    a = pool.take((4, 3), torch.float32)
    b = pool.take((4, 3), torch.float32)
    assert a.shape == (4, 3) and a.data_ptr() != b.data_ptr() and pool.lent == 2
    a_ptr = a.data_ptr()
    pool.give_back(a)
    assert a.numel() == 0 and pool.free == 1 and pool.lent == 1
    c = pool.take((3, 3), torch.float32)  # fewer rows fit in a free buffer
    assert c.data_ptr() == a_ptr and c.shape == (3, 3)
    d = pool.take((4, 3), torch.float32)  # nothing free: a new buffer, never a lent one
    assert d.data_ptr() not in (b.data_ptr(), c.data_ptr())
    e = pool.take((4, 3), torch.uint8)  # another dtype is another group
    assert e.data_ptr() not in (b.data_ptr(), c.data_ptr(), d.data_ptr())
    with pytest.raises(ValueError, match="buffer.*already given back"):
        pool.give_back(a)
    with pytest.raises(ValueError, match="buffer"):
        pool.give_back(torch.empty(4, 3))
    big = pool.take((2, 5), torch.float32, capacity=8)  # room for bigger batches
    big_ptr = big.data_ptr()
    pool.give_back(big)
    assert pool.take((8, 5), torch.float32).data_ptr() == big_ptr
    lent = pool.lent
    del b  # dropped without give_back: forgotten by the pool, freed with its holder
    assert pool.lent == lent - 1


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(1, 6), st.integers(0, 10)), max_size=40))
def test_buffer_pool_never_lends_memory_in_use(ops):
    """Any sequence of takes and give-backs: the buffers lent at any moment never overlap, and
    a take that fits in a buffer just given back reuses a free buffer instead of allocating."""
    pool = BufferPool(keep=100)
    lent: list[torch.Tensor] = []
    for give, rows, pick in ops:
        if give and lent:
            buffer = lent.pop(pick % len(lent))
            capacity = buffer.untyped_storage().nbytes() // (2 * 4)  # rows of its (rows, 2) float32 buffer
            pool.give_back(buffer)
            free = pool.free
            lent.append(pool.take((min(rows, capacity), 2), torch.float32))
            assert pool.free == free - 1, "a free buffer that fits was not reused"
        else:
            lent.append(pool.take((rows, 2), torch.float32))
        spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * 4) for t in lent)
        assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:])), "two lent buffers overlap"
        assert pool.lent == len(lent)


# ---------------------------------------------------------------------------------------------
# in-batch producers


def test_in_batch_producer_is_called_once_per_plan_and_sharded_with_it(garments):
    """A callable plan -> PartnerTable (here plain mixup): run once on the whole plan of each
    epoch, its partners lie in their anchor's batch, and each batch keeps its partners and
    weights on whichever shard decodes it."""
    n = len(garments)
    calls = []

    def producer(plan):
        calls.append((plan.epoch, len(plan)))
        return mixup_table(plan, n, alpha=1.0, seed=3, epoch=plan.epoch)

    whole = MixNNLoader(garments, 8, cpu(seed=3), mode="plain", partners=producer)
    assert len(whole) == 7
    batches = {b.index: (b.anchor_ids.clone(), b.partner_ids.clone(), b.weights.clone()) for b in whole}
    assert calls == [(0, 7)]
    for anchors, partners, weights in batches.values():
        assert set(partners[:, 0].tolist()) <= set(anchors.tolist())  # in the batch
        assert (partners[:, 0] != anchors).all() or len(anchors) == 1  # a derangement
        assert torch.equal(weights, weights[:1].expand_as(weights))  # one λ per batch
        torch.testing.assert_close(weights.sum(1), torch.ones(len(weights)))
    seen = []
    for shard in range(2):
        loader = MixNNLoader(garments, 8, cpu(seed=3, shard_id=shard, num_shards=2), mode="plain", partners=producer)
        for b in loader:
            anchors, partners, weights = batches[b.index]
            assert torch.equal(b.anchor_ids, anchors) and torch.equal(b.partner_ids, partners)
            assert torch.equal(b.weights, weights)
            x, _ = b.mix()
            assert x.shape == (len(b), 1, 28, 28)
            seen.append(b.index)
    assert sorted(set(seen)) == sorted(batches)


# ---------------------------------------------------------------------------------------------
# options


_BAD_OPTIONS = {
    "size": [0, -3, 2.5, True, "224", None], "pad": [-1, 1.5, False, "4"],
    "area": [(0.5, 1.5), (0.0, 1.0), (0.9, 0.1), (0.5,), "ab", (float("nan"), 1.0), None, (1, "x")],
    "aspect_ratio": [(0.0, 1.0), (2.0, 1.0), (1.0, float("inf")), None, 3],
    "flip": ["yes", None, 1.5], "normalize_in_pipeline": ["no", None], "copy": [None, 0.5], "drop_last": ["x"],
    "mean": [[], ["a"], 3.0, [float("nan")], "abc"], "std": [[0.0], [-1.0], [float("inf")], "s", [1.0, None]],
    "layout": ["CHW", None, 3], "device": ["tpu", None, 0], "device_id": [-1, 1.5, "0"],
    "num_threads": [0, 1.0, None], "prefetch_queue_depth": [0, None], "resize_backend": ["pil", None],
    "backend": ["numpy", "gpu", None, 1],
    "shard_id": [-1, 1, 0.5], "num_shards": [0, -2, None], "on_error": ["ignore", None], "seed": [-1, 0.5, None],
}


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_options_refuse_bad_values_naming_the_field(data):
    """Any field given a bad value (hand-picked, or any non-integer / too small integer for the
    integer fields) raises ValueError or TypeError whose message starts with the field's name."""
    name = data.draw(st.sampled_from(sorted(_BAD_OPTIONS)), label="field")
    minimum = {"size": 1, "num_threads": 1, "prefetch_queue_depth": 1, "num_shards": 1}.get(name, 0)
    values = st.sampled_from(_BAD_OPTIONS[name])
    if name in ("size", "pad", "num_threads", "prefetch_queue_depth", "num_shards", "seed", "device_id"):
        values = st.one_of(values, st.integers(max_value=minimum - 1), st.floats(), st.text(max_size=3))
    value = data.draw(values, label="value")
    with pytest.raises((ValueError, TypeError)) as info:
        LoaderOptions(**{name: value})
    assert str(info.value).startswith(f"{name}:"), str(info.value)


def test_options_are_checked_once_normalised_and_frozen():
    import dataclasses

    options = LoaderOptions(mean=[1, 2, 3], std=np.array([4.0, 5.0, 6.0]), area=[0.5, 1], flip=1)
    assert options.mean == (1.0, 2.0, 3.0) and options.std == (4.0, 5.0, 6.0)
    assert options.area == (0.5, 1.0) and options.flip is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.size = 3
    assert options.replace(size=64).size == 64 and options.replace(size=64).mean == options.mean
    with pytest.raises(ValueError, match="^size"):
        options.replace(size=0)
    with pytest.raises(TypeError, match="^sizes: not a field"):
        options.replace(sizes=64)
    with pytest.raises(ValueError, match="^resize_backend"):
        LoaderOptions(device="gpu", resize_backend="torch")
    assert LoaderOptions() == LoaderOptions()  # comparable: one run's settings


# ---------------------------------------------------------------------------------------------
# epochs


def test_len_matches_the_epoch(jpeg_set):
    loader = MixNNLoader(jpeg_set, 5, cpu(size=32, drop_last=True), partners=ring_table(len(jpeg_set)))
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

    loader = MixNNLoader(desc, 4, cpu(size=32, num_threads=1), partners=table_of(nbrs), anchor_ids=anchors)
    for epoch in range(2):
        seen = []
        for batch in loader:
            np.testing.assert_array_equal(batch.labels.numpy(), desc.labels[batch.anchor_ids.numpy()])
            np.testing.assert_array_equal(batch.partner_ids.numpy(), nbrs[batch.anchor_ids.numpy()])
            seen += batch.anchor_ids.tolist()
        assert sorted(seen) == sorted(draws[epoch].tolist())
