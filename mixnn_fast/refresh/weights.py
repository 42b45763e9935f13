"""MixNN's mixing weights (eq. 10-11), the ablations the paper reports, and random partners.

Each anchor i is mixed with its K partners n_i1..n_iK as
``x~_i = lambda_i x_i + sum_k beta_ik x_{n_ik}`` (targets likewise). This module
returns the weights as one row per anchor, ``[lambda_i, beta_i1, ..., beta_iK]``,
so images and targets are always mixed with the same numbers (one call, one
tensor: no second draw to keep in sync).

Modes:

- ``"gmm"`` (the paper): with clean probabilities w, ``S_i = w_i + sum_k w_{n_ik}``,
  ``lambda_i = w_i / S_i``, ``beta_ik = w_{n_ik} / S_i``. A row with ``S_i = 0``
  (anchor and partners all surely noisy) has no defined ratio; ``on_zero`` picks
  the fallback: ``"uniform"`` (1/(K+1) each, the default) or ``"anchor"``
  (lambda = 1: the anchor alone, which is what the authors' code computes there,
  ``(w_i + 1e-10) / (w_i + w_n + 1e-10)``).
- ``"trust"`` (MixNN+'s candidate): the anchor keeps itself alone with its clean probability
  and is mixed by eq. 10-11 otherwise, ``[lambda_i, beta_i] = w_i e_0 + (1 - w_i) gmm_i``.
  A surely clean anchor (w_i = 1) is not mixed; a surely noisy one is mixed as in the paper.
- ``"avg"`` (AVG ablation): every weight 1/(K+1).
- ``"rdm"`` (RDM ablation): each row independently
  ``(lambda_i, beta_i1, ..., beta_iK) ~ Dirichlet(alpha, ..., alpha)``; for K = 1
  this is ``lambda_i ~ Beta(alpha, alpha)``, ``beta_i1 = 1 - lambda_i``.
- ``"mixup"`` (the authors' code before the label-correction epoch): plain mixup,
  ONE ``lambda ~ Beta(alpha, alpha)`` (alpha = 1: uniform) shared by every row of
  the call, ``beta = 1 - lambda``, K = 1. The authors draw one lambda per
  mini-batch, so call this once per batch; partners are random
  (``random_partners``), not neighbours.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from mixnn_fast._checks import check_device, check_in_range

__all__ = ["mixing_weights", "random_partners", "MODES"]

MODES = ("gmm", "trust", "avg", "rdm", "mixup")
_ON_ZERO = ("uniform", "anchor")
# random_partners draws exact random subsets by sorting random keys while n * (n - 1)
# keys fit in this many elements; above it, by rejection of rows with repeats while that is
# cheap (see _REJECTION_LIMIT), else by redrawing repeated entries, or by sorting keys a block
# of rows at a time when most of the n - 1 others are wanted.
_SORT_BUDGET = 1 << 22
# Rejection redraws a whole row until it has no repeat: about exp(k (k - 1) / (2 (n - 1))) draws
# per row, so it is used only while k (k - 1) <= 4 (n - 1), at most e^2 ~ 7.4 draws per row
# (above that it never finished: n = 2049, k = 150 ran for minutes).
_REJECTION_LIMIT = 4


def mixing_weights(clean_prob: torch.Tensor, neighbours: torch.Tensor, mode: str = "gmm", *,
                   anchors: torch.Tensor | None = None, generator: torch.Generator | None = None,
                   alpha: float = 1.0, on_zero: str = "uniform") -> torch.Tensor:
    """Mixing weights ``[lambda, beta_1..beta_K]`` per anchor, Tensor[M, K+1] float32.

    Args:
        clean_prob: Tensor[N] floating, finite, in [0, 1]: each sample's clean probability
            (``clean_probability``). Only its length matters for "avg", "rdm" and "mixup".
        neighbours: Tensor[M, K] int64 on clean_prob's device, values in [0, N): anchor m's
            partners (K >= 0).
        mode: "gmm", "trust", "avg", "rdm" or "mixup" (see the module docstring).
        anchors: Tensor[M] int64 in [0, N), the sample index of each row of neighbours;
            None means row i is sample i (then M must equal N).
        generator: torch.Generator on clean_prob's device for "rdm" and "mixup"
            (None: torch's default generator).
        alpha: Dirichlet / Beta concentration for "rdm" and "mixup" (> 0).
        on_zero: "uniform" or "anchor", the "gmm" (and "trust") fallback for rows whose weights are all 0.

    Returns:
        Tensor[M, K+1] float32 on clean_prob's device; every row finite, >= 0, sums to 1.
    """
    clean_prob, neighbours, anchors = _check_inputs(clean_prob, neighbours, anchors)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if on_zero not in _ON_ZERO:
        raise ValueError(f"on_zero must be one of {_ON_ZERO}, got {on_zero!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != clean_prob.device.type:
            raise ValueError(f"generator is on {generator.device}, clean_prob on {clean_prob.device}")

    rows, k = neighbours.shape
    device = clean_prob.device
    if mode == "avg":
        return torch.full((rows, k + 1), 1.0 / (k + 1), dtype=torch.float32, device=device)
    if mode == "rdm":
        return _dirichlet(rows, k + 1, alpha, generator, device).to(torch.float32)
    if mode == "mixup":
        if k != 1:
            raise ValueError(f"mode='mixup' mixes each anchor with one partner (K=1), got K={k}; "
                             "use mode='rdm' for random weights with K > 1")
        shared = _dirichlet(1, 2, alpha, generator, device).to(torch.float32)
        return shared.expand(rows, 2).contiguous()

    # "gmm": eq. 10-11. float64 keeps tiny probabilities (e.g. 1e-30) exact in the ratios.
    w = clean_prob.to(torch.float64)
    anchor_w = w if anchors is None else w[anchors]
    weights = torch.cat([anchor_w.unsqueeze(1), w[neighbours]], dim=1)  # (M, K+1)
    total = weights.sum(dim=1, keepdim=True)
    degenerate = total == 0
    weights = weights / torch.where(degenerate, torch.ones_like(total), total)
    if on_zero == "uniform":
        fallback = torch.full_like(weights, 1.0 / (k + 1))
    else:
        fallback = torch.zeros_like(weights)
        fallback[:, 0] = 1.0
    weights = torch.where(degenerate, fallback, weights)
    if mode == "trust":
        # the anchor alone with probability w_i, eq. 10-11's mixture otherwise: rows still sum to 1
        weights = weights * (1 - anchor_w).unsqueeze(1)
        weights[:, 0] += anchor_w
    return weights.to(torch.float32)


def random_partners(n: int, k: int = 1, generator: torch.Generator | None = None, *,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """k distinct random partners for each of n samples, never the sample itself.

    Each row is a uniformly random k-subset of the other n - 1 samples, in random order.
    (The authors' code permutes the batch instead, which can pair a sample with itself.)

    Args:
        n: number of samples (>= 1).
        k: partners per sample, 0 <= k <= n - 1.
        generator: torch.Generator on ``device`` (None: torch's default generator).
        device: where to put the result (default: the generator's device, else CPU).

    Returns:
        Tensor[n, k] int64.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n - 1:
        raise ValueError(f"k must be an int in [0, n - 1] = [0, {n - 1}], got {k!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    device = check_device(device)
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device}, device is {device}")
    if k == 0:
        return torch.empty((n, 0), dtype=torch.int64, device=device)

    # Partners as offsets in [1, n - 1] from the sample: never itself, and distinct
    # offsets give distinct partners.
    if n * (n - 1) <= _SORT_BUDGET:
        keys = torch.rand((n, n - 1), generator=generator, device=device)
        offsets = keys.argsort(dim=1)[:, :k] + 1
    elif k * (k - 1) <= _REJECTION_LIMIT * (n - 1):
        offsets = torch.randint(1, n, (n, k), generator=generator, device=device)
        if k > 1:
            # rejection: redraw rows with a repeated offset (each row has a repeat with
            # probability about k^2 / 2n, bounded by the limit above)
            while True:
                ordered = offsets.sort(dim=1).values
                bad = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1).nonzero().squeeze(1)
                if bad.numel() == 0:
                    break
                offsets[bad] = torch.randint(1, n, (bad.numel(), k), generator=generator, device=device)
    elif 2 * k <= n - 1:
        offsets = _distinct_by_redrawing_repeats(n, k, generator, device)
    else:
        offsets = torch.empty((n, k), dtype=torch.int64, device=device)
        rows = max(1, _SORT_BUDGET // (n - 1))
        for start in range(0, n, rows):
            keys = torch.rand((min(rows, n - start), n - 1), generator=generator, device=device)
            offsets[start:start + rows] = keys.argsort(dim=1)[:, :k] + 1
    return (torch.arange(n, device=device).unsqueeze(1) + offsets) % n


def _distinct_by_redrawing_repeats(n: int, k: int, generator: torch.Generator | None,
                                   device: torch.device) -> torch.Tensor:
    """(n, k) offsets in [1, n - 1], distinct within each row, for k <= (n - 1) / 2.

    Every repeat of an earlier entry in its row is redrawn until none is left. The rule looks at
    positions and equality only, never at the values, so it treats every value alike: each ordered
    k-tuple of distinct offsets is equally likely, as with rejection of whole rows. A redraw repeats
    with probability < k / (n - 1) <= 1/2, so the repeats shrink geometrically."""
    offsets = torch.randint(1, n, (n, k), generator=generator, device=device)
    rows = torch.arange(n, device=device)
    while rows.numel():
        block = offsets[rows]
        ordered, order = block.sort(dim=1, stable=True)  # equal values keep their positions' order
        later = torch.zeros_like(block, dtype=torch.bool)
        later[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
        repeat = torch.zeros_like(later).scatter_(1, order, later)  # back to the row's own positions
        count = int(repeat.sum())
        if count == 0:
            break
        block[repeat] = torch.randint(1, n, (count,), generator=generator, device=device)
        offsets[rows] = block
        rows = rows[repeat.any(dim=1)]
    return offsets


def _dirichlet(rows: int, size: int, alpha: float, generator: torch.Generator | None,
               device: torch.device) -> torch.Tensor:
    """Tensor[rows, size] float64, each row ~ Dirichlet(alpha, ..., alpha).

    Normalised Gamma(alpha) draws, taken in log space as log Gamma(alpha + 1) + log(U) / alpha
    (Marsaglia and Tsang's boost) so that small alpha cannot underflow a whole row to 0/0.

    The Gamma variates come from NumPy (torch's own sampler is not public API), seeded by one
    draw from ``generator``: the weights stay a function of the generator's state."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device if generator else None))
    rng = np.random.default_rng(seed)
    gammas = torch.from_numpy(rng.standard_gamma(alpha + 1.0, size=(rows, size))).to(device)
    uniforms = torch.from_numpy(1.0 - rng.random((rows, size))).to(device)  # (0, 1]
    log_gammas = gammas.log() + uniforms.log() / alpha
    lost = ~torch.isfinite(log_gammas.amax(dim=1))
    if bool(lost.any()):
        # alpha so small (~1e-308) that log(U) / alpha is -inf in a whole row, and softmax would
        # give 0/0. alpha * log_gammas = alpha log(G) + log(U) is finite and ranks the entries the
        # same way; shifted to a maximum of 0 before dividing by alpha, the row's largest entry
        # gets weight 1 and the others 0, the Dirichlet's limit as alpha -> 0.
        scaled = alpha * gammas[lost].log() + uniforms[lost].log()
        log_gammas[lost] = (scaled - scaled.amax(dim=1, keepdim=True)) / alpha
    return torch.softmax(log_gammas, dim=1)


def _check_inputs(clean_prob: object, neighbours: object,
                  anchors: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if not isinstance(clean_prob, torch.Tensor):
        raise TypeError(f"clean_prob must be a torch.Tensor, got {type(clean_prob).__name__}")
    if clean_prob.ndim != 1 or not clean_prob.is_floating_point():
        raise ValueError(f"clean_prob must be a 1-D floating tensor (N,), got {clean_prob.dtype} "
                         f"of shape {tuple(clean_prob.shape)}")
    n = clean_prob.numel()
    if n:
        lo, hi = (float(v) for v in torch.aminmax(clean_prob))
        if not (lo >= 0.0 and hi <= 1.0):  # NaN fails both comparisons
            bad = (~((clean_prob >= 0) & (clean_prob <= 1))).nonzero()[0, 0].item()
            raise ValueError(f"clean_prob must be finite and in [0, 1]; clean_prob[{bad}] = {clean_prob[bad].item()}")
    if not isinstance(neighbours, torch.Tensor):
        raise TypeError(f"neighbours must be a torch.Tensor, got {type(neighbours).__name__}")
    if neighbours.ndim != 2 or neighbours.dtype != torch.int64:
        raise ValueError(f"neighbours must be a 2-D int64 tensor (M, K), got {neighbours.dtype} "
                         f"of shape {tuple(neighbours.shape)}")
    if neighbours.device != clean_prob.device:
        raise ValueError(f"neighbours is on {neighbours.device}, clean_prob on {clean_prob.device}")
    check_in_range(neighbours, "neighbours", n)
    if anchors is None:
        if neighbours.shape[0] != n:
            raise ValueError(f"neighbours has {neighbours.shape[0]} rows but clean_prob has N={n} samples; "
                             "pass anchors= to give weights for a subset")
        return clean_prob, neighbours, None
    if not isinstance(anchors, torch.Tensor):
        raise TypeError(f"anchors must be a torch.Tensor, got {type(anchors).__name__}")
    if anchors.ndim != 1 or anchors.dtype != torch.int64:
        raise ValueError(f"anchors must be a 1-D int64 tensor (M,), got {anchors.dtype} of shape {tuple(anchors.shape)}")
    if anchors.numel() != neighbours.shape[0]:
        raise ValueError(f"anchors has {anchors.numel()} entries but neighbours has {neighbours.shape[0]} rows")
    if anchors.device != clean_prob.device:
        raise ValueError(f"anchors is on {anchors.device}, clean_prob on {clean_prob.device}")
    check_in_range(anchors, "anchors", n)
    return clean_prob, neighbours, anchors
