"""DALI pipelines: where the images come from is kept apart from what is done to them.

Processing functions take and return DALI data nodes and work inside any
``@pipeline_def``, whichever operator produced their input:

- :func:`decode_resized_window` -- JPEG/PNG bytes + a window (anchor, shape) + a flip flag
  per image -> (size, size, 3) uint8 HWC (the random-resized crop);
- :func:`decode_window` -- the window decoded but not resized (for a loader that resizes
  and mirrors it itself: on the CPU, torch's uint8 antialiased bilinear resize is several
  times faster than DALI's ``fn.resize``);
- :func:`pad_and_crop` -- decoded uint8 HWC arrays + a shift per image -> same size, shifted;
- :func:`decode_resize_center_crop` / :func:`center_crop` -- the evaluation views;
  :func:`decode_center_window` -- the same view's window decoded, not resized;
- :func:`flip_horizontal`, :func:`normalise` -- flips for arrays; the last step of every pipeline.

The pipelines take what they do to each image as small frozen objects: :class:`TrainView`
or :class:`EvalView`, and :class:`OutputFormat` (normalisation and layout).

Where the training randomness comes from: not from DALI.  Windows, shifts and flips are
drawn on the host (:mod:`mixnn_fast.pipeline.augment_params`), per image, from (seed,
epoch, batch index, slot), and arrive with the images through the external source
(:func:`train_source`); the graph only applies them.  DALI's random operators keep their
state across epochs and restart it whenever a pipeline is built, so with them a run
resumed from a checkpoint (or a pipeline rebuilt after a decoding failure) would not see
the augmentations of an uninterrupted run; with host parameters it does, exactly.

Sources: :func:`plan_source` (the evaluation views: an external source, batch mode, fed
by an epoch plan), :func:`train_source` (the same with the augmentation parameters as
further outputs of one callback), and a named file reader (``fn.readers.file(name="Reader")``)
in :func:`file_reader_eval_pipeline`, which DALI's iterators follow by that name.

Device placement is explicit: ``device="gpu"`` decodes with ``device="mixed"`` (Huffman
on the CPU, the rest on the GPU) and runs every later operator on the GPU; arrays are
moved with ``.gpu()`` right after the source.  Augmentation parameters stay on the CPU
(DALI takes argument inputs from the CPU).  ``device="cpu"`` keeps everything on the
CPU; build those pipelines with ``device_id=None``.

Images leave every pipeline as HWC (or CHW with ``layout="CHW"``): uint8 unless
``mean``/``std`` are given, then float32 ``(x - mean) / std`` (statistics in 0-255 units).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
from nvidia.dali import pipeline_def

#: The external source's name; the loader's feeder serves it.
SOURCE_NAME = "plan_source"
#: The file reader's name; DALI iterators are pointed at it with ``reader_name``.
READER_NAME = "Reader"

DEVICES = ("cpu", "gpu")


def _check_device(device: str) -> str:
    if device not in DEVICES:
        raise ValueError(f"device: must be 'cpu' or 'gpu', got {device!r}")
    return device


# ---------------------------------------------------------------------------------------------
# processing


def _decoder_device(device: str) -> str:
    """The decoders' device for a pipeline on ``device``: "mixed" (Huffman on the CPU, the
    rest on the GPU) for "gpu", else "cpu"."""
    return "mixed" if _check_device(device) == "gpu" else "cpu"


def decode_resized_window(encoded, anchor, shape, mirror=None, *, size: int, device: str = "cpu"):
    """Encoded images -> (size, size, 3) uint8 HWC: each image's window decoded (ROI
    decoding: only that region is decoded) and resized, mirrored where ``mirror`` is 1.

    Args:
        encoded: the images' bytes (CPU).
        anchor, shape: (2,) int32 per image, the window's top-left (y, x) and (h, w) in
            pixels of the decoded image (CPU).
        mirror: int32 0/1 per image (CPU), or None for no flips.

    The flip is folded into the resize (a region of interest whose start is right of its
    end is read mirrored), which saves a pass over every image.
    """
    images = decode_window(encoded, anchor, shape, device=device)
    if mirror is None:
        return fn.resize(images, resize_x=size, resize_y=size)  # linear, antialiased when shrinking
    mirror = fn.cast(mirror, dtype=types.FLOAT)  # 0 or 1 per image
    roi_start = fn.stack(mirror * 0.0, mirror)  # (y, x): x starts at the right edge when mirrored
    roi_end = fn.stack(mirror * 0.0 + 1.0, 1.0 - mirror)
    return fn.resize(images, resize_x=size, resize_y=size, roi_start=roi_start, roi_end=roi_end,
                     roi_relative=True)


def decode_window(encoded, anchor, shape, *, device: str = "cpu"):
    """Encoded images -> each image's window, decoded at its own size (uint8 HWC, ROI
    decoding), not resized; ``anchor`` (y, x) and ``shape`` (h, w) are (2,) int32 per image,
    in pixels of the decoded (EXIF-oriented) image.

    :func:`decode_resized_window` resizes and mirrors the windows in DALI; a loader can
    instead resize them itself (see ``MixNNLoader(resize_backend=...)``).
    """
    return fn.decoders.image_slice(encoded, anchor, shape, axis_names="HW", normalized_anchor=False,
                                   normalized_shape=False, device=_decoder_device(device), output_type=types.RGB)


def decode_resize_center_crop(encoded, *, resize: int, crop: int, device: str = "cpu"):
    """Encoded images -> shorter side resized to ``resize``, then the central (crop, crop) window."""
    decoder = _decoder_device(device)
    images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
    images = fn.resize(images, resize_shorter=resize)
    return fn.crop(images, crop=(crop, crop))  # crop_pos 0.5: the centre


def decode_center_window(encoded, *, resize: int, crop: int, device: str = "cpu"):
    """Encoded images -> the source window that :func:`decode_resize_center_crop` shows,
    decoded at its own size (uint8 HWC, ROI decoding) and not resized.

    The window follows DALI's own geometry: the resized shape (shorter side ``resize``, the
    other rounded), the centred crop's anchor in it (rounded), mapped back to source pixels
    and rounded to whole ones.  Resizing it to (crop, crop) gives the evaluation view to
    within half a source pixel of alignment per edge (the loader does that on the host, see
    ``EvalLoader(resize_backend=...)``).  Needs ``crop <= resize``.
    """
    if crop > resize:
        raise ValueError(f"crop: the central window needs crop <= resize, got crop={crop}, resize={resize}")
    decoder = _decoder_device(device)
    shape = fn.peek_image_shape(encoded, dtype=types.FLOAT)  # (H, W, C) from the header, before decoding
    height, width = shape[0], shape[1]
    scale = resize / dmath.min(height, width)

    def rounded(x):
        return dmath.floor(x + 0.5)

    resized_h, resized_w = rounded(height * scale), rounded(width * scale)
    anchor_y, anchor_x = rounded(0.5 * (resized_h - crop)), rounded(0.5 * (resized_w - crop))
    top, bottom = rounded(anchor_y * height / resized_h), rounded((anchor_y + crop) * height / resized_h)
    left, right = rounded(anchor_x * width / resized_w), rounded((anchor_x + crop) * width / resized_w)
    return fn.decoders.image_slice(encoded, fn.stack(top, left), fn.stack(bottom - top, right - left),
                                   axis_names="HW", normalized_anchor=False, normalized_shape=False,
                                   device=decoder, output_type=types.RGB)


def pad_and_crop(images, start, *, height: int, width: int):
    """uint8 HWC (height, width, C) -> the same size, shifted by ``start`` ((2,) int32 per
    image, (dy, dx), from the CPU) with zeros filling the gap.  The same as zero-padding by
    ``pad`` and cropping the original size at (pad + dy, pad + dx): the CIFAR augmentation
    when the shifts are uniform over [-pad, pad]."""
    return fn.slice(images, start=start, shape=[height, width], axis_names="HW", out_of_bounds_policy="pad",
                    fill_values=0)


def center_crop(images, *, crop: int | None):
    """The central (crop, crop) window, or the images unchanged when ``crop`` is None."""
    return images if crop is None else fn.crop(images, crop=(crop, crop))


def flip_horizontal(images, mirror):
    """Horizontal flip where ``mirror`` (int32 0/1 per image, from the CPU) is 1."""
    return fn.flip(images, horizontal=mirror)


def normalise(images, *, mean: Sequence[float] | None, std: Sequence[float] | None, layout: str = "HWC"):
    """float32 ``(x - mean) / std`` when statistics are given, and the ``layout`` ("HWC" or
    "CHW") asked for, in one fused pass; HWC uint8 images pass through untouched."""
    if layout not in ("HWC", "CHW"):
        raise ValueError(f"layout: must be 'HWC' or 'CHW', got {layout!r}")
    if mean is None and std is None:
        if layout == "HWC":
            return images
        return fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout=layout)
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout=layout,
                                    mean=list(mean) if mean is not None else [0.0],
                                    std=list(std) if std is not None else [1.0])


# ---------------------------------------------------------------------------------------------
# sources


def plan_source(source: Callable[[], object], *, encoded: bool, device: str):
    """The external source the loader feeds (batch mode: one call returns one batch).

    ``source()`` returns a list of 1-D uint8 arrays (file bytes) when ``encoded``, else an
    (M, H, W, C) uint8 array; it raises StopIteration at the end of the epoch.
    """
    if encoded:
        data = fn.external_source(source=source, batch=True, name=SOURCE_NAME, dtype=types.UINT8, ndim=1)
        return data  # stays on the CPU: the 'mixed' decoder takes host bytes
    data = fn.external_source(source=source, batch=True, name=SOURCE_NAME, dtype=types.UINT8, ndim=3,
                              layout="HWC")
    # arrays go to the GPU straight away so every augmentation runs there
    return data.gpu() if _check_device(device) == "gpu" else data


def train_source(source: Callable[[], tuple], *, encoded: bool, device: str, shift: bool = True,
                 flip: bool = True):
    """The external source of the training pipeline: the images and their augmentation
    parameters, all outputs of one callback (batch mode), so they cannot fall out of step.

    ``source()`` returns, per batch of M images,

    - encoded: (list of M 1-D uint8 arrays (file bytes), anchors (M, 2) int32 (y, x),
      shapes (M, 2) int32 (h, w), flips (M,) int32 if ``flip``);
    - arrays: ((M, H, W, C) uint8, shifts (M, 2) int32 (dy, dx) if ``shift``, flips (M,)
      int32 if ``flip``);

    and raises StopIteration at the end of the epoch.  Returns the data nodes, None for
    the parameters not given: (bytes, anchors, shapes, flips) or (images, shifts, flips).
    Arrays go to the GPU with ``device="gpu"``; everything else stays on the CPU.
    """
    _check_device(device)
    if encoded:
        kinds = [(types.UINT8, 1), (types.INT32, 1), (types.INT32, 1)] + ([(types.INT32, 0)] if flip else [])
        layout = None
    else:
        kinds = [(types.UINT8, 3)] + ([(types.INT32, 1)] if shift else []) + ([(types.INT32, 0)] if flip else [])
        layout = ["HWC"]
    nodes = list(fn.external_source(source=source, num_outputs=len(kinds), batch=True, dtype=[k[0] for k in kinds],
                                    ndim=[k[1] for k in kinds], layout=layout))
    if encoded:
        return tuple(nodes) + (() if flip else (None,))
    images = nodes.pop(0)
    if device == "gpu":
        images = images.gpu()  # arrays go to the GPU straight away so every augmentation runs there
    shifts = nodes.pop(0) if shift else None
    return images, shifts, (nodes.pop(0) if flip else None)


# ---------------------------------------------------------------------------------------------
# what a pipeline does to each image: small frozen objects, so that the pipelines' own
# parameter lists stay short and a loader builds its views once


@dataclass(frozen=True)
class OutputFormat:
    """The last step of every pipeline (:func:`normalise`): float32 ``(x - mean) / std`` when
    statistics are given (0-255 units), else uint8; ``layout`` "HWC" or "CHW"."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str = "HWC"

    def __post_init__(self) -> None:
        if self.layout not in ("HWC", "CHW"):
            raise ValueError(f"layout: must be 'HWC' or 'CHW', got {self.layout!r}")


