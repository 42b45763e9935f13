"""From a :class:`TrainConfig` to the training and test sets a run uses: the source, the
class-stratified subset, the simulated label noise, and the input geometry (size, padding,
normalisation) the loaders need."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from mixnn_fast import data as sources
from mixnn_fast.data.description import DatasetDescription
from mixnn_fast.data.noise import NoisyLabels, corrupt
from mixnn_fast.train.config import TrainConfig

log = logging.getLogger(__name__)

# Per-channel statistics in the units of uint8 images (0-255), as the mixer expects them.
_IMAGENET = ([123.675, 116.28, 103.53], [58.395, 57.12, 57.375])
_STATS = {
    "fashion_mnist": ([72.94], [90.02]),
    "digits": ([84.0], [96.0]),
    "cifar10": ([125.31, 122.95, 113.87], [62.99, 62.09, 66.70]),
    "cifar100": ([129.30, 124.07, 112.43], [68.17, 65.39, 70.42]),
}


@dataclass
class Geometry:
    """How images enter the model: in-memory sets are padded and cropped back to ``size``;
    encoded sets get a random-resized crop of ``size`` (train) and resize + centre crop (eval)."""

    size: int
    pad: int
    in_channels: int
    mean: list[float]
    std: list[float]
    eval_resize: int | None = None


@dataclass
class RunData:
    train: DatasetDescription      # labels = the noisy labels training sees
    test: DatasetDescription | None
    geometry: Geometry
    noise: NoisyLabels | None      # None when training on the given labels
    note: str = ""                 # what a user should know (e.g. a fallback dataset)
    validation: DatasetDescription | None = None  # held out from the noisy training set: noisy labels only


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """``size`` indices with every class in proportion to ``labels``, sorted, seeded."""
    if size >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    share = counts / counts.sum() * size
    take = np.floor(share).astype(int)
    take[np.argsort(share - take)[::-1][: size - take.sum()]] += 1  # largest remainders
    picked = [rng.choice(np.flatnonzero(labels == c), n, replace=False) for c, n in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def _digits() -> tuple[DatasetDescription, DatasetDescription]:
    """scikit-learn's 8×8 digits (1,797 images), split 80/20 — the fallback when Fashion-MNIST is absent."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)[..., None]
    order = np.random.default_rng(0).permutation(len(images))
    cut = int(0.8 * len(images))
    full = sources.from_arrays(images, digits.target, classes=[str(i) for i in range(10)])
    return full.subset(order[:cut]), full.subset(order[cut:])


def _load_sources(cfg: TrainConfig) -> tuple[DatasetDescription, DatasetDescription | None, str, str]:
    """(train, test, dataset name used, note)."""
    name = cfg.dataset
    if name == "fashion_mnist":
        try:
            return (sources.fashion_mnist(cfg.data_root, "train"), sources.fashion_mnist(cfg.data_root, "test"),
                    name, "")
        except FileNotFoundError as exc:
            if cfg.data_root is not None:  # a folder the user named: a mistake to report, not to train around
                raise FileNotFoundError(f"data_root: {exc}") from None
            note = (f"Fashion-MNIST is not installed ({exc}); falling back to scikit-learn's 8x8 digits. "
                    "Install Debian's dataset-fashion-mnist (scripts/setup.sh does) for the real demo.")
            log.warning(note)
            train, test = _digits()
            return train, test, "digits", note
    if name == "digits":
        train, test = _digits()
        return train, test, name, ""
    if name in ("cifar10", "cifar100"):
        if not cfg.data_root:
            raise ValueError(f"data_root: {name} needs the folder holding its python pickles")
        return sources.cifar(cfg.data_root, name, "train"), sources.cifar(cfg.data_root, name, "test"), name, ""
    if not cfg.data_root:
        raise ValueError(f"data_root: {name} needs a data root")
    outside = dict(allow_outside_root=cfg.allow_outside_root)
    if name == "clothing1m":
        return (sources.clothing1m(cfg.data_root, "noisy_train", **outside),
                sources.clothing1m(cfg.data_root, "clean_test", **outside), name, "")
    if name == "webvision":
        return (sources.webvision(cfg.data_root, "train", **outside), sources.webvision(cfg.data_root, "val", **outside),
                name, "")
    if name == "image_folder":
        test = sources.image_folder(cfg.test_root) if cfg.test_root else None
        return sources.image_folder(cfg.data_root), test, name, ""
    if name == "file_list":
        test = sources.file_list(cfg.test_root, **outside) if cfg.test_root else None
        return sources.file_list(cfg.data_root, **outside), test, name, ""
    raise ValueError(f"dataset: unknown dataset {name!r}")


def _geometry(name: str, train: DatasetDescription) -> Geometry:
    if train.in_memory:
        _, height, width, channels = train.images.shape
        mean, std = _STATS.get(name, ([127.5] * channels, [64.0] * channels))
        return Geometry(size=height, pad=max(1, height // 8), in_channels=channels, mean=list(mean), std=list(std))
    mean, std = _IMAGENET
    return Geometry(size=224, pad=0, in_channels=3, mean=mean, std=std, eval_resize=256)


def prepare_data(cfg: TrainConfig) -> RunData:
    """Load, subset and corrupt the training set as ``cfg`` says; the test set keeps its true labels."""
    train, test, name, note = _load_sources(cfg)
    if cfg.train_subset:
        train = train.subset(stratified_subset(train.labels, cfg.train_subset, cfg.seed))
    noise = None
    if cfg.noise != "none":
        noise = corrupt(train.labels, cfg.noise, cfg.noise_rate, train.num_classes, cfg.noise_seed)
        train = train.with_labels(noise.labels, clean_labels=train.labels)
        log.info("label noise %s at %.2f: realised rate %.4f", cfg.noise, cfg.noise_rate, noise.rate)
    validation = None
    if cfg.validation_split:
        # what a user has: a share of the *noisy* training set, stratified by its (noisy) labels;
        # settings are chosen on the accuracy against those labels, never on the test set
        held = stratified_subset(train.labels, max(1, round(cfg.validation_split * len(train))), cfg.seed + 1)
        kept = np.setdiff1d(np.arange(len(train)), held)
        validation, train = train.subset(held), train.subset(kept)
    return RunData(train=train, test=test, geometry=_geometry(name, train), noise=noise, note=note,
                   validation=validation)
