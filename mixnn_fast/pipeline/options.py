"""The loaders' settings in one frozen object, checked once when it is made.

A loader is built from a data set, a batch size and a :class:`LoaderOptions`; what differs
between loaders of one run (the plan's mode, the partners, the anchors, the evaluation view)
is passed to the loader itself.  Why one object: the same settings (device, threads,
normalisation, error policy, sharding) go to the training and the evaluation loaders of a
run, and the constructors stay short enough to read.

Every field is checked in ``__post_init__``; a bad value is a ValueError (TypeError for a
value of the wrong kind) whose message starts with the field's name.  Checks that need the
data set (one mean/std value per channel) or the machine (a GPU for ``device="gpu"``) are
made when a loader is built, with the same naming.  Change a field with
``options.replace(field=value)`` (checked again).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields, replace
from typing import Sequence

ON_ERROR = ("raise", "skip")
DEVICES = ("auto", "cpu", "gpu")
LAYOUTS = ("NHWC", "NCHW")
RESIZE_BACKENDS = ("auto", "dali", "torch")
BACKENDS = ("auto", "dali", "host")

__all__ = ["LoaderOptions", "ON_ERROR", "DEVICES", "LAYOUTS", "RESIZE_BACKENDS", "BACKENDS", "dali_installed",
           "resolve_backend"]


@dataclass(frozen=True)
class LoaderOptions:
    """How a loader decodes, augments and hands out its batches.

    Augmentation (training views, :class:`~mixnn_fast.pipeline.MixNNLoader`):
        size: output side of the random-resized crop (encoded images).
        area, aspect_ratio: random-resized-crop ranges (relative area, width/height), drawn
            as torchvision's ``RandomResizedCrop`` does: 0 < low <= high (area <= 1).
        pad: pad-and-crop shift for in-memory images (pixels, each side; 0: none).
        flip: random horizontal flips.

    Normalisation:
        mean, std: per-channel statistics in 0-255 units (None: none); applied by
            :meth:`LoaderBatch.mix <mixnn_fast.pipeline.LoaderBatch.mix>`, or by DALI with
            ``normalize_in_pipeline=True`` (images then float32).

    Output:
        layout: "NHWC" (default; what the mixer reads fastest) or "NCHW" images.
        copy: True (default) copies each batch out of DALI's buffers into buffers of the
            loader's pool, so batches can be kept; ``batch.release()`` hands them back for
            the next batches.  False hands out views of DALI's buffers (or of one reused
            buffer), valid only until the next batch is requested.

    Engine:
        device: "auto" (GPU when torch sees one), "cpu" or "gpu"; device_id: the GPU (None:
            torch's current device).
        num_threads: DALI worker threads; prefetch_queue_depth: batches DALI prepares ahead.
        resize_backend: who resizes encoded images' crops: "dali", "torch" (DALI decodes the
            windows, the loader resizes them on the host; CPU only) or "auto" ("torch" on the
            CPU, "dali" on a GPU).
        backend: who augments and formats in-memory images (``description.images``): "host"
            (NumPy on the CPU, :mod:`mixnn_fast.pipeline.host_batches`; DALI is never
            imported; on a GPU the uint8 batch is then copied to the device once), "dali"
            (a DALI pipeline), or "auto" (default): "host" on the CPU (a fifth of the DALI
            path's CPU time for 28×28 and 32×32 batches, 3-5× the batches per second:
            bench/README.md), and on a GPU "dali" when DALI is installed, else "host".  Both
            give the same images, bit for bit.  Files are always decoded by DALI ("host" is
            then refused when the loader is built).

    Sharding: shard_id, num_shards: this process's share of every epoch's batches.

    Policy:
        on_error: "raise" or "skip" unreadable images (see :mod:`mixnn_fast.pipeline.feeder`).
        seed: seeds the plans (``[seed, epoch]``) and the augmentations (``[seed, epoch,
            batch index]``).  Use the same seed in every process: the shards split one
            common plan, and a batch gets the same augmentations whichever shard decodes it.
        drop_last: drop each training epoch's final partial batch.
    """

    size: int = 224
    area: tuple[float, float] = (0.08, 1.0)
    aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    pad: int = 4
    flip: bool = True
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    normalize_in_pipeline: bool = False
    layout: str = "NHWC"
    copy: bool = True
    device: str = "auto"
    device_id: int | None = None
    num_threads: int = 2
    prefetch_queue_depth: int = 2
    resize_backend: str = "auto"
    backend: str = "auto"
    shard_id: int = 0
    num_shards: int = 1
    on_error: str = "raise"
    seed: int = 0
    drop_last: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: the checked (normalised) values replace the given ones
        for name, minimum in (("size", 1), ("pad", 0), ("num_threads", 1), ("prefetch_queue_depth", 1),
                              ("num_shards", 1), ("seed", 0)):
            set_(self, name, check_int(getattr(self, name), name, minimum))
        set_(self, "shard_id", check_int(self.shard_id, "shard_id", 0))
        if self.shard_id >= self.num_shards:
            raise ValueError(f"shard_id: must be an integer in [0, {self.num_shards}), got {self.shard_id!r}")
        if self.device_id is not None:
            set_(self, "device_id", check_int(self.device_id, "device_id", 0))
        area = _range(self.area, "area")
        if not 0 < area[0] <= area[1] <= 1:
            raise ValueError(f"area: must be 0 < low <= high <= 1, got {self.area}")
        ratio = _range(self.aspect_ratio, "aspect_ratio")
        if not 0 < ratio[0] <= ratio[1] < math.inf:
            raise ValueError(f"aspect_ratio: must be 0 < low <= high, got {self.aspect_ratio}")
        set_(self, "area", area)
        set_(self, "aspect_ratio", ratio)
        set_(self, "mean", _statistics(self.mean, "mean"))
        set_(self, "std", _statistics(self.std, "std"))
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std: every channel's std must be > 0, got {self.std}")
        for name in ("flip", "normalize_in_pipeline", "copy", "drop_last"):
            if not isinstance(getattr(self, name), (bool, numbers.Integral)):
                raise TypeError(f"{name}: expected a bool, got {type(getattr(self, name)).__name__}")
            set_(self, name, bool(getattr(self, name)))
        for name, allowed in (("layout", LAYOUTS), ("device", DEVICES), ("resize_backend", RESIZE_BACKENDS),
                              ("backend", BACKENDS), ("on_error", ON_ERROR)):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                raise ValueError(f"{name}: must be one of {allowed}, got {value!r}")
        if self.resize_backend == "torch" and self.device == "gpu":
            raise ValueError("resize_backend: 'torch' resizes host images; with device='gpu' use 'dali' or 'auto'")

    def replace(self, **changes) -> "LoaderOptions":
        """A copy with ``changes`` (field=value), checked like a new object."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"{sorted(unknown)[0]}: not a field of LoaderOptions")
        return replace(self, **changes)