@dataclass(frozen=True)
class TrainView:
    """The training view: for encoded images the random-resized crop to ``size`` (the window
    and the flip come from the source); for arrays of ``image_shape`` (H, W, C) the shift by
    up to ``pad`` pixels (none when 0) and the flip.  ``flip=False``: no flips drawn or read.
    ``resize_outside`` (encoded images): stop before the resize and return the decoded
    windows and the flip flags; the caller resizes, mirrors and normalises them."""

    size: int | None = None
    image_shape: tuple[int, ...] | None = None
    pad: int = 4
    flip: bool = True
    resize_outside: bool = False


@dataclass(frozen=True)
class EvalView:
    """The evaluation view: shorter side resized to ``resize``, central (crop, crop) window
    (encoded images); the central window alone, or the image unchanged when ``crop`` is None
    (arrays).  ``resize_outside`` (encoded images): return the central windows decoded but not
    resized (:func:`decode_center_window`); the caller resizes them to (crop, crop)."""

    resize: int | None = 256
    crop: int | None = 224
    resize_outside: bool = False


# ---------------------------------------------------------------------------------------------
# pipelines (batch_size, num_threads, device_id, seed, prefetch_queue_depth are given where
# they are built: ``train_pipeline(source, view, ..., batch_size=..., num_threads=..., device_id=None)``)


