"""The 1-NN forest: components, roots, depths and a depth-first order, vectorised in NumPy.

A 1-NN graph has one out-edge per node (``i -> f[i]``, its nearest neighbour): a
*functional graph*.  Each component is a set of trees hanging off one cycle (a mutual
pair when distances are distinct).  Cutting every cycle at its smallest node turns the
graph into a forest of rooted trees, and a depth-first (pre)order of that forest puts
each node right after its parent or its earlier siblings' subtrees.  Cutting that order
into consecutive chunks (batches) therefore separates few (child, parent) pairs: at a
cut, only nodes whose parent lies on the path above the cut lose their parent.

Everything here is pointer doubling (log2(n) gathers) or one pass per tree level; no
Python loop over nodes.
"""
from __future__ import annotations

import numpy as np


def functional_graph_components(f: np.ndarray) -> np.ndarray:
    """Connected components of a functional graph, for any cycle lengths.

    The label of a node is the smallest node id on its component's cycle, found by
    pointer doubling in ceil(log2 n) steps: ``g = f^(2^s)`` jumps onto the cycle and ``m``
    holds the minimum over the first ``2^s`` nodes of each node's path.

    Args:
        f: (n,) int array with values in [0, n).
    Returns:
        (n,) int64 labels; two nodes share a label iff they are connected.
    """
    n = len(f)
    dtype = np.int32 if n < 2**31 else np.int64  # int32 gathers are faster
    g = np.asarray(f, dtype=dtype)
    m = np.arange(n, dtype=dtype)
    span = 1
    while span < n:  # afterwards span = 2^s >= n: longer than any tail or cycle
        m = np.minimum(m, m[g])
        g = g[g]
        span *= 2
    return m[g].astype(np.int64)


def _climb(parent: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(root, depth) of every node of a forest whose roots are self-loops; None if
    ``parent`` still has cycles longer than one (pointers never settle)."""
    n = len(parent)
    parent = parent.astype(np.int32 if n < 2**31 else np.int64)  # int32 gathers are faster
    g = parent
    depth = (parent != np.arange(n, dtype=parent.dtype)).astype(np.int64)  # one step per non-root node on the way up
    for _ in range(max(n, 1).bit_length() + 1):
        # Every pointer on a true root (a self-loop; a mere fixed point of g could be a
        # cycle whose length divides the jump): the depths are complete.
        if np.array_equal(parent[g], g):
            return g.astype(np.int64), depth
        depth = depth + depth[g]
        g = g[g]
    return None


def forest(f: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut every cycle of the functional graph ``f`` at its smallest node.

    Args:
        f: (n,) int array with values in [0, n); nodes with ``f[i] == i`` are roots already.
    Returns:
        parent (n,) int64 (roots point to themselves), root (n,) int64 (the root of each
        node's tree, which is also its component label), depth (n,) int64 (0 at roots).
    """
    f = np.asarray(f, dtype=np.int64)
    n = len(f)
    idx = np.arange(n, dtype=np.int64)
    parent = f.copy()
    # The common case for nearest neighbours: every cycle is a self-loop or a mutual pair.
    short = f[f] == idx
    parent[short & (idx <= f)] = idx[short & (idx <= f)]
    climbed = _climb(parent)
    if climbed is None:  # longer cycles (ties in distances, or an arbitrary graph)
        labels = functional_graph_components(f)
        parent = f.copy()
        roots = np.flatnonzero(labels == idx)  # each cycle's smallest node is its own label
        parent[roots] = roots
        climbed = _climb(parent)
        if climbed is None:  # cannot happen: cutting every cycle leaves a forest
            raise RuntimeError("internal error: cycles remain after cutting them")
    root, depth = climbed
    return parent, root, depth


def preorder(parent: np.ndarray, root: np.ndarray, depth: np.ndarray, sibling_key: np.ndarray,
             root_rank: np.ndarray) -> np.ndarray:
    """Position of every node in a depth-first preorder of the forest.

    Trees are laid out in increasing ``root_rank[root]``; inside a tree a parent comes
    first, then its children's subtrees in increasing ``sibling_key``.

    Args:
        parent, root, depth: (n,) int64 from :func:`forest`.
        sibling_key: (n,) int in [0, n], orders the children of one parent.
        root_rank: (n,) int or float, read at root nodes only, orders the trees.
    Returns:
        (n,) int64, a permutation of 0..n-1.
    """
    n = len(parent)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    max_depth = int(depth.max())
    # small integers sort by radix (linear time) when they fit in 16 bits
    by_depth = np.argsort(depth.astype(np.int16) if max_depth < 2**15 else depth, kind="stable")
    bounds = np.searchsorted(depth[by_depth], np.arange(max_depth + 2))

    # Subtree sizes, deepest level first (children are finished before their parents).
    size = np.ones(n, dtype=np.int64)
    for d in range(max_depth, 0, -1):
        nodes = by_depth[bounds[d]:bounds[d + 1]]
        np.add.at(size, parent[nodes], size[nodes])

    # Offset of each child inside its parent's block: 1 (the parent itself) plus the
    # sizes of the siblings before it.
    is_root = parent == np.arange(n)
    order = np.argsort(parent * (n + 1) + sibling_key)  # by parent, then by sibling key
    children = order[~is_root[order]]
    sizes = size[children]
    before = np.cumsum(sizes) - sizes  # exclusive running sum over all children
    new_group = np.ones(len(children), dtype=bool)
    new_group[1:] = parent[children][1:] != parent[children][:-1]
    group_base = np.maximum.accumulate(np.where(new_group, before, 0))  # `before` never decreases
    offset = np.zeros(n, dtype=np.int64)
    offset[children] = 1 + before - group_base

    # Trees one after another, then every level top-down from its parents.
    roots = np.flatnonzero(is_root)
    roots = roots[np.argsort(root_rank[roots], kind="stable")]
    pos = np.empty(n, dtype=np.int64)
    pos[roots] = np.cumsum(size[roots]) - size[roots]
    for d in range(1, max_depth + 1):
        nodes = by_depth[bounds[d]:bounds[d + 1]]
        pos[nodes] = pos[parent[nodes]] + offset[nodes]
    return pos