def check_int(value, name: str, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``; ValueError naming ``name`` otherwise (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _range(value, name: str) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"{name}: expected (low, high), got {value!r}")
    try:
        low, high = float(value[0]), float(value[1])
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}: expected two numbers, got {value!r}") from exc
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{name}: must be finite, got {value!r}")
    return low, high


def _statistics(value, name: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or not hasattr(value, "__getitem__"):
        raise TypeError(f"{name}: expected one number per channel, got {value!r}")
    try:
        numbers_ = tuple(float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}: expected one number per channel, got {value!r}") from exc
    if not numbers_ or not all(math.isfinite(v) for v in numbers_):
        raise ValueError(f"{name}: expected finite numbers, one per channel, got {value!r}")
    return numbers_


def check_channels(options: LoaderOptions, channels: int) -> None:
    """One mean and one std value per image channel (the data set decides how many)."""
    for name in ("mean", "std"):
        value = getattr(options, name)
        if value is not None and len(value) != channels:
            raise ValueError(f"{name}: expected {channels} values (one per channel), got {len(value)}")


def resolve_device(options: LoaderOptions) -> tuple[str, int | None]:
    """("cpu", None) or ("gpu", device id) for the options' device on this machine."""
    import torch

    device = options.device
    if device == "auto":
        device = "gpu" if torch.cuda.is_available() else "cpu"
    if device == "gpu":
        if not torch.cuda.is_available():
            raise ValueError("device: 'gpu' was asked for but torch sees no CUDA device")
        return device, torch.cuda.current_device() if options.device_id is None else options.device_id
    return device, None  # DALI's CPU-only mode


def resolve_resize_backend(backend: str, device: str) -> str:
    """"auto" -> "torch" on the CPU, "dali" on a GPU; ValueError for "torch" on a GPU."""
    if backend == "auto":
        return "dali" if device == "gpu" else "torch"
    if backend == "torch" and device == "gpu":
        raise ValueError("resize_backend: 'torch' resizes host images; with device='gpu' use 'dali' or 'auto'")
    return backend


def dali_installed() -> bool:
    """Whether ``nvidia.dali`` can be found, without importing it (nor its native libraries)."""
    import importlib.util

    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):  # no ``nvidia`` package, or a module blocked in sys.modules
        return False


def resolve_backend(backend: str, in_memory: bool, device: str) -> str:
    """"host" or "dali": who augments and formats a loader's batches (see
    ``LoaderOptions.backend``).  Encoded images always go through DALI.

    Raises:
        ValueError: naming ``backend``, for "host" with encoded images.
    """
    if not in_memory:
        if backend == "host":
            raise ValueError("backend: 'host' augments in-memory images (description.images); image files are "
                             "decoded by DALI: use 'dali' or 'auto'")
        return "dali"
    if backend == "auto":
        return "host" if device == "cpu" or not dali_installed() else "dali"
    return backend
