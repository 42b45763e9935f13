"""Training augmentations drawn on the host: a pure function of (seed, epoch, batch, slot).

Why on the host: DALI's random operators (``fn.random.*``, ``fn.decoders.image_random_crop``)
are seeded once when a pipeline is built and their state runs on across epochs, so a run
resumed from a checkpoint -- or a pipeline rebuilt after a decoding failure or an
abandoned epoch -- would draw different augmentations from an uninterrupted run.  Here
every decoded image's parameters come from

    ``np.random.default_rng([seed, epoch, batch_index, STREAM])``, row ``slot``

where ``batch_index`` is :attr:`PlanBatch.index` (the batch's index in the unsharded epoch
plan, so the same on every shard) and ``slot`` the image's position in the planned batch's
``ids``.  Each slot takes a fixed number of uniforms (one row of a (M, columns) draw), so
its parameters do not depend on how many images the batch holds, on images dropped
before it (``on_error="skip"``), nor on which batches were decoded before: an epoch
started at batch ``s`` sees exactly the augmentations of batches ``s..`` of a full pass.
The DALI graph only applies them (:mod:`mixnn_fast.pipeline.dali_pipelines`).

Two augmentations, drawn as the DALI operators they replace drew them:

- arrays in memory: a shift uniform over [-pad, pad] on each axis (zero fill) and a
  horizontal flip with probability 1/2 (:class:`ShiftFlip`);
- encoded images: torchvision's ``RandomResizedCrop`` window (10 attempts at a
  log-uniform aspect ratio and a uniform relative area, then the central crop clamped to
  the ratio range; DALI's ``image_random_crop`` draws from the same ranges, and on
  500×400 JPEGs both gave a mean relative window area of 0.45) and a flip with
  probability 1/2 (:class:`CropFlip`).  The window needs
  each image's height and width: :func:`encoded_image_size` reads them from the file's
  header (JPEG and PNG parsed here, in a few microseconds; other formats through PIL),
  after the EXIF orientation, as DALI's decoders apply it.
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Sequence

import numpy as np

#: The last entropy word of the augmentation generators; keeps their streams apart from the
#: plans' (``default_rng([seed, epoch])``).
STREAM = 0x6175676D
#: Window attempts of the random-resized crop before the central fallback (torchvision's 10).
CROP_ATTEMPTS = 10


def slot_uniforms(seed: int, epoch: int, index: int, num_slots: int, columns: int) -> np.ndarray:
    """(num_slots, columns) float64 uniforms in [0, 1): row ``s`` is slot ``s``'s, and depends
    only on (seed, epoch, index, s) (a generator fills the rows in order, so a longer
    draw extends a shorter one)."""
    for name, value in (("seed", seed), ("epoch", epoch), ("index", index), ("num_slots", num_slots)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name}: must be an integer >= 0, got {value!r}")
    rng = np.random.default_rng([int(seed), int(epoch), int(index), STREAM])
    return rng.random((int(num_slots), columns))


def shifts_from_uniforms(u: np.ndarray, pad: int) -> np.ndarray:
    """(M, 2) uniforms -> (M, 2) int32 shifts (dy, dx), each uniform over [-pad, pad]."""
    n = 2 * pad + 1
    return (np.minimum((u * n).astype(np.int64), n - 1) - pad).astype(np.int32)


def flips_from_uniforms(u: np.ndarray) -> np.ndarray:
    """(M,) uniforms -> (M,) int32 flip flags, 1 with probability 1/2."""
    return (u < 0.5).astype(np.int32)


def crop_windows(u_area: np.ndarray, u_ratio: np.ndarray, u_pos: np.ndarray, heights, widths,
                 area: Sequence[float], aspect_ratio: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's ``RandomResizedCrop.get_params``, vectorised over a batch.

    Attempt ``k`` of image ``m`` takes relative area ``area[0] + u_area[m, k] * (area[1] -
    area[0])`` and aspect ratio (width / height) ``exp(log r0 + u_ratio[m, k] * (log r1 -
    log r0))``, rounds the window's sides to whole pixels (half to even, as Python's
    ``round``), and keeps the first attempt that fits; its top-left corner is uniform over
    the valid positions (``floor(u_pos * (H - h + 1))``, likewise x).  If none of the
    attempts fits: the whole image, clamped to the ratio range and centred.  Fed the same
    uniforms, torchvision returns the same windows, except where its fallback rounds a
    side to 0 (a sliver of an image far outside the ratio range): that side is 1 here.

    Args:
        u_area, u_ratio: (M, A) float64 uniforms in [0, 1), A attempts.
        u_pos: (M, 2) float64 uniforms in [0, 1) for the corner (y, x).
        heights, widths: (M,) int image sides in pixels (>= 1).
        area: (low, high) relative area range, 0 < low <= high <= 1.
        aspect_ratio: (low, high) width/height range, 0 < low <= high.

    Returns:
        (anchors (M, 2) int32 (y, x), shapes (M, 2) int32 (h, w)): every window lies inside
        its image and has sides >= 1.
    """
    heights = np.asarray(heights, dtype=np.int64)
    widths = np.asarray(widths, dtype=np.int64)
    if heights.shape != widths.shape or heights.ndim != 1:
        raise ValueError(f"heights, widths: expected two (M,) arrays, got {heights.shape} and {widths.shape}")
    if len(heights) and (heights.min() < 1 or widths.min() < 1):
        raise ValueError("heights, widths: image sides must be >= 1")
    m = len(heights)
    hh, ww = heights[:, None].astype(np.float64), widths[:, None].astype(np.float64)
    lo, hi = float(area[0]), float(area[1])
    target = (hh * ww) * (lo + u_area * (hi - lo))
    log_lo, log_hi = np.log(float(aspect_ratio[0])), np.log(float(aspect_ratio[1]))
    ratio = np.exp(log_lo + u_ratio * (log_hi - log_lo))
    w = np.rint(np.sqrt(target * ratio))
    h = np.rint(np.sqrt(target / ratio))
    fits = (w > 0) & (w <= ww) & (h > 0) & (h <= hh)
    found = fits.any(axis=1)
    first = fits.argmax(axis=1)
    rows = np.arange(m)
    h_win = h[rows, first].astype(np.int64)
    w_win = w[rows, first].astype(np.int64)
    y = np.minimum((u_pos[:, 0] * (heights - h_win + 1)).astype(np.int64), heights - h_win)
    x = np.minimum((u_pos[:, 1] * (widths - w_win + 1)).astype(np.int64), widths - w_win)
    if not found.all():
        # torchvision's fallback: the whole image, clamped to the ratio range, centred
        r_lo, r_hi = float(min(aspect_ratio)), float(max(aspect_ratio))
        in_ratio = widths / heights
        too_tall, too_wide = in_ratio < r_lo, in_ratio > r_hi
        fh = np.where(too_tall, np.rint(widths / r_lo), heights).astype(np.int64)
        fw = np.where(too_wide, np.rint(heights * r_hi), widths).astype(np.int64)
        # a degenerate ratio range on a tiny image could round a side to 0 or past the image
        fh, fw = np.clip(fh, 1, heights), np.clip(fw, 1, widths)
        miss = ~found
        h_win[miss], w_win[miss] = fh[miss], fw[miss]
        y[miss] = (heights[miss] - fh[miss]) // 2
        x[miss] = (widths[miss] - fw[miss]) // 2
    anchors = np.stack([y, x], axis=1).astype(np.int32)
    shapes = np.stack([h_win, w_win], axis=1).astype(np.int32)
    return anchors, shapes


