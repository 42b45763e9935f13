"""The feeder: an epoch plan's batches, read and served to DALI's external source, and the
policy for images that cannot be read or decoded.

How batches stay aligned with their metadata: DALI calls the feeder (the external source)
in batch order, ``prefetch_queue_depth`` batches ahead of the consumer.  The feeder appends
each batch it serves to a FIFO (``served``), and each pipeline output pops the oldest entry.
A batch's augmentation parameters are further outputs of the same feeder call as its images,
so they travel through DALI together and need no queue of their own.  The feeder never
raises an error itself (it would surface on an earlier, prefetching ``run()`` and misalign
the queue): a file it cannot read ends the feeding there, the batches before it are
delivered, and then the error is raised.  The host path (in-memory arrays,
:mod:`mixnn_fast.pipeline.host_batches`) calls :meth:`Feeder.serve` itself, one batch at a
time, so both paths see the same batches, skipped samples and augmentation parameters.

Bad images (``LoaderOptions.on_error``): "raise" (default) raises an error naming the file
when its batch is reached; "skip" loses that image only and counts it (``loader.skipped``:
id -> reason, ``loader.skipped_anchors``): as an anchor it is dropped (with its row of mixing
weights), and an anchor whose partner it was is mixed with itself in its place (its weights
row is kept: ``λ x + β x = x``).  Missing files, empty files, bytes that are not an image
format and (training views of encoded images) headers whose size cannot be read are caught
while reading (:meth:`Feeder._read`); images that start right but do not decode (truncated,
corrupt) make DALI fail the batch, and the loader then names the culprit with
:func:`name_culprits` -- each of the batch's files decoded alone by PIL, and for files PIL
reads but DALI does not, by DALI alone -- rebuilds the pipeline and (when skipping) replays
the batch without it.  The replayed batches get the same augmentations, and a skipped image
does not change those of the others in its batch.
"""
from __future__ import annotations

import collections
import logging
from typing import Sequence

import numpy as np

from mixnn_fast.data.description import DatasetDescription
from mixnn_fast.pipeline.augment_params import CropFlip, ShiftFlip, encoded_image_size
from mixnn_fast.pipeline.plan import EpochPlan, PlanBatch

log = logging.getLogger(__name__)

__all__ = ["ImageDecodeError", "Feeder", "drop_samples", "image_format_problem", "name_culprits"]

# Leading bytes of the formats DALI decodes (JPEG, PNG, BMP, GIF, TIFF, WebP, PNM, JPEG 2000).
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"GIF8", b"II*\x00", b"MM\x00*",
          b"\x00\x00\x00\x0cjP  ", b"\xff\x4f\xff\x51", b"P1", b"P2", b"P3", b"P4", b"P5", b"P6")



class ImageDecodeError(ValueError):
    """An image could not be read or decoded; ``paths`` lists the files."""

    def __init__(self, message: str, paths: Sequence[str] = ()):
        super().__init__(message)
        self.paths = list(paths)



def drop_samples(batch: PlanBatch, bad: np.ndarray) -> tuple[PlanBatch, int, np.ndarray]:
    """``batch`` without the ids in ``bad``: anchors among them are dropped, with their rows of
    ``weights``; an anchor whose partner is among them keeps training, mixed with itself in
    that partner's place (``λ x + β x = x``, and its targets likewise; its weights row is kept),
    so only the unreadable image is lost.  Returns (batch, number of anchors dropped, (M',)
    int64 the kept slots: positions in ``batch.ids`` of the new batch's ids)."""
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
    weights = None if batch.weights is None else batch.weights[keep]
    return (PlanBatch(batch.index, batch.ids[used], renumber[a_slots], renumber[p_slots], weights),
            int((~keep).sum()), np.flatnonzero(used))


