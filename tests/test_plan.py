"""Epoch plans: invariants on random neighbour graphs of odd sizes, the 1-NN forest
against brute-force references, sharding, partner tables (weights that follow their anchors,
in-batch partners attached afterwards), and input validation."""
from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixnn_fast.pipeline import MODES, plan_epoch
from mixnn_fast.pipeline.feeder import drop_samples
from mixnn_fast.pipeline.forest import forest, functional_graph_components, preorder
from mixnn_fast.refresh.partners import PartnerTable, mixup_table


# ---------------------------------------------------------------------------------------------
# helpers: independent, loop-based references


def components_reference(f: np.ndarray) -> np.ndarray:
    """Union-find over the undirected edges i - f[i]; label = smallest member of the component."""
    parent = list(range(len(f)))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in enumerate(f):
        a, b = find(i), find(int(j))
        if a != b:
            parent[max(a, b)] = min(a, b)
    return np.array([find(i) for i in range(len(f))])


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Two labelings describe the same partition."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@st.composite
def graphs(draw, max_n=120, max_k=4):
    """(neighbours (N, K), anchors subset in random order): arbitrary graphs, self-loops and long cycles included."""
    n = draw(st.integers(1, max_n))
    k = draw(st.integers(1, max_k))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["random", "knn", "chain"]))
    if kind == "random":
        nbrs = rng.integers(0, n, (n, k))
    elif kind == "knn":  # true nearest neighbours of random points: mutual pairs and trees
        x = rng.standard_normal((n, 3))
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        np.fill_diagonal(d, np.inf)
        nbrs = np.argsort(d, axis=1)[:, :k] if n > 1 else np.zeros((1, k), dtype=np.int64)
        nbrs = np.where(nbrs >= n, 0, nbrs)
    else:  # long paths: i -> i-1
        nbrs = np.maximum(np.arange(n) - 1, 0)[:, None].repeat(k, axis=1)
    frac = draw(st.sampled_from([1.0, 0.7, 0.3]))
    anchors = rng.permutation(n)[: max(1, int(round(frac * n)))]
    return nbrs.astype(np.int64), anchors.astype(np.int64)


def check_plan(plan, anchors, nbrs, batch_size, mode, drop_last):
    """Every invariant a plan must satisfy; returns the anchor ids in plan order."""
    n_anchor = len(anchors)
    expected_anchors = n_anchor // batch_size * batch_size if drop_last else n_anchor
    sizes = [len(b) for b in plan]
    assert sum(sizes) == expected_anchors
    assert all(s == batch_size for s in sizes[:-1])
    if sizes:
        assert 1 <= sizes[-1] <= batch_size
        if drop_last:
            assert sizes[-1] == batch_size

    seen = []
    decoded = 0
    k = nbrs.shape[1] if mode in ("coherent", "naive") else 0
    for b, batch in enumerate(plan):
        assert batch.index == b
        ids, a_slots, p_slots = batch.ids, batch.anchor_slots, batch.partner_slots
        assert ids.dtype == a_slots.dtype == p_slots.dtype == np.int64
        assert p_slots.shape == (len(a_slots), k)
        m = len(ids)
        assert a_slots.min() >= 0 and a_slots.max() < m
        if k:
            assert p_slots.min() >= 0 and p_slots.max() < m
            # slots index the right ids: every partner is present in its anchor's batch
            np.testing.assert_array_equal(ids[p_slots], nbrs[ids[a_slots]])
        anchor_ids = ids[a_slots]
        assert len(set(anchor_ids.tolist())) == len(anchor_ids)
        if mode == "coherent":
            assert len(set(ids.tolist())) == m, "coherent batches decode each id once"
            used = set(anchor_ids.tolist()) | set(ids[p_slots].ravel().tolist())
            assert used == set(ids.tolist()), "nothing is decoded that no anchor needs"
        elif mode == "naive":
            assert m == len(a_slots) * (1 + k)
        else:
            assert m == len(a_slots)
            np.testing.assert_array_equal(np.sort(a_slots), np.arange(m))
        decoded += m
        seen.extend(anchor_ids.tolist())

    seen = np.array(seen, dtype=np.int64)
    assert len(set(seen.tolist())) == len(seen), "an anchor appears twice"
    assert set(seen.tolist()) <= set(anchors.tolist())
    if not drop_last:
        assert sorted(seen.tolist()) == sorted(anchors.tolist()), "every anchor exactly once per epoch"
    np.testing.assert_array_equal(plan.anchor_ids(), seen)
    stats = plan.stats
    assert stats.anchors == len(seen) and stats.decoded == decoded and stats.batches == len(plan)
    if len(seen):
        assert stats.extra_decode_fraction == pytest.approx((decoded - len(seen)) / len(seen))
    if mode == "naive":
        assert stats.extra_decode_fraction == pytest.approx(k if len(seen) else 0.0)
    if mode in ("plain", "in_batch"):
        assert stats.extra_decode_fraction == 0.0
    assert plan.max_decoded == (max(len(b.ids) for b in plan) if len(plan) else 0)
    return seen


