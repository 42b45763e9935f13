"""Loaders: an epoch plan through a DALI pipeline, into a plain torch training loop.

::

    loader = MixNNLoader(description, batch_size=64, neighbours=nbrs, mean=MEAN, std=STD)
    for epoch in range(first_epoch, epochs):             # (first_epoch, first_batch): from a checkpoint
        loader.set_epoch(epoch, start_batch=first_batch if epoch == first_epoch else 0)
        loader.set_neighbours(refreshed_neighbours)      # after each refresh pass
        for batch in loader:                              # LoaderBatch
            x, y = batch.mix(weights[batch.anchor_ids], targets)   # (B, C, H, W), (B, classes)
            loss = soft_cross_entropy(model(x), y)
            resume = (epoch, batch.position + 1)          # what a checkpoint records

Each batch decodes the plan's ids once (``batch.images`` (M, H, W, C)), gives every
decoded image its own augmentation, and says where the anchors and partners are
(``anchor_slots`` (B,), ``partner_slots`` (B, K)); :meth:`LoaderBatch.mix` hands them to
:func:`mixnn_fast.mix_images` / :func:`mixnn_fast.mix_targets`.

Exact resume: an epoch's batches are a pure function of (seed, epoch, neighbours,
anchors) (the plan), and each decoded image's augmentation a pure function of (seed,
epoch, the batch's plan index, its slot in the batch): the windows, shifts and flips are
drawn on the host (:mod:`mixnn_fast.pipeline.augment_params`) and handed to DALI with the
images, never by DALI's own random operators, whose state would depend on the pipeline's
history.  So ``set_epoch(e, start_batch=s)`` on a new loader yields exactly batches
``s, s+1, ...`` of an uninterrupted epoch ``e``, pixel for pixel, without reading or
decoding the batches before ``s``; and rebuilding the pipeline (after a decoding failure
or an abandoned epoch) changes nothing.

How batches stay aligned with their metadata: DALI calls the feeder (the external
source) in batch order, ``prefetch_queue_depth`` batches ahead of the consumer.  The
feeder appends each batch it serves to a FIFO, and each pipeline output pops the oldest
entry.  A batch's augmentation parameters are further outputs of the same feeder call as
its images, so they travel through DALI together and need no queue of their own.  The
feeder never raises an error itself (it would surface on an earlier, prefetching
``run()`` and misalign the queue): a file it cannot read ends the feeding there, the
batches before it are delivered, and then the error is raised.

Where the random-resized crop is resized (``MixNNLoader(resize_backend=...)``, encoded
images): on a GPU, DALI does everything.  On the CPU (the default there, "torch"), DALI
decodes the random windows (ROI decoding) and the loader resizes each window into the
batch with torch's uint8 antialiased bilinear kernel (the same triangle filter as DALI's
linear antialiased ``fn.resize`` and PIL's BILINEAR; within rounding of DALI's result) and
mirrors it when its flip flag says so (the same windows and flags either way): on a 2-core
x86 machine DALI's CPU resize took ~1.4 ms per 224×224 image, twice the ROI decode, and
torch's ~0.2 ms.  The evaluation views (``EvalLoader(resize_backend=...)``) work the same
way on the CPU: DALI decodes only the source window that the resize-then-centre-crop view
shows, and torch resizes it (bench/eval_loader.py: about 2× the all-DALI path).

Bad images (``on_error``): "raise" (default) raises an error naming the file when its
batch is reached; "skip" loses that image only and counts it (``loader.skipped``: id ->
reason, ``loader.skipped_anchors``): as an anchor it is dropped, and an anchor whose
partner it was is mixed with itself in its place.  Missing files, empty files, bytes that
are not an image format and (training views of encoded images) headers whose size cannot
be read are caught while reading; images that start right but do not decode (truncated,
corrupt) make DALI fail the batch, and the loader then decodes the batch's files one by
one with PIL -- and, for files PIL reads but DALI does not, with DALI alone -- to name the
culprit, rebuilds the pipeline and (when skipping) replays the batch without it.  The replayed batches get the same
augmentations, and a skipped image does not change those of the others in its batch.
"""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from mixnn_fast.data.description import DatasetDescription
from mixnn_fast.pipeline.augment_params import CropFlip, ShiftFlip, encoded_image_size
from mixnn_fast.pipeline.plan import EpochPlan, PlanBatch, plan_epoch

log = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")

# Leading bytes of the formats DALI decodes (JPEG, PNG, BMP, GIF, TIFF, WebP, PNM, JPEG 2000).
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"GIF8", b"II*\x00", b"MM\x00*",
          b"\x00\x00\x00\x0cjP  ", b"\xff\x4f\xff\x51", b"P1", b"P2", b"P3", b"P4", b"P5", b"P6")


class ImageDecodeError(ValueError):
    """An image could not be read or decoded; ``paths`` lists the files."""

    def __init__(self, message: str, paths: Sequence[str] = ()):
        super().__init__(message)
        self.paths = list(paths)


# ---------------------------------------------------------------------------------------------
# the batch a loader yields