@pipeline_def
def train_pipeline(source, view: TrainView, output: OutputFormat = OutputFormat(), *, encoded: bool,
                   device: str = "cpu"):
    """Training views (:class:`TrainView`), one augmentation per decoded image, its parameters
    from ``source`` (:func:`train_source`; drawn by :mod:`mixnn_fast.pipeline.augment_params`),
    finished by ``output``.

    With ``view.resize_outside`` (encoded sources) the pipeline returns ``(windows, flips)``
    (``(windows,)`` without ``view.flip``), not resized, not normalised.
    """
    if encoded:
        data, anchor, shape, mirror = train_source(source, encoded=True, device=device, flip=view.flip)
        if view.resize_outside:
            windows = decode_window(data, anchor, shape, device=device)
            return (windows, mirror) if view.flip else (windows,)
        images = decode_resized_window(data, anchor, shape, mirror, size=view.size, device=device)
    else:
        images, shift, mirror = train_source(source, encoded=False, device=device, shift=view.pad > 0,
                                             flip=view.flip)
        if view.pad:
            images = pad_and_crop(images, shift, height=view.image_shape[0], width=view.image_shape[1])
        images = flip_horizontal(images, mirror) if view.flip else images
    return normalise(images, mean=output.mean, std=output.std, layout=output.layout)