def image_format_problem(raw: np.ndarray) -> str | None:
    """Why these bytes cannot be an image DALI decodes (cheap: size and magic number only)."""
    if not len(raw):
        return "empty file"
    head = raw[:12].tobytes()
    if any(head.startswith(m) for m in _MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return None
    return "not a recognised image format"


class Feeder:
    """The external source's callable: serves the plan's batches in order (see the
    module docstring for the FIFO ``served`` and the error policy).

    ``served`` holds (position in the plan, the batch as served: without skipped samples,
    its ``weights`` rows following its anchors).

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
        served = self.serve()
        if served is None:
            raise StopIteration
        data, params = served
        return data if self.augment is None else (data, *params)

    def serve(self, gather: bool = True) -> tuple[object, tuple[np.ndarray, ...]] | None:
        """The next batch of the plan: appended to ``served`` and returned as (its data, its
        augmentation parameters), or None at the end of the plan (or after an error, which is
        then in ``error``).

        Args:
            gather: False (in-memory images only): the data is not gathered (None); the
                caller reads ``images[batch.ids]`` itself (the host path writes them
                straight into its batch buffer).

        The data: file bytes (a list of 1-D uint8 arrays) or ``images[batch.ids]`` (M, H, W, C)
        uint8; the parameters: ``augment.params(...)`` (empty without ``augment``)."""
        while True:
            if self.plan is None or self.error is not None or self.cursor >= len(self.plan):
                return None
            position = self.cursor
            self.cursor += 1
            planned = self.plan[position]
            batch = planned
            slots = np.arange(len(planned.ids))  # each served image's slot in the planned batch
            if self.skipped:
                batch, _, slots = drop_samples(batch, np.fromiter(self.skipped, dtype=np.int64))
            sizes = None
            if self.description.in_memory:
                data = self.description.images[batch.ids] if gather and len(batch) else None
            else:
                data, batch, kept, sizes = self._read(batch, with_sizes=self.augment is not None)
                slots = slots[kept]
            if self.error is None:
                self._dropped[position] = len(planned) - len(batch)
            if self.error is not None or not len(batch):
                continue  # every anchor skipped, or an error ends the epoch here
            self.served.append((position, batch))
            if self.augment is None:
                return data, ()
            # Slots of the *planned* batch: an image keeps its augmentation when others
            # of its batch are skipped.
            return data, self.augment.params(self.seed, self.plan.epoch, planned.index, len(planned.ids), slots,
                                             sizes)

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
            problem = image_format_problem(raw)
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
            batch, _, kept = drop_samples(batch, np.array(bad, dtype=np.int64))
        ids = batch.ids.tolist()
        sizes = np.array([size_of[s] for s in ids], dtype=np.int64).reshape(-1, 2) if with_sizes else None
        # the naive plan lists a partner twice on purpose: it is decoded twice
        return [raw_of[s] for s in ids], batch, kept, sizes


def pil_problem(path: str) -> str | None:
    """Why PIL cannot fully decode ``path``, or None if it can (the independent check used
    to name the file behind a DALI decoding failure)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def dali_problems(paths: Sequence[str], device: str, device_id: int | None) -> dict[str, str]:
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
            problems[pending[0]] = f"DALI cannot decode it ({dali_reason(err)})"
            pipe = None  # a failed pipeline is not reused
        pending.pop(0)
    return problems


def dali_reason(err: BaseException) -> str:
    """The informative line of a DALI error (the one after "encountered:")."""
    lines = [line.strip() for line in str(err).splitlines()]
    for i, line in enumerate(lines):
        if line == "encountered:":
            rest = [x for x in lines[i + 1:] if x]
            if rest:
                return rest[0]
    return next((x for x in lines if x), type(err).__name__)


def name_culprits(served: Sequence[tuple[int, PlanBatch]], paths: Sequence[str], device: str,
                  device_id: int | None) -> tuple[list[int], list[str]]:
    """The samples behind a DALI decoding failure, and why: (sample ids, reasons).

    ``served`` are the batches fed but not yet delivered (the failing one is the oldest;
    its successors are checked too).  Each file is decoded alone by PIL; if PIL decodes
    them all, by DALI's own decoder alone (files libjpeg tolerates and DALI does not).
    Empty lists: no file is to blame."""
    culprits, reasons = [], []
    for _, batch in served:
        for sample in np.unique(batch.ids).tolist():
            problem = pil_problem(paths[sample])
            if problem is not None and sample not in culprits:
                culprits.append(sample)
                reasons.append(f"{paths[sample]}: {problem}")
    if not culprits:  # PIL decodes them all: ask DALI's decoder about each file alone
        suspects = list(dict.fromkeys(s for _, batch in served for s in np.unique(batch.ids).tolist()))
        refused = dali_problems([paths[s] for s in suspects], device, device_id)
        for sample in suspects:
            if paths[sample] in refused:
                culprits.append(sample)
                reasons.append(f"{paths[sample]}: {refused[paths[sample]]}")
    return culprits, reasons