@dataclass
class LoaderBatch:
    """One decoded batch.

    Attributes:
        images: (M, H, W, C) uint8 tensor (or float32, normalised, when the pipeline
            normalises; (M, C, H, W) with ``layout="NCHW"``), on the pipeline's device;
            every image augmented independently.
        ids: (M,) int64 sample ids of ``images``.
        anchor_slots: (B,) int64 positions of the anchors in ``images``.
        partner_slots: (B, K) int64 positions of each anchor's partners (K = 0 for plain
            and in-batch plans).
        labels: (B,) int64 the anchors' given (possibly noisy) labels.
        index: the batch's index in its epoch plan (before sharding: the same batch has the
            same index on every shard).
        position: the batch's position in this shard's plan for the epoch (``len(loader)``
            batches, ``0..len(loader)-1``); ``set_epoch(epoch, start_batch=position + 1)``
            resumes right after it.
        mean, std: the normalisation :meth:`mix` applies (None when the pipeline already
            normalised, or when no statistics were given).
        layout: "NHWC" or "NCHW", the layout of ``images``.
        recycle: set by the loader: ``(name, shape, dtype) -> tensor``, a host buffer that
            nothing else refers to (an earlier batch's once it is free), used by :meth:`mix`
            when no ``out`` is given.
    """

    images: torch.Tensor
    ids: torch.Tensor
    anchor_slots: torch.Tensor
    partner_slots: torch.Tensor
    labels: torch.Tensor
    index: int
    position: int = 0
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    layout: str = "NHWC"
    recycle: Callable[[str, tuple, torch.dtype], torch.Tensor] | None = field(default=None, repr=False,
                                                                              compare=False)

    @property
    def anchor_ids(self) -> torch.Tensor:
        """(B,) int64 sample ids of the anchors."""
        return self.ids[self.anchor_slots]

    @property
    def partner_ids(self) -> torch.Tensor:
        """(B, K) int64 sample ids of the partners."""
        return self.ids[self.partner_slots]

    def __len__(self) -> int:
        return len(self.anchor_slots)

    def mix(self, weights, targets=None, *, out_layout: str = "NCHW", out_dtype: torch.dtype = torch.float32,
            out: torch.Tensor | None = None, num_threads: int | None = None, **kwargs):
        """MixNN's synthetic batch from this batch's decoded images.

        Args:
            weights: (B, K+1) float, row b = (λ, β_1..β_K) of anchor b, e.g.
                ``weight_table[batch.anchor_ids]``.
            targets: optional (N, C) float soft-target table of the whole data set, indexed
                by sample id.
            out: optional preallocated (B, C, H, W) output.  On the CPU a reused buffer
                saves the page faults of a fresh ~38 MB tensor per 64×224×224 batch (only
                reuse it once the previous step no longer needs it).
            num_threads: the image mixer's OpenMP threads (default: torch's).
            out_layout, out_dtype, kwargs: passed to :func:`mixnn_fast.mix_images`.

        Returns:
            (images (B, C, H, W) for "NCHW", mixed targets (B, C) or None).
        """
        from mixnn_fast.mix.mixer import mix_images, mix_targets

        device = self.images.device
        weights = torch.as_tensor(weights, dtype=torch.float32)
        if out is None and self.recycle is not None and device.type == "cpu" and out_layout in ("NCHW", "NHWC"):
            # a fresh output without the page faults of a new allocation per batch
            if self.layout == "NHWC":
                h, w, c = self.images.shape[1:]
            else:
                c, h, w = self.images.shape[1:]
            shape = (len(self), c, h, w) if out_layout == "NCHW" else (len(self), h, w, c)
            out = self.recycle("mixed", shape, out_dtype)
        images = mix_images(self.images, self.anchor_slots.to(device), self.partner_slots.to(device),
                            weights.to(device), in_layout=self.layout, mean=self.mean, std=self.std,
                            out_layout=out_layout, out_dtype=out_dtype, out=out, num_threads=num_threads, **kwargs)
        if targets is None:
            return images, None
        targets = torch.as_tensor(targets)
        t_dev = targets.device
        # (B, C) is tiny: one thread.  Waking a second OpenMP thread on a busy CPU (DALI's
        # workers hold the cores) costs milliseconds, more than the whole computation.
        mixed = mix_targets(targets, self.anchor_ids.to(t_dev), self.partner_ids.to(t_dev), weights.to(t_dev),
                            num_threads=1)
        return images, mixed


# ---------------------------------------------------------------------------------------------
# the feeder: plan batches -> bytes/arrays for DALI's external source


def _drop_samples(batch: PlanBatch, bad: np.ndarray) -> tuple[PlanBatch, int, np.ndarray]:
    """``batch`` without the ids in ``bad``: anchors among them are dropped; an anchor whose
    partner is among them keeps training, mixed with itself in that partner's place
    (``λ x + β x = x``, and its targets likewise), so only the unreadable image is lost.
    Returns (batch, number of anchors dropped, (M',) int64 the kept slots: positions in
    ``batch.ids`` of the new batch's ids)."""
    is_bad = np.isin(batch.ids, bad)
    if not is_bad.any():
        return batch, 0, np.arange(len(batch.ids))
    keep = ~is_bad[batch.anchor_slots]
    a_slots, p_slots = batch.anchor_slots[keep], batch.partner_slots[keep].copy()
    if p_slots.shape[1]:
        lost = is_bad[p_slots]
        p_slots[lost] = np.broadcast_to(a_slots[:, None], p_slots.shape)[lost]
    used = np.zeros(len(batch.ids), dtype=bool)
    used[a_slots] = True
    used[p_slots.ravel()] = True
    renumber = np.cumsum(used) - 1
    return (PlanBatch(batch.index, batch.ids[used], renumber[a_slots], renumber[p_slots]), int((~keep).sum()),
            np.flatnonzero(used))