@pipeline_def
def eval_pipeline(source, view: EvalView, output: OutputFormat = OutputFormat(), *, encoded: bool,
                  device: str = "cpu"):
    """Evaluation views (:class:`EvalView`), no randomness, finished by ``output``.

    With ``view.resize_outside`` (encoded sources) the pipeline returns ``(windows,)``, the
    central windows decoded but not resized, not normalised.
    """
    data = plan_source(source, encoded=encoded, device=device)
    if encoded and view.resize_outside:
        return (decode_center_window(data, resize=view.resize, crop=view.crop, device=device),)
    if encoded:
        images = decode_resize_center_crop(data, resize=view.resize, crop=view.crop, device=device)
    else:
        images = center_crop(data, crop=view.crop)
    return normalise(images, mean=output.mean, std=output.std, layout=output.layout)


@pipeline_def
def file_reader_eval_pipeline(files: Sequence[str], labels: Sequence[int], view: EvalView = EvalView(),
                              output: OutputFormat = OutputFormat(), *, device: str = "cpu", shard_id: int = 0,
                              num_shards: int = 1):
    """Evaluation over a file list with DALI's own named reader (e.g. a clean test set);
    same processing as :func:`eval_pipeline`.  Pair it with ``DALIGenericIterator(pipe,
    ["images", "labels"], reader_name=READER_NAME, last_batch_policy=LastBatchPolicy.PARTIAL)``."""
    encoded, label = fn.readers.file(files=list(files), labels=list(labels), name=READER_NAME,
                                     random_shuffle=False, shard_id=shard_id, num_shards=num_shards,
                                     pad_last_batch=True)
    images = decode_resize_center_crop(encoded, resize=view.resize, crop=view.crop, device=device)
    images = normalise(images, mean=output.mean, std=output.std, layout=output.layout)
    return images, (label.gpu() if device == "gpu" else label)
