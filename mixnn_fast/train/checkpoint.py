"""Checkpoints that are safe to open, safe to write, and checked when read.

- **Safe to open**: a checkpoint holds tensors and plain containers only (dicts, lists,
  tuples, str, int, float, bool, None), and is read with ``torch.load(weights_only=True)``,
  which refuses anything else — so opening a run folder someone shared cannot execute code.
  Random-generator states are converted to that form here (:func:`capture_rng`).
- **Safe to write**: the file is written beside the target, flushed to disk and renamed over
  it; the checkpoint it replaces is kept as ``checkpoint.prev.pt`` until then
  (:func:`mixnn_fast.train.atomic.write_atomic`).  A crash at any moment leaves a complete
  checkpoint behind.
- **Checked when read**: PyTorch's zip reader notices a truncated file but not flipped bits
  inside a tensor (it does not verify the zip CRCs), so every checkpoint carries a SHA-256 of
  its content (tensors' bytes and the structure around them), verified on load.  A truncated,
  corrupt or foreign file raises :class:`CheckpointError` naming it; the previous checkpoint
  is used only when asked (``load_checkpoint(..., previous=True)``, ``--resume-from-previous``).
"""
from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mixnn_fast.train.atomic import write_atomic

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
#: Bumped when the layout of the state changes; older files are refused with a clear message.
FORMAT = 3


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, truncated, corrupt, or from another version)."""


def _digest(state: Any) -> str:
    """SHA-256 over ``state``: the structure (keys, types, plain values, tensor dtypes and shapes)
    and every tensor's bytes, in traversal order."""
    h = hashlib.sha256()

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        elif isinstance(value, dict):
            h.update(f"D{len(value)}".encode())
            for key, item in value.items():
                h.update(repr(key).encode())
                walk(item)
        elif isinstance(value, (list, tuple)):
            h.update(f"{type(value).__name__[0]}{len(value)}".encode())
            for item in value:
                walk(item)
        else:
            h.update(repr(value).encode())

    walk(state)
    return h.hexdigest()


def save_checkpoint(out_dir: str | Path, state: dict) -> Path:
    """Write ``state`` (tensors and plain containers) to ``out_dir/checkpoint.pt`` atomically,
    keeping the checkpoint it replaces as ``checkpoint.prev.pt``.  Returns the path."""
    out_dir = Path(out_dir)
    record = {"format": FORMAT, "sha256": _digest(state), "state": state}
    buffer = io.BytesIO()
    torch.save(record, buffer)
    return write_atomic(out_dir / CHECKPOINT, buffer.getbuffer(), keep_previous=out_dir / PREVIOUS)


def checkpoint_path(out_dir: str | Path, *, previous: bool = False) -> Path:
    return Path(out_dir) / (PREVIOUS if previous else CHECKPOINT)


def load_checkpoint(out_dir: str | Path, *, previous: bool = False) -> dict:
    """The state saved by :func:`save_checkpoint` in ``out_dir`` (the previous one when
    ``previous``), on the CPU.  Raises FileNotFoundError when there is none, CheckpointError
    when the file is truncated, corrupt or not ours."""
    path = checkpoint_path(out_dir, previous=previous)
    if not path.is_file():
        hint = ""
        if not previous and checkpoint_path(out_dir, previous=True).is_file():
            hint = (f"; {PREVIOUS} exists (a save was interrupted?): pass --resume-from-previous to continue "
                    "from it")
        raise FileNotFoundError(f"checkpoint: {path} does not exist{hint}")
    fallback = "" if previous else (
        f"; pass --resume-from-previous to continue from {PREVIOUS}"
        if checkpoint_path(out_dir, previous=True).is_file() else "; no previous checkpoint is kept beside it")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - zip, pickle and unpickler errors all mean "unusable file"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"checkpoint: {path} is truncated, corrupt or not a mixnn_fast checkpoint "
                              f"({type(exc).__name__}: {reason}){fallback}") from None
    if not isinstance(record, dict) or "state" not in record or "sha256" not in record:
        raise CheckpointError(f"checkpoint: {path} is not a mixnn_fast checkpoint (format {FORMAT}){fallback}")
    if record.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint: {path} has format {record.get('format')!r}; this version reads "
                              f"format {FORMAT} (train the run again, or use the version that wrote it)")
    if _digest(record["state"]) != record["sha256"]:
        raise CheckpointError(f"checkpoint: {path} is corrupt (its content does not match its SHA-256){fallback}")
    return record["state"]


# ---- random generators, as tensors and plain values ----------------------------------------------


def capture_rng(generator: torch.Generator | None = None) -> dict:
    """Every random state a run draws from: torch's (CPU and each CUDA device), NumPy's global
    one, Python's ``random``, and ``generator`` (the trainer's own) — as tensors and plain
    values, so that ``weights_only`` loading accepts them."""
    numpy_state = np.random.get_state(legacy=False)
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"bit_generator": numpy_state["bit_generator"],
                  "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                  "pos": int(numpy_state["state"]["pos"]), "has_gauss": int(numpy_state["has_gauss"]),
                  "gauss": float(numpy_state["gauss"])},
        "python": [version, list(internal), gauss],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng(state: dict, generator: torch.Generator | None = None) -> None:
    """Put back what :func:`capture_rng` saved (CUDA states only where the devices exist)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])