def _image_format_problem(raw: np.ndarray) -> str | None:
    """Why these bytes cannot be an image DALI decodes (cheap: size and magic number only)."""
    if not len(raw):
        return "empty file"
    head = raw[:12].tobytes()
    if any(head.startswith(m) for m in _MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return None
    return "not a recognised image format"


class _Feeder:
    """The external source's callable: serves the plan's batches in order (see the
    module docstring for the FIFO ``served`` and the error policy).

    With an ``augment`` spec (:class:`~mixnn_fast.pipeline.augment_params.ShiftFlip` or
    :class:`~mixnn_fast.pipeline.augment_params.CropFlip`) each call returns the images
    followed by their augmentation parameters, drawn from (``seed``, the plan's epoch,
    the batch's plan index, each image's slot in the planned batch); without, the images
    alone (the evaluation views).

    The set of known-bad sample ids persists across epochs, so bad files are not read
    (nor counted) twice.
    """

    def __init__(self, description: DatasetDescription, on_error: str, augment: ShiftFlip | CropFlip | None = None,
                 seed: int = 0):
        self.description = description
        self.on_error = on_error
        self.augment = augment
        self.seed = seed
        self.plan: EpochPlan | None = None
        self.cursor = 0
        self.served: collections.deque[tuple[int, PlanBatch]] = collections.deque()
        self.error: BaseException | None = None
        self.skipped: dict[int, str] = {}
        # anchors dropped per plan position this epoch: assigned, not added, so a batch
        # replayed after a decoding failure is not counted twice
        self._dropped: dict[int, int] = {}
        self._dropped_before = 0

    @property
    def skipped_anchors(self) -> int:
        return self._dropped_before + sum(self._dropped.values())

    def start(self, plan: EpochPlan, position: int = 0) -> None:
        """Serve ``plan`` from batch ``position`` (a new epoch, or one resumed there)."""
        self._dropped_before += sum(self._dropped.values())
        self._dropped = {}
        self.plan, self.cursor, self.error = plan, position, None
        self.served.clear()

    def rewind(self, position: int) -> None:
        """Serve the current plan again from ``position`` (after a pipeline failure)."""
        self.cursor, self.error = position, None
        self.served.clear()

    def skip(self, samples: Sequence[int], reasons: Sequence[str]) -> None:
        for sample, reason in zip(samples, reasons):
            if sample not in self.skipped:
                log.warning("skipping sample %d: %s", sample, reason)
                self.skipped[sample] = reason

    def __call__(self):
        while True:
            if self.plan is None or self.error is not None or self.cursor >= len(self.plan):
                raise StopIteration
            position = self.cursor
            self.cursor += 1
            planned = self.plan[position]
            batch = planned
            slots = np.arange(len(planned.ids))  # each served image's slot in the planned batch
            if self.skipped:
                batch, _, slots = _drop_samples(batch, np.fromiter(self.skipped, dtype=np.int64))
            sizes = None
            if self.description.in_memory:
                data = self.description.images[batch.ids] if len(batch) else None
            else:
                data, batch, kept, sizes = self._read(batch, with_sizes=self.augment is not None)
                slots = slots[kept]
            if self.error is None:
                self._dropped[position] = len(planned) - len(batch)
            if data is None or not len(batch):
                continue  # every anchor skipped, or an error ends the epoch here
            self.served.append((position, batch))
            if self.augment is None:
                return data
            # Slots of the *planned* batch: an image keeps its augmentation when others
            # of its batch are skipped.
            return (data, *self.augment.params(self.seed, self.plan.epoch, planned.index, len(planned.ids), slots,
                                               sizes))

    def _read(self, batch: PlanBatch, with_sizes: bool = False
              ) -> tuple[list[np.ndarray] | None, PlanBatch, np.ndarray, np.ndarray | None]:
        """The bytes of every id of ``batch`` (in ``batch.ids`` order).

        Returns (bytes or None after an error, the batch without unreadable samples, (M',)
        its slots in the given batch, and with ``with_sizes`` (M', 2) int64 each image's
        decoded (height, width) from its header, else None)."""
        paths = self.description.paths
        raw_of: dict[int, np.ndarray] = {}
        size_of: dict[int, tuple[int, int]] = {}
        bad, reasons = [], []
        kept = np.arange(len(batch.ids))
        for sample in np.unique(batch.ids).tolist():
            path = paths[sample]
            try:
                raw = np.fromfile(path, dtype=np.uint8)
            except OSError as exc:  # missing, unreadable, a directory...
                bad.append(sample)
                reasons.append(f"cannot read {path}: {exc.strerror or exc}")
                if self.on_error == "raise":
                    message = (f"{reasons[-1]} (sample {sample}); pass on_error='skip' to skip unreadable samples "
                               "and count them")
                    self.error = (FileNotFoundError(message) if isinstance(exc, FileNotFoundError)
                                  else ImageDecodeError(message, [path]))
                    return None, batch, kept, None
                continue
            problem = _image_format_problem(raw)
            if problem is None and with_sizes:
                size = encoded_image_size(raw)
                if size is None:
                    problem = "the image header (height, width) cannot be read"
                else:
                    size_of[sample] = size
            if problem is not None:
                bad.append(sample)
                reasons.append(f"{path}: {problem}")
                if self.on_error == "raise":
                    self.error = ImageDecodeError(f"cannot decode {path}: {problem} (sample {sample}); pass "
                                                  "on_error='skip' to skip undecodable samples and count them",
                                                  [path])
                    return None, batch, kept, None
                continue
            raw_of[sample] = raw
        if bad:
            self.skip(bad, reasons)
            batch, _, kept = _drop_samples(batch, np.array(bad, dtype=np.int64))
        ids = batch.ids.tolist()
        sizes = np.array([size_of[s] for s in ids], dtype=np.int64).reshape(-1, 2) if with_sizes else None
        # the naive plan lists a partner twice on purpose: it is decoded twice
        return [raw_of[s] for s in ids], batch, kept, sizes


def _pil_problem(path: str) -> str | None:
    """Why PIL cannot fully decode ``path``, or None if it can (the independent check used
    to name the file behind a DALI decoding failure)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _dali_problems(paths: Sequence[str], device: str, device_id: int | None) -> dict[str, str]:
    """The files among ``paths`` that DALI's own decoder refuses, each with DALI's reason.

    The second check behind a DALI decoding failure, for files that PIL decodes but DALI does
    not (e.g. a damaged marker libjpeg tolerates): each file is decoded whole, one per run, by
    a one-image pipeline on the loader's device, rebuilt only after a failure."""
    from nvidia.dali import fn, pipeline_def, types

    from mixnn_fast.pipeline.dali_pipelines import _decoder_device

    pending = list(paths)

    def next_file():
        return [np.fromfile(pending[0], dtype=np.uint8)]

    @pipeline_def(batch_size=1, num_threads=1, device_id=device_id, prefetch_queue_depth=1)
    def decode_one():
        encoded = fn.external_source(source=next_file, batch=True, dtype=types.UINT8, ndim=1)
        return fn.decoders.image(encoded, device=_decoder_device(device), output_type=types.RGB)

    problems: dict[str, str] = {}
    pipe = None
    while pending:
        if pipe is None:
            pipe = decode_one()
            pipe.build()
        try:
            pipe.run()
        except RuntimeError as err:
            problems[pending[0]] = f"DALI cannot decode it ({_dali_reason(err)})"
            pipe = None  # a failed pipeline is not reused
        pending.pop(0)
    return problems


def _dali_reason(err: BaseException) -> str:
    """The informative line of a DALI error (the one after "encountered:")."""
    lines = [line.strip() for line in str(err).splitlines()]
    for i, line in enumerate(lines):
        if line == "encountered:":
            rest = [x for x in lines[i + 1:] if x]
            if rest:
                return rest[0]
    return next((x for x in lines if x), type(err).__name__)


def _resolve_device(device: str, device_id: int | None) -> tuple[str, int | None]:
    if device == "auto":
        device = "gpu" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device: must be 'auto', 'cpu' or 'gpu', got {device!r}")
    if device == "gpu":
        if not torch.cuda.is_available():
            raise ValueError("device: 'gpu' was asked for but torch sees no CUDA device")
        return device, torch.cuda.current_device() if device_id is None else device_id
    return device, None  # DALI's CPU-only mode


def _check_positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------------------------
# resizing DALI's decoded windows on the host

RESIZE_BACKENDS = ("auto", "dali", "torch")
#: torch intra-op threads while resizing: one image per call is too little work to share,
#: and DALI's workers hold the other cores.
HOST_RESIZE_THREADS = 1


def resize_windows(windows, mirror, size: int, out: torch.Tensor) -> torch.Tensor:
    """Resize each decoded window to (size, size), antialiased bilinear, into ``out``.

    Args:
        windows: a DALI CPU TensorList of M uint8 HWC images of any sizes (read in place,
            through DLPack).
        mirror: (M,) flags, nonzero = flip horizontally after resizing; or None.
        size: output side.
        out: (>= M, size, size, C) uint8 contiguous; ``out[:M]`` is written and returned.
    """
    upsample = torch.ops.aten._upsample_bilinear2d_aa.out
    threads = torch.get_num_threads()
    if threads != HOST_RESIZE_THREADS:
        torch.set_num_threads(HOST_RESIZE_THREADS)
    try:
        for i in range(len(windows)):
            src = torch.from_dlpack(windows[i]).permute(2, 0, 1).unsqueeze(0)  # (1, C, h, w), channels-last
            dst = out[i].permute(2, 0, 1).unsqueeze(0)  # this image's slot, also channels-last: written in place
            result = upsample(src, [size, size], False, None, None, out=dst)
            if result.data_ptr() != dst.data_ptr():  # the kernel chose its own buffer
                dst.copy_(result)
            if mirror is not None and mirror[i]:
                out[i].copy_(out[i].flip(1))
    finally:
        if threads != HOST_RESIZE_THREADS:
            torch.set_num_threads(threads)
    return out[:len(windows)]


def _resolve_resize_backend(backend: str, device: str) -> str:
    """"auto" -> "torch" on the CPU, "dali" on a GPU; ValueError for unknown names or "torch" on a GPU."""
    if backend not in RESIZE_BACKENDS:
        raise ValueError(f"resize_backend: must be one of {RESIZE_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "dali" if device == "gpu" else "torch"
    if backend == "torch" and device == "gpu":
        raise ValueError("resize_backend: 'torch' resizes host images; with device='gpu' use 'dali' or 'auto'")
    return backend


_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)  # private; without it, no recycling
#: fresh batch buffers (copy=True) remembered per kind, to be recycled once nobody holds them
RECYCLED_BUFFERS = 4


def _unreferenced(buf: torch.Tensor) -> bool:
    """True when nothing but ``buf`` itself (no tensor, view, NumPy array...) uses its storage."""
    if _storage_use_count is None:
        return False
    storage = buf.untyped_storage()
    return _storage_use_count(storage._cdata) <= 2  # ``buf`` and the temporary ``storage`` object


# ---------------------------------------------------------------------------------------------
# loaders


class _DaliLoader:
    """What the training and evaluation loaders share: the feeder, the pipeline's life
    cycle, the output conversion and the error handling."""

    def __init__(self, description: DatasetDescription, batch_size: int, *, num_threads: int, device: str,
                 device_id: int | None, seed: int, shard_id: int, num_shards: int, on_error: str,
                 prefetch_queue_depth: int, mean, std, normalize_in_pipeline: bool, layout: str, copy: bool,
                 resize_backend: str):
        if not isinstance(description, DatasetDescription):
            raise TypeError(f"description: expected a DatasetDescription, got {type(description).__name__}")
        self.description = description
        self.batch_size = _check_positive_int(batch_size, "batch_size")
        self.num_threads = _check_positive_int(num_threads, "num_threads")
        self.prefetch_queue_depth = _check_positive_int(prefetch_queue_depth, "prefetch_queue_depth")
        self.num_shards = _check_positive_int(num_shards, "num_shards")
        if isinstance(shard_id, bool) or not isinstance(shard_id, (int, np.integer)) \
                or not 0 <= shard_id < self.num_shards:
            raise ValueError(f"shard_id: must be an integer in [0, {self.num_shards}), got {shard_id!r}")
        self.shard_id = int(shard_id)
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error: must be 'raise' or 'skip', got {on_error!r}")
        self.seed = _check_positive_int(seed, "seed", minimum=0)
        self.device, self.device_id = _resolve_device(device, device_id)
        self.resize_backend = _resolve_resize_backend(resize_backend, self.device)
        channels = 3 if not description.in_memory else description.images.shape[3]
        for name, value in (("mean", mean), ("std", std)):
            if value is not None and len(value) != channels:
                raise ValueError(f"{name}: expected {channels} values (one per channel), got {len(value)}")
        self.mean = None if mean is None else [float(v) for v in mean]
        self.std = None if std is None else [float(v) for v in std]
        self.normalize_in_pipeline = bool(normalize_in_pipeline)
        if layout not in ("NHWC", "NCHW"):
            raise ValueError(f"layout: must be 'NHWC' or 'NCHW', got {layout!r}")
        self.layout = layout
        self.copy = bool(copy)
        self._feeder = _Feeder(description, on_error)
        self._pipe = None
        self._pipe_batch = 0
        self._pipe_clean = False  # True when the pipeline ended its last epoch normally
        self._buffers: dict[str, torch.Tensor] = {}  # reused host-resize outputs (copy=False)
        self._handed: dict[str, list[torch.Tensor]] = {}  # batches handed out with copy=True, for recycling

    # --- public ---------------------------------------------------------------------------

    @property
    def on_error(self) -> str:
        return self._feeder.on_error

    @property
    def skipped(self) -> dict[int, str]:
        """Samples skipped so far (``on_error="skip"``): sample id -> reason."""
        return dict(self._feeder.skipped)

    @property
    def skipped_anchors(self) -> int:
        """Anchors dropped because their own image could not be decoded (an unreadable partner
        is replaced by the anchor itself, not counted here)."""
        return self._feeder.skipped_anchors

    def close(self) -> None:
        """Release the DALI pipeline (it is rebuilt on the next iteration)."""
        self._pipe = None

    # --- to be provided by subclasses ---------------------------------------------------------

    def _epoch_plan(self) -> tuple[EpochPlan, int]:
        """The plan the next iteration runs and the position in it to start from."""
        raise NotImplementedError

    def _pipeline(self) -> tuple[Callable, dict]:
        """The ``@pipeline_def`` function and its processing arguments."""
        raise NotImplementedError

    def _max_batch(self, plan: EpochPlan) -> int:
        raise NotImplementedError

    def _resize_outside(self) -> bool:
        """True when DALI stops before the resize and the loader resizes (see the module docstring)."""
        return self.resize_backend == "torch" and not self.description.in_memory

    # --- machinery ------------------------------------------------------------------------

    def _build(self, max_batch: int):
        pipeline_fn, args = self._pipeline()
        if self._resize_outside():
            args = dict(args, resize_outside=True)
        pipe = pipeline_fn(self._feeder, encoded=not self.description.in_memory, device=self.device,
                           mean=self.mean if self.normalize_in_pipeline else None,
                           std=self.std if self.normalize_in_pipeline else None, layout=self.layout[1:], **args,
                           batch_size=max_batch, num_threads=self.num_threads, device_id=self.device_id,
                           # no operator of these pipelines draws from DALI's RNG (the training
                           # augmentations come from the feeder); a fixed seed all the same
                           seed=self.seed, prefetch_queue_depth=self.prefetch_queue_depth)
        pipe.build()
        self._pipe, self._pipe_batch = pipe, max_batch
        return pipe

    def _pipeline_for(self, plan: EpochPlan):
        max_batch = self._max_batch(plan)
        if self._pipe is not None and self._pipe_clean and max_batch <= self._pipe_batch:
            self._pipe.reset()  # the previous epoch ended with StopIteration: reusable
            self._pipe_clean = False
            return self._pipe
        self._pipe = None  # abandoned mid-epoch, or too small: start afresh
        return self._build(max_batch)

    def _to_torch(self, output) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        dense = output.as_tensor()
        if not self.copy:
            # A view of DALI's output buffer (DLPack, no copy): valid until the next batch.
            return torch.from_dlpack(dense)
        if self.device == "gpu":
            target = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=f"cuda:{self.device_id}")
        else:
            target = self._fresh("dali", tuple(dense.shape()), to_torch_type[dense.dtype])
        stream = torch.cuda.current_stream(target.device) if self.device == "gpu" else None
        feed_ndarray(dense, target, cuda_stream=stream)
        return target

    def _fresh(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, capacity: int | None = None
               ) -> torch.Tensor:
        """A host tensor no one else holds: an earlier batch's, once every reference to it
        (the batch, views of it, arrays sharing it) is gone, else a new one.  Recycling
        saves the page faults of a new ~10-40 MB allocation per batch."""
        handed = self._handed.setdefault(name, [])
        for buf in handed:
            if buf.dtype == dtype and buf.shape[1:] == shape[1:] and len(buf) >= shape[0] and _unreferenced(buf):
                return buf[:shape[0]]
        rows = max(shape[0], self._pipe_batch if capacity is None else capacity)  # room for any batch
        buf = torch.empty((rows,) + shape[1:], dtype=dtype)
        handed.append(buf)
        if len(handed) > RECYCLED_BUFFERS:
            handed.pop(0)
        return buf[:shape[0]]

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, handed_out: bool = True) -> torch.Tensor:
        """A host buffer for one batch: with ``copy=True`` and when it is handed out, one no
        one else holds (:meth:`_fresh`: batches can be kept), else one reused buffer (valid
        until the next batch, like DALI's own buffers)."""
        if self.copy and handed_out:
            return self._fresh(name, shape, dtype)
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.shape[1:] != shape[1:] or len(buf) < shape[0]:
            buf = self._buffers[name] = torch.empty((max(shape[0], self._pipe_batch),) + shape[1:], dtype=dtype)
        return buf[:shape[0]]

    def _images(self, outputs) -> torch.Tensor:
        """The pipeline's outputs -> the batch's images tensor."""
        if not self._resize_outside():
            return self._to_torch(outputs[0])
        windows = outputs[0]
        mirror = outputs[1].as_array() if len(outputs) > 1 else None
        m, size = len(windows), self.size
        final = not self.normalize_in_pipeline and self.layout == "NHWC"  # the resized images are the batch
        images = resize_windows(windows, mirror, size,
                                self._buffer("resized", (m, size, size, 3), torch.uint8, handed_out=final))
        if final:
            return images
        # what DALI's crop_mirror_normalize would do: normalise and/or transpose, here with the
        # fused mixer (K = 0, weight 1: one pass, exact for uint8)
        from mixnn_fast.mix.mixer import mix_images

        normalise = self.normalize_in_pipeline and (self.mean is not None or self.std is not None)
        dtype = torch.float32 if normalise else torch.uint8
        shape = (m, 3, size, size) if self.layout == "NCHW" else (m, size, size, 3)
        slots = torch.arange(m)
        return mix_images(images, slots, slots[:, None][:, :0], torch.ones(m, 1), in_layout="NHWC",
                          mean=self.mean if normalise else None, std=self.std if normalise else None,
                          out_layout=self.layout, out_dtype=dtype, out=self._buffer("final", shape, dtype),
                          num_threads=HOST_RESIZE_THREADS)

    def _make_batch(self, images: torch.Tensor, batch: PlanBatch, position: int) -> LoaderBatch:
        ids = torch.from_numpy(np.ascontiguousarray(batch.ids))
        anchors = torch.from_numpy(np.ascontiguousarray(batch.anchor_slots))
        partners = torch.from_numpy(np.ascontiguousarray(batch.partner_slots))
        labels = torch.from_numpy(self.description.labels[batch.ids[batch.anchor_slots]])
        normalised = self.normalize_in_pipeline
        return LoaderBatch(images=images, ids=ids, anchor_slots=anchors, partner_slots=partners, labels=labels,
                           index=batch.index, position=position, mean=None if normalised else self.mean,
                           std=None if normalised else self.std, layout=self.layout,
                           recycle=self._recycle_mixed if self.device == "cpu" else None)

    def _recycle_mixed(self, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """Mixer outputs (B anchors per batch) for :meth:`LoaderBatch.mix`."""
        return self._fresh(name, tuple(shape), dtype, capacity=self.batch_size)

    def _decode_failure(self, err: RuntimeError) -> None:
        """DALI failed a batch: name the files (raise) or mark them and rewind (skip)."""
        served = list(self._feeder.served)
        self._pipe = None  # a failed DALI pipeline is not reused
        if not served or self.description.in_memory:  # nothing to blame on a file
            raise err
        paths = self.description.paths
        culprits, reasons = [], []
        for _, batch in served:  # the failing batch is the oldest served; check its successors too
            for sample in np.unique(batch.ids).tolist():
                problem = _pil_problem(paths[sample])
                if problem is not None and sample not in culprits:
                    culprits.append(sample)
                    reasons.append(f"{paths[sample]}: {problem}")
        first_line = _dali_reason(err)
        if not culprits:  # PIL decodes them all: ask DALI's decoder about each file alone
            suspects = list(dict.fromkeys(s for _, batch in served for s in np.unique(batch.ids).tolist()))
            refused = _dali_problems([paths[s] for s in suspects], self.device, self.device_id)
            for sample in suspects:
                if paths[sample] in refused:
                    culprits.append(sample)
                    reasons.append(f"{paths[sample]}: {refused[paths[sample]]}")
        if not culprits:
            names = ", ".join(paths[s] for s in served[0][1].ids[:5].tolist())
            raise RuntimeError(f"DALI failed on batch {served[0][1].index} (files {names}, ...) and PIL decodes all "
                               f"of them; DALI said: {first_line}") from err
        if self.on_error == "raise":
            raise ImageDecodeError(f"cannot decode {'; '.join(reasons)} (DALI: {first_line}); pass "
                                   "on_error='skip' to skip undecodable samples and count them",
                                   [paths[s] for s in culprits]) from err
        self._feeder.skip(culprits, reasons)
        self._feeder.rewind(served[0][0])  # replay from the failed batch

    def __iter__(self) -> Iterator[LoaderBatch]:
        plan, start = self._epoch_plan()
        if start >= len(plan):
            return  # resumed at the end of the epoch (or an empty plan): nothing to decode
        self._feeder.start(plan, start)
        pipe = self._pipeline_for(plan)
        finished = False
        try:
            while True:
                try:
                    outputs = pipe.run()
                except StopIteration:
                    if self._feeder.error is not None:
                        error, self._feeder.error = self._feeder.error, None
                        self._pipe = None
                        raise error from None
                    finished = True
                    return
                except RuntimeError as err:
                    self._decode_failure(err)  # raises, or rewinds the feeder for a replay
                    pipe = self._build(self._pipe_batch or self._max_batch(plan))
                    continue
                position, batch = self._feeder.served.popleft()
                yield self._make_batch(self._images(outputs), batch, position)
        finally:
            # A pipeline left mid-epoch still holds prefetched batches: rebuild next time.
            self._pipe_clean = finished
            if not finished:
                self._pipe = None


class MixNNLoader(_DaliLoader):
    """Training batches of an epoch plan, decoded and augmented by DALI.

    Args:
        description: the data set (``paths`` of JPEG/PNG files, or ``images`` in memory).
        batch_size: anchors per batch.
        neighbours: (N, K) int64 partners of every sample (None for "plain"/"in_batch");
            replace after each refresh with :meth:`set_neighbours`.
        mode: the plan, "coherent" | "naive" | "plain" | "in_batch" (see
            :mod:`mixnn_fast.pipeline.plan`).
        anchor_ids: the anchors of each epoch: None (all samples), an int array, or a
            callable ``epoch -> int array`` (e.g. Clothing1M's balanced draw).
        seed: seeds the plans (``[seed, epoch]``) and the augmentations (``[seed, epoch,
            batch index]``, see :mod:`mixnn_fast.pipeline.augment_params`).  Use the same
            seed in every process: the shards split one common plan, and a batch gets the
            same augmentations whichever shard decodes it.
        drop_last: drop each epoch's final partial batch.
        size: output side of the random-resized crop (encoded images).
        area, aspect_ratio: random-resized-crop ranges (relative area, width/height), drawn
            as torchvision's ``RandomResizedCrop`` does.
        pad: pad-and-crop shift for in-memory images (pixels, each side).
        flip: random horizontal flips.
        mean, std: per-channel statistics in 0-255 units; applied by :meth:`LoaderBatch.mix`
            (or by DALI with ``normalize_in_pipeline=True``, images then float32).
        layout: "NHWC" (default; what the mixer reads fastest) or "NCHW" images.
        num_threads: DALI worker threads.
        device: "auto" (GPU when torch sees one), "cpu" or "gpu".
        shard_id, num_shards: this process's share of every epoch's batches.
        on_error: "raise" or "skip" (see the module docstring).
        prefetch_queue_depth: batches DALI prepares ahead.
        copy: True (default) copies each batch out of DALI's buffers, so batches can be kept;
            False hands out views of them (no copy), valid only until the next batch is
            requested -- enough for ``batch.mix(...)`` or a forward/backward step.  (With
            the host resize: False reuses one output buffer.)  True recycles the buffer of
            an earlier batch once nothing refers to it any more (on the CPU).
        resize_backend: who resizes the random-resized crops of encoded images: "dali"
            (``fn.resize`` in the pipeline), "torch" (DALI decodes the random windows, the
            loader resizes them on the host; CPU only) or "auto" (default: "torch" on the
            CPU, "dali" on a GPU).  Same augmentation either way (see the module docstring).

    Iterating yields :class:`LoaderBatch` es; each ``iter()`` runs the next epoch (or the
    one given to :meth:`set_epoch`, from the batch given there).  ``len(loader)`` is the
    number of batches of that epoch's plan on this shard, whatever batch it starts from.
    """

    def __init__(self, description: DatasetDescription, batch_size: int, *, neighbours=None,
                 mode: str = "coherent", anchor_ids=None, seed: int = 0, drop_last: bool = False,
                 size: int = 224, area: Sequence[float] = (0.08, 1.0), aspect_ratio: Sequence[float] = (3 / 4, 4 / 3),
                 pad: int = 4, flip: bool = True, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, normalize_in_pipeline: bool = False, layout: str = "NHWC",
                 num_threads: int = 2, device: str = "auto", device_id: int | None = None, shard_id: int = 0,
                 num_shards: int = 1, on_error: str = "raise", prefetch_queue_depth: int = 2, copy: bool = True,
                 resize_backend: str = "auto"):
        super().__init__(description, batch_size, num_threads=num_threads, device=device, device_id=device_id,
                         seed=seed, shard_id=shard_id, num_shards=num_shards, on_error=on_error,
                         prefetch_queue_depth=prefetch_queue_depth, mean=mean, std=std,
                         normalize_in_pipeline=normalize_in_pipeline, layout=layout, copy=copy,
                         resize_backend=resize_backend)
        from mixnn_fast.pipeline.plan import MODES

        if mode not in MODES:
            raise ValueError(f"mode: must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.drop_last = bool(drop_last)
        self.size = _check_positive_int(size, "size")
        self.pad = _check_positive_int(pad, "pad", minimum=0)
        self.area = tuple(float(a) for a in area)
        self.aspect_ratio = tuple(float(a) for a in aspect_ratio)
        if not 0 < self.area[0] <= self.area[1] <= 1:
            raise ValueError(f"area: must be 0 < low <= high <= 1, got {area}")
        if not 0 < self.aspect_ratio[0] <= self.aspect_ratio[1]:
            raise ValueError(f"aspect_ratio: must be 0 < low <= high, got {aspect_ratio}")
        self.flip = bool(flip)
        self._feeder.augment = (ShiftFlip(self.pad, self.flip) if description.in_memory
                                else CropFlip(self.area, self.aspect_ratio, self.flip))
        self._feeder.seed = self.seed
        self._anchor_ids = anchor_ids
        self._neighbours = None
        self._cached: tuple[int, EpochPlan] | None = None
        self.set_neighbours(neighbours)
        self.epoch = 0
        self.start_batch = 0  # where the next iteration starts in its plan
        self.plan: EpochPlan | None = None  # the current epoch's plan (this shard's batches)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The epoch the next iteration runs, and the position in this shard's plan it
        starts from.

        The iteration then yields batches ``start_batch, ..., len(loader) - 1`` of
        ``epoch``'s plan, identical (images and augmentations, pixel for pixel) to those
        of an uninterrupted pass: resume with ``start_batch = batch.position + 1`` of the
        last batch consumed.  The batches before ``start_batch`` are neither read nor decoded.
        ``start_batch = len(loader)`` yields nothing (the epoch is complete).  The
        iteration after that starts at the beginning of ``epoch + 1``.

        Args:
            epoch: int >= 0 (plans are seeded by ``[seed, epoch]``).
            start_batch: int, 0 <= start_batch <= len(plan); the upper bound is checked
                when the iteration starts (the plan may still change: neighbours, anchors),
                with a ValueError naming ``start_batch``.
        """
        epoch = _check_positive_int(epoch, "epoch", minimum=0)
        if isinstance(start_batch, bool) or not isinstance(start_batch, (int, np.integer)) or start_batch < 0:
            raise ValueError(f"start_batch: must be an integer >= 0, got {start_batch!r}")
        self.epoch, self.start_batch = epoch, int(start_batch)

    def set_neighbours(self, neighbours) -> None:
        """Partners for the next epochs: (N, K) int64 (checked when the plan is made)."""
        if neighbours is not None:
            neighbours = np.asarray(neighbours)
            if neighbours.ndim != 2 or neighbours.shape[0] != len(self.description):
                raise ValueError(f"neighbours: expected shape ({len(self.description)}, K), got {neighbours.shape}")
        self._neighbours = neighbours
        self._cached = None

    def set_anchor_ids(self, anchor_ids) -> None:
        """Anchors of the next epochs: None (all), an int array, or ``epoch -> int array``."""
        self._anchor_ids = anchor_ids
        self._cached = None

    def _anchors(self, epoch: int) -> np.ndarray:
        ids = self._anchor_ids(epoch) if callable(self._anchor_ids) else self._anchor_ids
        return np.arange(len(self.description), dtype=np.int64) if ids is None else np.asarray(ids)

    def make_plan(self, epoch: int) -> EpochPlan:
        """This shard's plan for ``epoch`` (what iterating that epoch will load); the last
        one is cached until the neighbours or anchors change."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        plan = plan_epoch(self._anchors(epoch), self._neighbours, self.batch_size, mode=self.mode, seed=self.seed,
                          epoch=epoch, num_samples=len(self.description), drop_last=self.drop_last)
        plan = plan.shard(self.shard_id, self.num_shards)
        self._cached = (epoch, plan)
        return plan

    def _epoch_plan(self) -> tuple[EpochPlan, int]:
        plan = self.make_plan(self.epoch)
        start = self.start_batch
        if start > len(plan):
            raise ValueError(f"start_batch: {start} is past the end of epoch {self.epoch}, whose plan has "
                             f"{len(plan)} batches on this shard (0 <= start_batch <= {len(plan)})")
        self.plan = plan
        self.epoch += 1
        self.start_batch = 0
        return plan, start

    def __len__(self) -> int:
        """Batches in the next epoch's plan on this shard (computes the plan); counts the
        batches before ``start_batch`` too (the iteration yields ``len - start_batch``,
        fewer when ``on_error="skip"`` empties a batch)."""
        return len(self.make_plan(self.epoch))

    def _max_batch(self, plan: EpochPlan) -> int:
        k = self._neighbours.shape[1] if (self._neighbours is not None and self.mode in ("coherent", "naive")) else 0
        return max(self.batch_size * (1 + k), plan.max_decoded)

    def _pipeline(self) -> tuple[Callable, dict]:
        from mixnn_fast.pipeline.dali_pipelines import train_pipeline  # DALI is imported here, not before

        shape = self.description.images.shape[1:] if self.description.in_memory else None
        return train_pipeline, dict(size=self.size, image_shape=shape, pad=self.pad, flip=self.flip)


class EvalLoader(_DaliLoader):
    """Evaluation batches in data-set order, no augmentation (the refresh pass).

    Encoded images: shorter side resized to ``resize`` (default ``round(crop / 0.875)``),
    central ``crop`` window.  In-memory images: the central ``crop`` window, or unchanged
    when ``crop`` is None.  Batches are plain (``partner_slots`` (B, 0)); ``ids`` says which
    samples they hold (every sample once, minus skipped ones).  ``ids`` restricts the pass
    to a subset (in the given order).  With several shards each process gets every
    ``num_shards``-th batch, unpadded.

    ``resize_backend`` (encoded images): "dali" resizes in the pipeline; "torch" has DALI
    decode only the central window the view shows (ROI decoding) and resizes it to
    (crop, crop) on the host, as :class:`MixNNLoader` does its random windows (within
    about a source pixel of alignment and rounding of the DALI view; CPU only, needs
    crop <= resize); "auto" (default) is "torch" on the CPU, "dali" on a GPU.
    """

    def __init__(self, description: DatasetDescription, batch_size: int, *, ids=None, crop: int | None = None,
                 resize: int | None = None, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 normalize_in_pipeline: bool = False, layout: str = "NHWC", num_threads: int = 2,
                 device: str = "auto", device_id: int | None = None, shard_id: int = 0, num_shards: int = 1,
                 on_error: str = "raise", prefetch_queue_depth: int = 2, copy: bool = True,
                 resize_backend: str = "auto"):
        super().__init__(description, batch_size, num_threads=num_threads, device=device, device_id=device_id,
                         seed=0, shard_id=shard_id, num_shards=num_shards, on_error=on_error,
                         prefetch_queue_depth=prefetch_queue_depth, mean=mean, std=std,
                         normalize_in_pipeline=normalize_in_pipeline, layout=layout, copy=copy,
                         resize_backend=resize_backend)
        if not description.in_memory and crop is None:
            crop = 224
        self.crop = None if crop is None else _check_positive_int(crop, "crop")
        if description.in_memory and self.crop is not None and self.crop > min(description.images.shape[1:3]):
            raise ValueError(f"crop: {crop} is larger than the images {description.images.shape[1:3]}")
        if resize is None and not description.in_memory:
            resize = int(round(self.crop / 0.875))
        self.resize = None if resize is None else _check_positive_int(resize, "resize")
        self.ids = None if ids is None else np.asarray(ids)
        if self._resize_outside() and self.crop > self.resize:
            if resize_backend == "torch":
                raise ValueError(f"resize_backend: 'torch' resizes the central window, which needs crop <= resize; "
                                 f"got crop={self.crop}, resize={self.resize}")
            self.resize_backend = "dali"
        self.size = self.crop  # the side of the host-resized views

    def make_plan(self) -> EpochPlan:
        order = np.arange(len(self.description), dtype=np.int64) if self.ids is None else self.ids
        plan = plan_epoch(order, None, self.batch_size, mode="plain", shuffle=False,
                          num_samples=len(self.description))
        return plan.shard(self.shard_id, self.num_shards, pad=False)

    def _epoch_plan(self) -> tuple[EpochPlan, int]:
        return self.make_plan(), 0

    def __len__(self) -> int:
        return len(self.make_plan())

    def _max_batch(self, plan: EpochPlan) -> int:
        return self.batch_size

    def _pipeline(self) -> tuple[Callable, dict]:
        from mixnn_fast.pipeline.dali_pipelines import eval_pipeline

        return eval_pipeline, dict(resize=self.resize, crop=self.crop)

    def _host_path(self) -> bool:
        """In-memory uint8 images read whole on the CPU: the evaluation transform is only the
        normalisation, which :meth:`LoaderBatch.mix` fuses with the layout change, so the
        batches are slices of the array and DALI is not involved.  Why: on 28×28 images the
        pipeline round trip cost as much as the model's forward pass (bench/epoch.py)."""
        images = self.description.images
        return (images is not None and self.device == "cpu" and not self.normalize_in_pipeline
                and self.layout == "NHWC" and (self.crop is None or self.crop == min(images.shape[1:3])
                                              and images.shape[1] == images.shape[2]))

    def __iter__(self) -> Iterator[LoaderBatch]:
        if not self._host_path():
            yield from super().__iter__()
            return
        images = self.description.images
        plan, _ = self._epoch_plan()
        for b in range(len(plan)):
            batch = plan[b]
            ids = batch.ids
            if len(ids) and ids[-1] - ids[0] == len(ids) - 1 and bool(np.all(np.diff(ids) == 1)):
                block = images[ids[0]:ids[-1] + 1]  # consecutive ids (the usual in-order pass): a view
            else:
                block = images[ids]
            if not block.flags.writeable:  # torch.from_numpy wants a writeable array
                block = block.copy()
            yield self._make_batch(torch.from_numpy(np.ascontiguousarray(block)), batch, b)