# ---------------------------------------------------------------------------------------------
# plan invariants


@given(graph=graphs(), batch_size=st.integers(1, 40), mode=st.sampled_from(MODES), seed=st.integers(0, 2**31),
       epoch=st.integers(0, 50), drop_last=st.booleans())
def test_plan_invariants(graph, batch_size, mode, seed, epoch, drop_last):
    nbrs, anchors = graph
    plan = plan_epoch(anchors, nbrs, batch_size, mode=mode, seed=seed, epoch=epoch, drop_last=drop_last)
    assert plan.mode == mode and plan.batch_size == batch_size
    check_plan(plan, anchors, nbrs, batch_size, mode, drop_last)


@given(graph=graphs(max_k=1), batch_size=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_coherent_keeps_components_together(graph, batch_size, seed):
    """K = 1: each 1-NN component occupies a contiguous run of batches, at most one
    component crosses each batch boundary, and a partner is missing from its anchor's
    batch only where its component is split (or the partner is not an anchor)."""
    nbrs, anchors = graph
    n = len(nbrs)
    plan = plan_epoch(anchors, nbrs, batch_size, seed=seed)
    # components of the graph with one edge per anchor (non-anchor partners are leaves)
    f = np.arange(n)
    f[anchors] = nbrs[anchors, 0]
    label = components_reference(f)
    batches_of = {}
    for b, batch in enumerate(plan):
        for a in batch.anchor_ids.tolist():
            batches_of.setdefault(label[a], set()).add(b)
    split = 0
    for comp, bs in batches_of.items():
        assert bs == set(range(min(bs), max(bs) + 1)), f"component {comp} is scattered over batches {sorted(bs)}"
        split += len(bs) > 1
    assert split <= max(len(plan) - 1, 0)
    is_anchor = np.zeros(n, dtype=bool)
    is_anchor[anchors] = True
    for batch in plan:
        anchor_set = set(batch.anchor_ids.tolist())
        for a, p in zip(batch.anchor_ids.tolist(), batch.partner_ids[:, 0].tolist()):
            if p not in anchor_set:
                assert not is_anchor[p] or len(batches_of[label[a]]) > 1


def test_coherent_whole_batch_needs_no_extra_decoding(rng):
    """All anchors' 1-NN partners are anchors and the batch holds everything: no extra decode."""
    x = rng.standard_normal((257, 8))
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nbrs = d.argmin(1)[:, None]
    plan = plan_epoch(np.arange(257), nbrs, 257, seed=3)
    assert plan.stats.extra_decode_fraction == 0.0
    assert plan.stats.partners_in_batch_fraction == 1.0


def test_coherent_depth_first_order_on_a_long_path():
    """A path i -> i-1 of 1000 nodes is one component; in depth-first order each batch
    boundary costs exactly one extra decode (its first anchor's partner).  A random order
    inside the component would cost about one per anchor."""
    n, b = 1000, 64
    nbrs = np.maximum(np.arange(n) - 1, 0)[:, None]
    nbrs[0, 0] = 1  # a mutual pair at the root
    plan = plan_epoch(np.arange(n), nbrs, b, seed=0)
    assert plan.stats.decoded - n == len(plan) - 1
    naive = plan_epoch(np.arange(n), nbrs, b, mode="naive", seed=0)
    assert naive.stats.decoded == 2 * n


def test_extra_decode_fraction_small_on_a_real_1nn_graph():
    """Fashion-MNIST pixels' exact 1-NN graph (a real data set): the coherent plan decodes
    only a few percent extra at batch 64, the naive plan 100 %."""
    import gzip

    path = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        pytest.skip(f"{path} not installed")
    x = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 784)[:3000].astype(np.float32)
    sq = (x * x).sum(1)
    d = sq[:, None] + sq[None] - 2 * x @ x.T
    np.fill_diagonal(d, np.inf)
    nbrs = d.argmin(1)[:, None].astype(np.int64)
    coherent = plan_epoch(np.arange(3000), nbrs, 64, seed=0)
    naive = plan_epoch(np.arange(3000), nbrs, 64, mode="naive", seed=0)
    assert coherent.stats.extra_decode_fraction < 0.05
    assert coherent.stats.partners_in_batch_fraction > 0.95
    assert naive.stats.extra_decode_fraction == 1.0