@dataclass(frozen=True)
class ShiftFlip:
    """Pad-and-crop + flip for arrays in memory (the CIFAR augmentation).

    ``params(...)`` -> (shifts (M, 2) int32 (dy, dx) in [-pad, pad], flips (M,) int32 0/1),
    each only when used: no shifts when ``pad`` is 0, no flips without ``flip`` (what the
    pipeline reads, in that order; the other columns' draws do not change).
    """

    pad: int
    flip: bool = True

    columns = 3  # dy, dx, flip

    def params(self, seed: int, epoch: int, index: int, num_slots: int, slots: np.ndarray,
               sizes: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """The parameters of the planned slots ``slots`` ((M,) int, in the planned batch of
        ``num_slots`` images) of batch ``index`` of ``epoch``; ``sizes`` is unused."""
        u = slot_uniforms(seed, epoch, index, num_slots, self.columns)[slots]
        shifts = (shifts_from_uniforms(u[:, :2], self.pad),) if self.pad else ()
        return shifts + ((flips_from_uniforms(u[:, 2]),) if self.flip else ())


@dataclass(frozen=True)
class CropFlip:
    """Random-resized-crop window + flip for encoded images.

    ``params(...)`` -> (anchors (M, 2) int32 (y, x), shapes (M, 2) int32 (h, w), and with
    ``flip`` flips (M,) int32 0/1), windows in the pixels of the decoded (EXIF-oriented)
    image.
    """

    area: tuple[float, float] = (0.08, 1.0)
    aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    columns = 2 * CROP_ATTEMPTS + 3  # areas, ratios, y, x, flip

    def params(self, seed: int, epoch: int, index: int, num_slots: int, slots: np.ndarray,
               sizes: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """As :meth:`ShiftFlip.params`; ``sizes`` (M, 2) int (height, width) of the images in
        ``slots`` (required)."""
        if sizes is None:
            raise ValueError("sizes: the random-resized crop needs every image's (height, width)")
        sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
        u = slot_uniforms(seed, epoch, index, num_slots, self.columns)[slots]
        a = CROP_ATTEMPTS
        anchors, shapes = crop_windows(u[:, :a], u[:, a:2 * a], u[:, 2 * a:2 * a + 2], sizes[:, 0], sizes[:, 1],
                                       self.area, self.aspect_ratio)
        return (anchors, shapes) + ((flips_from_uniforms(u[:, 2 * a + 2]),) if self.flip else ())


# ---------------------------------------------------------------------------------------------
# image sizes from file headers

_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
_STANDALONE = frozenset((0x01, *range(0xD0, 0xD9)))  # TEM, RSTn, SOI: no length field
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _tiff_orientation(buf, start: int, end: int) -> int:
    """The EXIF orientation (1-8) in the TIFF structure at ``buf[start:end]``; 1 when absent
    or unreadable (the decoder then leaves the image as stored)."""
    if end - start < 8:
        return 1
    order = bytes(buf[start:start + 2])
    if order == b"II":
        fmt = "<"
    elif order == b"MM":
        fmt = ">"
    else:
        return 1
    ifd = start + struct.unpack_from(fmt + "I", buf, start + 4)[0]
    if ifd + 2 > end:
        return 1
    count = struct.unpack_from(fmt + "H", buf, ifd)[0]
    for k in range(count):
        entry = ifd + 2 + 12 * k
        if entry + 12 > end:
            return 1
        tag, kind = struct.unpack_from(fmt + "HH", buf, entry)
        if tag == 0x0112:
            value = struct.unpack_from(fmt + "H", buf, entry + 8)[0] if kind == 3 else 1
            return value if 1 <= value <= 8 else 1
    return 1


def _jpeg_size(buf) -> tuple[int, int, int] | None:
    """(height, width, orientation) from a JPEG's markers, or None when the header is not
    the plain kind this reads (PIL then decides)."""
    n, pos, orientation = len(buf), 2, 1
    while pos + 4 <= n:
        if buf[pos] != 0xFF:
            return None
        marker = buf[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        length = (buf[pos + 2] << 8) | buf[pos + 3]
        body = pos + 4
        if length < 2 or body + length - 2 > n:
            return None
        if marker in _SOF:
            if length < 7:
                return None
            height = (buf[body + 1] << 8) | buf[body + 2]
            width = (buf[body + 3] << 8) | buf[body + 4]
            return (height, width, orientation) if height and width else None
        if marker == 0xE1 and orientation == 1 and bytes(buf[body:body + 6]) == b"Exif\x00\x00":
            try:
                orientation = _tiff_orientation(buf, body + 6, body + length - 2)
            except struct.error:
                orientation = 1
        elif marker == 0xDA:  # scan data before any frame header
            return None
        pos = body + length - 2
    return None


def _png_size(buf) -> tuple[int, int, int] | None:
    """(height, width, orientation) from a PNG's IHDR and eXIf chunks (up to the image data)."""
    n = len(buf)
    if n < 24 or bytes(buf[12:16]) != b"IHDR":
        return None
    width, height = struct.unpack_from(">II", buf, 16)
    orientation, pos = 1, 8
    while pos + 8 <= n:
        length = struct.unpack_from(">I", buf, pos)[0]
        kind = bytes(buf[pos + 4:pos + 8])
        if kind in (b"IDAT", b"IEND"):
            break
        if kind == b"eXIf":
            start = pos + 8 + (6 if bytes(buf[pos + 8:pos + 14]) == b"Exif\x00\x00" else 0)
            try:
                orientation = _tiff_orientation(buf, start, min(pos + 8 + length, n))
            except struct.error:
                orientation = 1
            break
        pos += 12 + length
    return (height, width, orientation) if height and width else None


def encoded_image_size(raw) -> tuple[int, int] | None:
    """(height, width) of an encoded image as DALI's decoders return it, or None when the
    header cannot be read.

    Reads only the header: JPEG markers and PNG chunks are parsed here (a few
    microseconds); other formats go through ``PIL.Image.open`` (about 30-60 us).  EXIF
    orientations 5-8 (a quarter turn) swap the sides, as DALI's ``adjust_orientation``
    does when it decodes.

    Args:
        raw: the file's bytes, a 1-D uint8 array or a bytes-like object.
    """
    buf = memoryview(np.ascontiguousarray(raw, dtype=np.uint8)) if isinstance(raw, np.ndarray) else memoryview(raw)
    head = bytes(buf[:8])
    found = None
    try:
        if head.startswith(b"\xff\xd8"):
            found = _jpeg_size(buf)
        elif head == _PNG_SIGNATURE:
            found = _png_size(buf)
    except struct.error:
        found = None
    if found is None:
        found = _pil_size(buf)
    if found is None:
        return None
    height, width, orientation = found
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def _pil_size(buf) -> tuple[int, int, int] | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(buf)) as image:
            width, height = image.size
            # PIL's TIFF reader already reports the oriented size; for the others the
            # orientation comes from the EXIF block
            orientation = 1 if image.format == "TIFF" else int(image.getexif().get(0x0112, 1) or 1)
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError):
        return None
    return height, width, orientation
