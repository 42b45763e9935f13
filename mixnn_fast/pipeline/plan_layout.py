"""The arithmetic of epoch plans: the coherent order, the batch layouts, offsets.

Pure NumPy, vectorised, no Python loop over anchors (:mod:`mixnn_fast.pipeline.plan` says what
a plan is; this module computes one).  ``seq`` is the anchors' sample ids in plan order,
``batch_of`` each anchor's batch, ``partners`` (A, K) each anchor's partner ids.
"""
from __future__ import annotations

import numpy as np

from mixnn_fast.pipeline.forest import forest, preorder


def coherent_order(anchors: np.ndarray, first: np.ndarray, rng: np.random.Generator,
                   shuffle: bool) -> tuple[np.ndarray, int, int]:
    """Anchors in a depth-first order of the 1-NN forest, components in random order.

    Returns (anchor sequence, number of components, anchors in the largest component).
    """
    num = len(anchors)
    if num == 0:
        return anchors.copy(), 0, 0
    partner = first[anchors]
    # Work on the nodes that matter (anchors and their first partners), renumbered
    # 0..n_local-1 in id order.  A partner that is not an anchor this epoch has no
    # out-edge of its own and becomes a root (a self-loop): its anchors gather round it.
    present = np.zeros(len(first), dtype=bool)
    present[anchors] = True
    present[partner] = True
    nodes = np.flatnonzero(present)
    n_local = len(nodes)
    local = np.cumsum(present, dtype=np.int64) - 1  # id -> local index (valid where present)
    loc_a = local[anchors]
    loc_p = local[partner]
    f = np.arange(n_local, dtype=np.int64)
    f[loc_a] = loc_p
    parent, root, depth = forest(f)

    if shuffle:
        sibling_key = rng.permutation(n_local) + 1
        root_rank = rng.permutation(n_local)
    else:  # siblings and trees in order of (first) appearance in anchor_order
        sibling_key = np.full(n_local, num + 1, dtype=np.int64)
        sibling_key[loc_a] = np.arange(1, num + 1)
        root_rank = np.full(n_local, num, dtype=np.int64)
        np.minimum.at(root_rank, root[loc_a], np.arange(num))
    # A cut cycle's root mixes with its own partner, which is now one of its
    # descendants: put that child first (key 0) so the two sit side by side.
    roots = np.flatnonzero(parent == np.arange(n_local))
    sibling_key[f[roots]] = 0
    pos = preorder(parent, root, depth, sibling_key, root_rank)

    node_at = np.empty(n_local, dtype=np.int64)
    node_at[pos] = np.arange(n_local)
    is_anchor = np.zeros(n_local, dtype=bool)
    is_anchor[loc_a] = True
    seq = nodes[node_at[is_anchor[node_at]]]
    sizes = np.bincount(root[loc_a])
    return seq, int(np.count_nonzero(sizes)), int(sizes.max())


def dedup_layout(seq, partners, batch_of, num_batches, n):
    """Per batch, the distinct ids among its anchors and partners (sorted by id)."""
    num, k = partners.shape
    item_ids = np.concatenate([seq, partners.ravel()])
    item_batch = np.concatenate([batch_of, np.repeat(batch_of, k)])
    keys, inverse = np.unique(item_batch * np.int64(max(n, 1)) + item_ids, return_inverse=True)
    ids = keys % max(n, 1)
    id_offsets = offsets(np.bincount(keys // max(n, 1), minlength=num_batches))
    slots = inverse.ravel() - id_offsets[item_batch]
    return ids, id_offsets, slots[:num], slots[num:].reshape(num, k)


def stacked_layout(seq, partners, batch_of, a_counts, batch_size):
    """Per batch, its anchors followed by every partner row by row: nothing shared."""
    num, k = partners.shape
    per_batch = a_counts * (1 + k)
    id_offsets = offsets(per_batch)
    pos = np.arange(num, dtype=np.int64) - batch_of * batch_size  # anchor's position in its batch
    anchor_slots = pos
    partner_slots = (a_counts[batch_of] + pos * k)[:, None] + np.arange(k, dtype=np.int64)
    ids = np.empty(int(per_batch.sum()), dtype=np.int64)
    base = id_offsets[batch_of]
    ids[base + anchor_slots] = seq
    ids[(base[:, None] + partner_slots).ravel()] = partners.ravel()
    return ids, id_offsets, anchor_slots, partner_slots


def in_batch_slots(ids: np.ndarray, id_offsets: np.ndarray, batch_of_anchor: np.ndarray, wanted: np.ndarray,
                   n: int) -> tuple[np.ndarray, np.ndarray]:
    """Where each wanted id sits in its anchor's batch.

    Args:
        ids, id_offsets: a plan's flat decode lists and their (num_batches + 1,) offsets.
        batch_of_anchor: (A,) int64 each anchor's batch.
        wanted: (A, K) int64 sample ids to find in the batch of their row's anchor.
        n: the data set's size (ids lie in [0, n)).

    Returns ((A, K) int64 slots in the batches' own ids, the first one where an id is decoded
    twice; (A, K) bool found), one sorted search over (batch, id) keys.
    """
    width = np.int64(max(n, 1))
    id_batch = np.repeat(np.arange(len(id_offsets) - 1, dtype=np.int64), np.diff(id_offsets))
    keys = id_batch * width + ids
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    query = batch_of_anchor[:, None] * width + wanted
    if not len(sorted_keys):
        return np.zeros(wanted.shape, dtype=np.int64), np.zeros(wanted.shape, dtype=bool)
    found = np.minimum(np.searchsorted(sorted_keys, query), len(sorted_keys) - 1)
    flat = order[found]
    return flat - id_offsets[batch_of_anchor][:, None], sorted_keys[found] == query


def offsets(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, s + l)`` for each (s, l), vectorised."""
    ends = offsets(lengths)
    return np.repeat(starts - ends[:-1], lengths) + np.arange(ends[-1], dtype=np.int64)
