"""Many processes, one run: PyTorch's own distributed runtime, as ``torchrun`` sets it up.

One process per GPU (``torchrun --nproc-per-node N -m mixnn_fast train ...``; several nodes with
``--nnodes`` and a rendezvous endpoint), or several CPU processes with gloo.  Each process
reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` from the environment torchrun provides; NCCL
connects GPUs, gloo CPUs.  Without those variables, :func:`init_distributed` returns a
single-process context whose collectives do nothing, so the trainer has one code path.

How the trainer uses it:

- the epoch plan is built identically on every rank (same seed) and cut into per-rank shards
  along batch boundaries: a neighbour-coherent batch never straddles two ranks; gradients are
  averaged by DistributedDataParallel;
- the refresh: each rank runs the forward pass over its shard of the pool, filling its rows of
  the per-sample results; :meth:`Distributed.combine_rows` sums the ranks' tensors, which is
  exact because every row is non-zero on one rank only; rank 0 then computes the GMM, the
  neighbours and the weights and broadcasts them (cheaper than every rank computing them: the
  neighbour search is the bulk, and on one node the ranks would fight over the same cores — and
  hnswlib's multi-threaded build is not bit-reproducible, so ranks could disagree);
- rank 0 alone writes checkpoints, metrics, reports and plots; checkpoints hold every rank's
  random states.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Distributed:
    """Where this process stands among the run's processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes."""
        return self.rank == 0

    def device(self, requested: torch.device) -> torch.device:
        """This rank's device: ``cuda:LOCAL_RANK`` when the run is on CUDA, else ``requested``."""
        if self.enabled and requested.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return requested

    def combine_rows(self, *tensors: torch.Tensor) -> None:
        """In place: each tensor becomes the sum over ranks.  Used for per-sample tables that each
        rank filled on its own rows and left zero elsewhere (the sum is then exact)."""
        if not self.enabled:
            return
        for tensor in tensors:
            on_device = self._to_backend(tensor)
            dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
            if on_device is not tensor:
                tensor.copy_(on_device.to(tensor.dtype))

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` on every rank (same shape and dtype on every rank)."""
        if not self.enabled:
            return tensor
        on_device = self._to_backend(tensor)
        dist.broadcast(on_device, src=0)
        if on_device is not tensor:
            tensor.copy_(on_device.to(tensor.dtype))
        return tensor

    def broadcast_object(self, value):
        """Rank 0's picklable ``value`` on every rank."""
        if not self.enabled:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather_objects(self, value) -> list:
        """Every rank's picklable ``value``, in rank order, on every rank."""
        if not self.enabled:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def sum(self, *values: float) -> tuple[float, ...]:
        """The sums over ranks of a few numbers (float64)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return tuple(float(v) for v in t.cpu())

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group, all processes together: a process that tears its connections
        down while a peer is still writing (rank 0's checkpoint, report) or in a collective can
        make gloo abort that peer ("terminate called without an active exception")."""
        if self.enabled and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def _device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def _to_backend(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` where the backend can reduce it: NCCL wants CUDA tensors; gloo reduces
        float16/bfloat16 poorly, so those go through float32 (exact for these sums)."""
        device = self._device()
        dtype = tensor.dtype
        if self.backend == "gloo" and dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
        if tensor.device == device and dtype == tensor.dtype and tensor.is_contiguous():
            return tensor
        return tensor.to(device=device, dtype=dtype).contiguous()


def init_distributed(device: torch.device) -> Distributed:
    """Join the run's process group when ``torchrun`` started this process (NCCL on CUDA, gloo
    otherwise); a single process without it.  ValueError for an inconsistent environment."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return Distributed()
    try:
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except (KeyError, ValueError) as exc:
        raise ValueError(f"distributed: WORLD_SIZE is set but RANK/LOCAL_RANK are not usable ({exc}); "
                         "start the processes with torchrun") from None
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(f"distributed: LOCAL_RANK {local} but this node has {torch.cuda.device_count()} GPUs; "
                             "use --nproc-per-node <= the number of GPUs")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Distributed(rank=rank, world_size=world, local_rank=local, backend=backend)


# ---- the refresh across processes ---------------------------------------------------------------

#: pool rows per reduction when the corrected soft targets are shared (bounds the temporary)
_TARGET_ROWS_PER_STEP = 1 << 16


def share_pool_scores(context: Distributed, scores, targets, feature_dim: int) -> None:
    """After each process scored its shard of the pool: every process holds every row of
    ``scores`` (losses, labels, predictions, features), the same corrected soft targets and,
    where kept, the same early-learning targets (``scores.running``).

    Each row was filled by one process and is zero elsewhere, so summing over processes is
    exact.  The soft targets each process corrected (its own rows) are shared the same way, a
    block of rows at a time."""
    if not context.enabled:
        return
    mine = scores.seen.clone()
    seen = mine.to(torch.int32)
    scores.ensure_features(feature_dim)
    context.combine_rows(seen, scores.losses, scores.current_labels, scores.prob_given, scores.predicted,
                         scores.confidence, *([scores.features] if scores.features is not None else []))
    scores.seen = seen > 0
    (corrected,) = context.sum(float(scores.corrected))
    scores.corrected = corrected > 0
    if getattr(scores, "running", None) is not None:
        _share_rows(context, scores.running, scores.ids, mine, scores.seen)
    if targets is None or not scores.corrected:
        return
    _share_rows(context, targets, scores.ids, mine, scores.seen)


def _share_rows(context: Distributed, store, ids: torch.Tensor, mine: torch.Tensor, seen: torch.Tensor) -> None:
    """Rows ``ids`` of ``store`` (``rows`` / ``set_rows``), each written by the one process whose
    ``mine`` marks it, on every process; rows no process ``seen`` are left alone."""
    for start in range(0, len(ids), _TARGET_ROWS_PER_STEP):
        block = slice(start, start + _TARGET_ROWS_PER_STEP)
        rows = store.rows(ids[block]) * mine[block].unsqueeze(1)  # (n, C) float32: this process's rows, zero elsewhere
        context.combine_rows(rows)
        filled = seen[block]
        store.set_rows(ids[block][filled], rows[filled])


def share_refresh(context: Distributed, result, scores):
    """Rank 0's refresh result (clean probability, partner table, statistics) on every process;
    ``scores`` are this process's (already shared) pool scores."""
    if not context.enabled:
        return result
    from mixnn_fast.refresh.partners import PartnerTable
    from mixnn_fast.refresh.refresh import RefreshResult

    payload = None
    if context.is_main:
        table = result.table
        payload = {"losses": result.losses, "clean_prob": result.clean_prob, "stats": result.stats,
                   "seconds": result.seconds, "given_label_supported": result.given_label_supported,
                   "table": None if table is None else
                   (table.anchors, table.partners, table.weights, table.num_samples)}
    payload = context.broadcast_object(payload)
    if context.is_main:
        return result
    table = None if payload["table"] is None else PartnerTable.build(*payload["table"])
    return RefreshResult(losses=payload["losses"], clean_prob=payload["clean_prob"], ids=scores.ids, table=table,
                         features=scores.features, gmm=None, scores=scores, seconds=payload["seconds"],
                         stats=payload["stats"], given_label_supported=payload["given_label_supported"])