def test_partners_outside_the_anchor_set_are_decoded(rng):
    """A subset of anchors (Clothing1M's balanced draw): partners that are not anchors are
    still in the decode list, and anchors sharing such a partner decode it once."""
    n = 50
    nbrs = np.full((n, 1), 49, dtype=np.int64)  # everybody's partner is sample 49
    nbrs[49, 0] = 48
    anchors = np.arange(10)  # 49 is not an anchor
    plan = plan_epoch(anchors, nbrs, 16, seed=1)
    (batch,) = list(plan)
    assert sorted(batch.ids.tolist()) == list(range(10)) + [49]
    assert (batch.partner_ids == 49).all()
    assert plan.stats.extra_decode_fraction == pytest.approx(0.1)


@pytest.mark.parametrize("mode", MODES)
def test_seeded_reproducible_and_epochs_differ(mode, rng):
    nbrs = rng.integers(0, 500, (500, 2))
    anchors = rng.permutation(500)[:333]
    a = plan_epoch(anchors, nbrs, 17, mode=mode, seed=7, epoch=3)
    b = plan_epoch(anchors, nbrs, 17, mode=mode, seed=7, epoch=3)
    c = plan_epoch(anchors, nbrs, 17, mode=mode, seed=7, epoch=4)
    d = plan_epoch(anchors, nbrs, 17, mode=mode, seed=8, epoch=3)
    for field in ("ids", "id_offsets", "anchor_slots", "anchor_offsets", "partner_slots"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.anchor_ids(), c.anchor_ids())
    assert not np.array_equal(a.anchor_ids(), d.anchor_ids())
    # the batches' membership changes too, not only the order inside them
    assert {frozenset(x.anchor_ids.tolist()) for x in a} != {frozenset(x.anchor_ids.tolist()) for x in c}


@pytest.mark.parametrize("mode", MODES)
def test_shuffle_false_is_deterministic_and_keeps_order(mode, rng):
    nbrs = rng.integers(0, 100, (100, 1))
    anchors = rng.permutation(100)
    a = plan_epoch(anchors, nbrs, 9, mode=mode, shuffle=False, seed=0, epoch=0)
    b = plan_epoch(anchors, nbrs, 9, mode=mode, shuffle=False, seed=5, epoch=9)
    np.testing.assert_array_equal(a.anchor_ids(), b.anchor_ids())
    if mode != "coherent":
        np.testing.assert_array_equal(a.anchor_ids(), anchors)
    check_plan(a, anchors, nbrs, 9, mode, False)


def test_empty_anchor_set():
    plan = plan_epoch(np.array([], dtype=np.int64), np.zeros((5, 1), dtype=np.int64), 4)
    assert len(plan) == 0 and plan.stats.anchors == 0 and plan.max_decoded == 0


# ---------------------------------------------------------------------------------------------
# sharding


@given(graph=graphs(), batch_size=st.integers(1, 20), num_shards=st.integers(1, 5), mode=st.sampled_from(MODES))
@settings(max_examples=40)
def test_shards_partition_the_batches(graph, batch_size, num_shards, mode):
    nbrs, anchors = graph
    plan = plan_epoch(anchors, nbrs, batch_size, mode=mode, seed=0)
    whole = {b.index: b for b in plan}
    seen = []
    lengths = []
    for s in range(num_shards):
        shard = plan.shard(s, num_shards, pad=False)
        lengths.append(len(shard))
        for batch in shard:
            ref = whole[batch.index]
            np.testing.assert_array_equal(batch.ids, ref.ids)
            np.testing.assert_array_equal(batch.anchor_slots, ref.anchor_slots)
            np.testing.assert_array_equal(batch.partner_slots, ref.partner_slots)
            seen.append(batch.index)
        padded = plan.shard(s, num_shards)
        assert len(padded) == -(-len(plan) // num_shards)
        assert set(padded.batch_indices.tolist()) >= set(shard.batch_indices.tolist())
    assert sorted(seen) == list(range(len(plan)))
    assert max(lengths) - min(lengths) <= 1


# ---------------------------------------------------------------------------------------------
# partner tables


PLAN_FIELDS = ("ids", "id_offsets", "anchor_slots", "anchor_offsets", "partner_slots", "batch_indices")


def table_for(anchors: np.ndarray, nbrs: np.ndarray, seed: int) -> tuple[PartnerTable, np.ndarray]:
    """A table over ``anchors`` with their rows of ``nbrs`` and random weights; and (N, K+1)
    the weights by sample id (rows of non-anchors unused)."""
    n, k = nbrs.shape
    by_id = np.random.default_rng(seed).dirichlet(np.ones(k + 1), size=n).astype(np.float32)
    return PartnerTable.build(anchors, nbrs[anchors], by_id[anchors], n), by_id


@given(graph=graphs(), batch_size=st.integers(1, 30), mode=st.sampled_from(["coherent", "naive"]),
       seed=st.integers(0, 2**31), num_shards=st.integers(1, 4), drop_last=st.booleans())
@settings(max_examples=60)
def test_weights_follow_their_anchors_through_shuffling_and_sharding(graph, batch_size, mode, seed, num_shards,
                                                                     drop_last):
    """A PartnerTable plans exactly the batches its partner array does, and every batch carries
    (B, K+1) float32 weights: the table's rows of its anchors, in the anchors' (shuffled) order,
    on every shard, padding batches included."""
    nbrs, anchors = graph
    table, by_id = table_for(anchors, nbrs, seed)
    kwargs = dict(mode=mode, seed=seed, epoch=seed % 7, drop_last=drop_last)
    plain = plan_epoch(anchors, nbrs, batch_size, **kwargs)
    plan = plan_epoch(anchors, table, batch_size, **kwargs)
    assert plain.weights is None and plan.weights.dtype == np.float32
    for field in PLAN_FIELDS:
        np.testing.assert_array_equal(getattr(plan, field), getattr(plain, field))
    assert plan.stats == plain.stats
    check_plan(plan, anchors, nbrs, batch_size, mode, drop_last)
    for batch in plan:
        assert batch.weights.shape == (len(batch), nbrs.shape[1] + 1)
        np.testing.assert_array_equal(batch.weights, by_id[batch.anchor_ids])
    for shard_id in range(num_shards):
        for pad in (True, False):
            for batch in plan.shard(shard_id, num_shards, pad=pad):
                np.testing.assert_array_equal(batch.weights, by_id[batch.anchor_ids])
                np.testing.assert_array_equal(batch.partner_ids, nbrs[batch.anchor_ids])


@given(graph=graphs(max_n=60), batch_size=st.integers(1, 20), seed=st.integers(0, 2**31), data=st.data())
@settings(max_examples=60)
def test_weights_survive_skipping(graph, batch_size, seed, data):
    """Unreadable samples dropped from a batch: dropped anchors lose their weights rows, every
    other anchor keeps its own row, also when its partner is lost (it then mixes with itself)."""
    nbrs, anchors = graph
    table, by_id = table_for(anchors, nbrs, seed)
    plan = plan_epoch(anchors, table, batch_size, seed=seed)
    for batch in plan:
        bad = np.array(data.draw(st.lists(st.sampled_from(batch.ids.tolist()), max_size=3)), dtype=np.int64)
        kept, dropped, slots = drop_samples(batch, bad)
        assert dropped == int(np.isin(batch.anchor_ids, bad).sum()) and len(kept) == len(batch) - dropped
        assert not np.isin(kept.ids, bad).any()
        np.testing.assert_array_equal(kept.ids, batch.ids[slots])
        np.testing.assert_array_equal(kept.weights, by_id[kept.anchor_ids])
        lost = np.isin(nbrs[kept.anchor_ids], bad)
        np.testing.assert_array_equal(kept.partner_ids, np.where(lost, kept.anchor_ids[:, None], nbrs[kept.anchor_ids]))


@pytest.mark.parametrize("mode", ["plain", "in_batch"])
def test_with_partners_attaches_in_batch_partners(mode):
    """A producer that draws partners inside the plan's batches (plain mixup here): the plan
    with its table points every partner at its slot in the anchor's own batch, carries the
    weights, and shards with them."""
    n = 101
    anchors = np.random.default_rng(0).permutation(n)[:77]
    plan = plan_epoch(anchors, None, 10, mode=mode, seed=4, epoch=2, num_samples=n)
    table = mixup_table(plan, n, alpha=0.4, seed=4, epoch=2)
    mixed = plan.with_partners(table)
    assert mixed.num_partners == 1 and mixed.stats.partners_in_batch_fraction == 1.0
    for field in ("ids", "id_offsets", "anchor_slots", "anchor_offsets", "batch_indices"):
        np.testing.assert_array_equal(getattr(mixed, field), getattr(plan, field))
    rows = table.rows(mixed.anchor_ids())
    np.testing.assert_array_equal(mixed.weights, table.weights.numpy()[rows])
    for batch in mixed:
        np.testing.assert_array_equal(batch.partner_ids, table.partners.numpy()[table.rows(batch.anchor_ids)])
        assert np.isin(batch.partner_slots, batch.anchor_slots).all()  # in the batch, among its anchors
    for batch in mixed.shard(1, 3):
        np.testing.assert_array_equal(batch.weights, table.weights.numpy()[table.rows(batch.anchor_ids)])
    assert plan.weights is None and plan.num_partners == 0  # the plan itself is unchanged


def test_with_partners_refuses_partners_outside_the_batch():
    n = 20
    plan = plan_epoch(np.arange(n), None, 5, mode="plain", seed=1, num_samples=n)
    first = plan[0].anchor_ids
    outsider = int(plan[1].anchor_ids[0])
    order = np.concatenate([b.anchor_ids for b in plan])
    partners = np.concatenate([np.roll(b.anchor_ids, 1) for b in plan])[:, None]  # a cycle inside each batch
    fine = PartnerTable.build(order, partners, np.full((n, 2), 0.5), n)
    assert plan.with_partners(fine).stats.partners_in_batch_fraction == 1.0
    partners[2, 0] = outsider  # anchor first[2] now partners a sample of batch 1
    stray = PartnerTable.build(order, partners, np.full((n, 2), 0.5), n)
    with pytest.raises(ValueError, match=f"table: partner {outsider} of anchor {int(first[2])} is not in the "
                                         "anchor's batch 0"):
        plan.with_partners(stray)
    short = PartnerTable.build(order[1:], partners[1:], np.full((n - 1, 2), 0.5), n)
    with pytest.raises(ValueError, match=f"table: anchor {int(order[0])} \\(batch 0\\) has no row"):
        plan.with_partners(short)
    with pytest.raises(TypeError, match="table"):
        plan.with_partners(partners)


def test_tables_that_do_not_fit_the_plan_are_named():
    n = 8
    nbrs = ((np.arange(n) + 1) % n)[:, None]
    with pytest.raises(ValueError, match="partners.*K >= 1"):
        plan_epoch(np.arange(n), PartnerTable.alone(np.arange(n), n), 4)
    with pytest.raises(ValueError, match="partners.*mode 'plain'.*K = 1.*with_partners"):
        plan_epoch(np.arange(n), PartnerTable.build(np.arange(n), nbrs, np.full((n, 2), 0.5), n), 4, mode="plain")
    half = PartnerTable.build(np.arange(4), nbrs[:4], np.full((4, 2), 0.5), n)
    with pytest.raises(ValueError, match=r"anchor_order: samples \[4, 5, 6, 7\] have no row"):
        plan_epoch(np.arange(n), half, 4)
    assert len(plan_epoch(np.arange(4), half, 4)) == 1  # anchors the table covers: fine
    with pytest.raises(ValueError, match="num_samples.*8"):
        plan_epoch(np.arange(4), half, 4, num_samples=9)
    alone = plan_epoch(np.arange(n), PartnerTable.alone(np.arange(n), n), 3, mode="plain")
    assert alone.num_partners == 0 and (alone.weights == 1).all() and alone.weights.shape == (n, 1)


# ---------------------------------------------------------------------------------------------
# the 1-NN forest against brute force


@given(n=st.integers(1, 200), seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(["random", "pairs", "cycles"]))
def test_forest_against_brute_force(n, seed, kind):
    rng = np.random.default_rng(seed)
    if kind == "random":
        f = rng.integers(0, n, n)
    elif kind == "pairs":  # mutual pairs with trees hanging off them, like a 1-NN graph
        f = rng.integers(0, max(n // 3, 1), n)
        for i in range(0, min(n // 3, n) - 1, 2):
            f[i], f[i + 1] = i + 1, i
    else:  # one long cycle through a random order (a 4-cycle fools a fixed-point test)
        order = rng.permutation(n)
        f = np.empty(n, dtype=np.int64)
        f[order] = np.roll(order, -1)
    f = f.astype(np.int64)

    ref = components_reference(f)
    assert same_partition(functional_graph_components(f), ref)
    parent, root, depth = forest(f)
    assert same_partition(root, ref)
    for i in range(n):  # walk up: a forest, with the reported root and depth
        node, steps = i, 0
        while parent[node] != node:
            assert parent[node] == f[node], "only cycle edges are cut"
            node = parent[node]
            steps += 1
            assert steps <= n, "cycle left in the forest"
        assert node == root[i] and steps == depth[i]
    roots = np.flatnonzero(parent == np.arange(n))
    assert len(roots) == len(set(ref.tolist())), "one root per component"

    key = rng.permutation(n)
    rank = rng.permutation(n)
    pos = preorder(parent, root, depth, key, rank)
    assert sorted(pos.tolist()) == list(range(n))
    children = {i: [] for i in range(n)}
    for i in range(n):
        if parent[i] != i:
            children[int(parent[i])].append(i)

    def subtree(v):
        out = [v]
        for c in children[v]:
            out += subtree(c)
        return out

    for v in range(n):  # a depth-first order: every subtree is a contiguous block starting at its root
        block = sorted(pos[subtree(v)].tolist())
        assert block == list(range(pos[v], pos[v] + len(block)))
        kids = sorted(children[v], key=lambda c: key[c])
        assert [pos[c] for c in kids] == sorted(pos[c] for c in kids), "siblings in key order"
    ordered_roots = sorted(roots.tolist(), key=lambda r: rank[r])
    assert [pos[r] for r in ordered_roots] == sorted(pos[r] for r in ordered_roots)


# ---------------------------------------------------------------------------------------------
# input validation


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "64", None])
def test_batch_size_rejected(bad):
    with pytest.raises(ValueError, match="batch_size"):
        plan_epoch(np.arange(4), np.zeros((4, 1), dtype=np.int64), bad)


def test_bad_inputs_name_the_argument():
    nbrs = np.zeros((4, 1), dtype=np.int64)
    with pytest.raises(ValueError, match=r"partners.*\[0, 4\).*partners\[2, 0\] = 7"):
        plan_epoch(np.arange(4), np.array([[1], [0], [7], [0]]), 2)
    with pytest.raises(ValueError, match="partners.*-1"):
        plan_epoch(np.arange(4), np.array([[1], [0], [-1], [0]]), 2, mode="naive")
    with pytest.raises(ValueError, match="anchor_order.*4"):
        plan_epoch(np.array([0, 4]), nbrs, 2)
    with pytest.raises(ValueError, match="anchor_order.*sample 1 appears 2 times"):
        plan_epoch(np.array([1, 0, 1]), nbrs, 2)
    with pytest.raises(ValueError, match="partners.*None"):
        plan_epoch(np.arange(4), None, 2, mode="coherent")
    with pytest.raises(ValueError, match="mode"):
        plan_epoch(np.arange(4), nbrs, 2, mode="greedy")
    with pytest.raises(ValueError, match="partners.*integer"):
        plan_epoch(np.arange(4), nbrs.astype(np.float32), 2)
    with pytest.raises(ValueError, match="partners.*shape"):
        plan_epoch(np.arange(4), np.zeros(4, dtype=np.int64), 2)
    with pytest.raises(ValueError, match="K >= 1"):
        plan_epoch(np.arange(4), np.zeros((4, 0), dtype=np.int64), 2)
    with pytest.raises(ValueError, match="anchor_order.*integer"):
        plan_epoch(np.array([0.0, 1.0]), nbrs, 2)
    with pytest.raises(ValueError, match="seed"):
        plan_epoch(np.arange(4), nbrs, 2, seed=-1)
    with pytest.raises(ValueError, match="num_samples"):
        plan_epoch(np.arange(4), nbrs, 2, num_samples=5)
    with pytest.raises(ValueError, match="anchor_order.*\\[0, 3\\)"):
        plan_epoch(np.arange(4), None, 2, mode="plain", num_samples=3)
    plan = plan_epoch(np.arange(4), None, 2, mode="plain")
    with pytest.raises(ValueError, match="shard_id"):
        plan.shard(2, 2)
    with pytest.raises(ValueError, match="num_shards"):
        plan.shard(0, 0)


# ---------------------------------------------------------------------------------------------
# scale


@pytest.mark.slow
def test_a_million_anchors_plan_quickly():
    """1,000,000 anchors with a shallow 1-NN-like forest (mutual pairs with a few children)."""
    rng = np.random.default_rng(0)
    n = 1_000_000
    f = np.arange(n) ^ 1  # mutual pairs
    leaves = rng.random(n) < 0.4
    f[leaves] = rng.integers(0, n, leaves.sum()) & ~1  # hang 40 % of nodes off a random pair
    nbrs = f[:, None].astype(np.int64)
    plan_epoch(np.arange(n), nbrs, 64, seed=0)  # warm-up
    start = time.perf_counter()
    plan = plan_epoch(np.arange(n), nbrs, 64, seed=0, epoch=1)
    elapsed = time.perf_counter() - start
    assert plan.stats.anchors == n
    assert elapsed < 5.0, f"planning 1M anchors took {elapsed:.2f}s"
