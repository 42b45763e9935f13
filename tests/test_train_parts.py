"""Pieces of the trainer against independent references: AUROC (scikit-learn), in-batch partners
(brute force), the refresh over a pool, stratified subsets, the config, the label-issue list."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from sklearn.metrics import roc_auc_score

from mixnn_fast.refresh.targets import SoftTargets, soft_targets
from mixnn_fast.train.config import TrainConfig
from mixnn_fast.train.datasets import stratified_subset
from mixnn_fast.separation import auroc
from mixnn_fast.refresh.partners import in_batch_partners
from mixnn_fast.refresh.refresh import RefreshOptions, refresh
from mixnn_fast.app.report import write_label_issues
from pool_streaming import stream

E32, E64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps


@given(n=st.integers(2, 200), levels=st.integers(1, 20), seed=st.integers(0, 2**31 - 1))
def test_auroc_matches_sklearn_with_ties(n, levels, seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, levels, n).astype(float)  # few levels: many ties
    positives = rng.random(n) < 0.4
    if positives.all() or not positives.any():
        assert np.isnan(auroc(scores, positives))
    else:
        assert auroc(scores, positives) == pytest.approx(roc_auc_score(positives, scores), abs=1e-12)


@pytest.mark.parametrize("b,k", [(1, 1), (2, 1), (7, 2), (33, 4), (3, 5)])
def test_in_batch_partners_are_nearest_other_anchors(b, k, rng):
    d = 5
    features = torch.from_numpy(rng.normal(size=(b, d)))
    got = in_batch_partners(features, k)
    assert got.shape == (b, k)
    if b == 1:
        assert got.tolist() == [[0] * k]
        return
    # squared distances from differences: no cancellation, the oracle
    sq = torch.cdist(features, features, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    # in_batch_partners may rank by |a|^2 + |b|^2 - 2 a.b (torch.cdist does for larger batches),
    # which rounds to (d + 2) eps of |a|^2 + |b|^2 in whatever order the CPU sums, as does the
    # oracle's (d + 2) eps of the distance: partners closer to a tie than that may come in either order
    norms = (features ** 2).sum(1)
    kk = min(k, b - 1)
    for i in range(b):
        assert i not in got[i].tolist()
        assert len(set(got[i, :kk].tolist())) == kk
        others = torch.tensor([j for j in range(b) if j != i])
        want = sq[i, others].sort().values[:kk]
        slack = 2 * (d + 2) * E64 * (norms[i] + norms.max())
        torch.testing.assert_close(sq[i, got[i, :kk]], want, rtol=0, atol=float(slack))


def test_streaming_the_pool_equals_scoring_it_at_once(rng):
    """Batch by batch (in any order) equals all at once: losses, predictions, features, and the
    label correction of the soft targets."""
    n, c = 50, 6
    given = torch.from_numpy(rng.integers(0, c, n))
    logits = torch.from_numpy(rng.normal(size=(n, c)) * 3).float()
    features = torch.from_numpy(rng.normal(size=(n, 5))).float()
    at_once, batched = SoftTargets(given, c, start_epoch=0), SoftTargets(given, c, start_epoch=0)
    whole = stream(torch.arange(n), at_once, given, epoch=0, logits=logits, features=features, batch=n)
    parts = stream(torch.arange(n), batched, given, epoch=0, logits=logits, features=features, batch=3)
    for name in ("losses", "current_labels", "prob_given", "predicted", "confidence", "features"):
        assert torch.equal(getattr(whole, name), getattr(parts, name)), name
    assert torch.equal(at_once.targets, batched.targets) and whole.corrected and parts.corrected
    p = torch.softmax(logits.double(), 1)
    torch.testing.assert_close(parts.prob_given.double(), p[torch.arange(n), given], rtol=0, atol=4 * E32)
    assert torch.equal(parts.predicted, logits.argmax(1))
    # the EMA with α = 0.9 from the one-hot given labels, in float64
    expected = 0.9 * torch.nn.functional.one_hot(given, c).double() + 0.1 * p
    torch.testing.assert_close(batched.targets.double(), expected, rtol=0, atol=8 * E32)


def test_refresh_over_a_pool_stays_in_the_pool(rng):
    n, c = 60, 4
    labels = torch.from_numpy(rng.integers(0, c, n))
    targets = SoftTargets(labels, c, start_epoch=0)
    pool = torch.from_numpy(np.sort(rng.choice(n, 25, replace=False)))
    before = targets.targets.clone()
    scores = stream(pool, targets, labels, epoch=3, logits=torch.from_numpy(rng.normal(size=(25, c))).float(),
                    features=torch.from_numpy(rng.normal(size=(25, 8))).float())
    result = refresh(scores, RefreshOptions(neighbour_backend="exact"), true_labels=labels)
    table = result.table
    assert torch.equal(table.anchors, pool)  # one row per pool sample, in id order
    assert set(table.partners.flatten().tolist()) <= set(pool.tolist())
    assert (table.partners[:, 0] != pool).all()
    assert table.weights.shape == (25, 2)
    # two float32 weights, each the float64 ratio rounded once (eps / 2), and one float32 addition
    torch.testing.assert_close(table.weights.sum(1), torch.ones(25), rtol=0, atol=2 * E32)
    outside = torch.ones(n, dtype=torch.bool)
    outside[pool] = False
    assert torch.equal(targets.targets[outside], before[outside])  # only the pool's targets moved
    assert not torch.equal(targets.targets[pool], before[pool])
    # eq. 10: λ_i = w_i / (w_i + w_n)
    w = result.clean_prob
    position = {int(s): i for i, s in enumerate(pool)}
    partner = torch.tensor([position[int(s)] for s in table.partners[:, 0]])
    expected = w / (w + w[partner])  # float32: an addition and a division, eps / 2 each
    ok = (w + w[partner]) > 0
    # + ours' one rounding of a float64 ratio; below float32's smallest normal number the rounding
    # is absolute (clean probabilities can underflow that far)
    torch.testing.assert_close(table.weights[ok, 0], expected[ok].float(), rtol=2 * E32,
                               atol=torch.finfo(torch.float32).tiny)


@given(size=st.integers(2, 500), seed=st.integers(0, 100))
def test_stratified_subset_keeps_class_shares(size, seed):
    labels = np.repeat(np.arange(5), [300, 100, 50, 40, 10])
    idx = stratified_subset(labels, size, seed)
    assert len(idx) == min(size, len(labels)) and len(set(idx.tolist())) == len(idx)
    counts = np.bincount(labels[idx], minlength=5)
    share = np.bincount(labels, minlength=5) / len(labels) * len(idx)
    assert np.all(np.abs(counts - share) <= 1)


def test_config_validation_and_yaml_round_trip(tmp_path):
    cfg = TrainConfig(method="sce", epochs=7, model_widths=[8, 16, 32, 32])
    cfg.save_yaml(tmp_path / "c.yaml")
    assert TrainConfig.from_yaml(tmp_path / "c.yaml") == cfg
    assert TrainConfig.from_yaml(tmp_path / "c.yaml", epochs=9).epochs == 9
    (tmp_path / "bad.yaml").write_text("method: mixnn\nepochz: 3\n")
    with pytest.raises(ValueError, match="epochz"):
        TrainConfig.from_yaml(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        TrainConfig.from_yaml(tmp_path / "list.yaml")


@pytest.mark.parametrize("field,value", [("method", "dividemix"), ("epochs", 0), ("noise_rate", 1.5),
                                         ("weights", "median"), ("lr_min", 1.0), ("partners", "far"),
                                         ("num_neighbours", 0), ("correction_momentum", -0.1)])
def test_config_rejects_out_of_range_values(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_label_issues_most_suspicious_first(tmp_path):
    path = write_label_issues(tmp_path / "issues.csv", given=np.array([0, 1, 2]), corrected=np.array([0, 2, 2]),
                              clean_prob=np.array([0.9, 0.1, 0.5]), paths=["a.jpg", "b.jpg", "c.jpg"],
                              true=np.array([0, 2, 2]), classes=["x", "y", "z"])
    rows = list(csv.DictReader(path.open()))
    assert [r["sample_id"] for r in rows] == ["1", "2", "0"]
    assert rows[0]["path"] == "b.jpg" and rows[0]["given_name"] == "y" and rows[0]["corrected_name"] == "z"


def test_metrics_log_writes_jsonl_csv_and_tensorboard(tmp_path):
    from mixnn_fast.train.metrics import MetricsLog

    log = MetricsLog(tmp_path, tensorboard=True)
    log.log({"epoch": 0, "train_loss": 2.0})
    log.log({"epoch": 1, "train_loss": 1.5, "test_accuracy": 0.6})  # a column appears later
    log.close()
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [r["test_accuracy"] for r in rows] == ["", "0.6"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    resumed = MetricsLog(tmp_path, tensorboard=False, resume=True)
    resumed.truncate(1)
    assert [r["epoch"] for r in resumed.rows] == [0]


@pytest.mark.parametrize("gmm_loss", ["soft_targets", "argmax_targets", "given"])
def test_refresh_gmm_losses_follow_the_chosen_labels(gmm_loss, rng):
    """The losses the GMM is fitted on, against a float64 reference: cross-entropy against the soft
    targets, against their argmax, or against the given labels (here the three differ)."""
    n, c = 40, 5
    given = torch.from_numpy(rng.integers(0, c, n))
    true = torch.from_numpy(rng.integers(0, c, n))
    targets = SoftTargets(given, c, start_epoch=0)
    soft = torch.from_numpy(rng.dirichlet(np.ones(c), n)).float()
    targets.targets.copy_(soft.to(targets.targets.dtype))
    logits = torch.from_numpy(rng.normal(size=(n, c))).float()
    scores = stream(torch.arange(n), targets, given, epoch=0, logits=logits,
                    features=torch.from_numpy(rng.normal(size=(n, 4))).float(), gmm_loss=gmm_loss, correct=False)
    result = refresh(scores, RefreshOptions(neighbour_backend="exact"), true_labels=true)
    log_p = torch.log_softmax(logits.double(), 1)
    stored = targets.targets.double()
    expected = {"soft_targets": -(stored * log_p).sum(1),
                "argmax_targets": -log_p.gather(1, stored.argmax(1, keepdim=True)).squeeze(1),
                "given": -log_p.gather(1, given.unsqueeze(1)).squeeze(1)}[gmm_loss]
    # float32 log_softmax: z_j - max rounds to eps of |z_j - max|, the sum of C exponentials to C eps
    # (relative, so absolute in its log), the log and the final subtraction to eps of their
    # results; the soft-target loss sums C such terms weighted by targets that sum to 1
    spread = (logits - logits.max(1, keepdim=True).values).abs().max(1).values.double()
    bound = E32 * (2 * c + 2 * spread + 2 * expected.abs())
    assert ((result.losses.double() - expected).abs() <= bound).all(), \
        float(((result.losses.double() - expected).abs() / bound).max())
    # the labels those losses were measured against (what a GMM per class groups by)
    assert torch.equal(scores.loss_labels, given if gmm_loss == "given" else stored.argmax(1))
    current_right = (stored.argmax(1) == true).numpy()
    if 0 < current_right.sum() < n:  # the AUROC of what the GMM detects once labels are corrected
        assert result.stats["clean_auroc_current_labels"] == pytest.approx(
            roc_auc_score(current_right, result.clean_prob.numpy()))


def test_selective_correction_moves_only_the_samples_marked_noisy(rng):
    """MixNN+: the EMA touches exactly the samples the mask marks (the last GMM's noisy ones)."""
    from mixnn_fast.train.config import TrainConfig
    from mixnn_fast.train.methods import correction_mask

    n, c = 40, 5
    given = torch.from_numpy(rng.integers(0, c, n))
    clean_prob = torch.from_numpy(rng.uniform(size=n)).float()
    clean_prob[3] = float("nan")  # not in the last pool: never corrected
    cfg = TrainConfig(method="mixnn_plus", plus_correction="selective")
    mask = correction_mask(cfg, clean_prob, n)
    assert mask.tolist() == (clean_prob < 0.5).tolist() and not mask[3]
    assert correction_mask(TrainConfig(method="mixnn"), clean_prob, n) is None
    assert not correction_mask(cfg, None, n).any()  # before any GMM nothing is known noisy
    targets = SoftTargets(given, c, start_epoch=0)
    before = targets.targets.clone()
    stream(torch.arange(n), targets, given, epoch=0, logits=torch.from_numpy(rng.normal(size=(n, c))).float(),
           features=torch.zeros(n, 2), correct_only=mask)
    moved = (targets.targets != before).any(1)
    assert moved.tolist() == mask.tolist()


@pytest.mark.parametrize("n,c,storage", [(1, 3, "float32"), (43, 5, "float32"), (120, 7, "topk")])
def test_graded_correction_scales_each_samples_step_by_its_noise_probability(rng, n, c, storage):
    """MixNN+'s graded correction: t <- t + (1 - m)(1 - w)(p - t) per sample (w its clean
    probability, 0 step where unscored or before any GMM), against a float64 reference."""
    from mixnn_fast.train.methods import correction_mask

    momentum = 0.9
    given = torch.from_numpy(rng.integers(0, c, n))
    clean_prob = torch.from_numpy(rng.uniform(size=n)).float()
    clean_prob[rng.integers(0, n)] = float("nan")  # not in the last pool: never corrected
    if n > 2:
        clean_prob[rng.integers(0, n, 2)] = torch.tensor([0.0, 1.0])  # the ends: full step, none
    cfg = TrainConfig(method="mixnn_plus", plus_correction="graded")
    share = correction_mask(cfg, clean_prob, n)
    assert share.dtype == torch.float32
    assert torch.equal(share, torch.nan_to_num(1 - clean_prob, nan=0.0))
    assert not correction_mask(cfg, None, n).any()  # before any GMM nothing is known noisy
    targets = soft_targets(given, c, start_epoch=0, momentum=momentum, storage=storage,
                           top_k=c if storage == "topk" else None)
    everyone = torch.arange(n)
    # one rounding to the storage per step: float32's, or top-k's float16 values (half an ulp
    # below 1 is 2^-12; 2^-10 leaves room for its renormalisation)
    tolerance = 1e-6 if storage == "float32" else 2.0 ** -10
    logits = torch.from_numpy(rng.normal(size=(n, c)))
    # two steps, so that the second starts from soft targets, not one-hot ones
    for _ in range(2):
        before = targets.rows(everyone).double()
        stream(everyone, targets, given, epoch=0, logits=logits.float(), features=torch.zeros(n, 2),
               correct_only=share)
        p = torch.softmax(logits, dim=1)
        expected = before + (1 - momentum) * share.double().unsqueeze(1) * (p - before)
        after = targets.rows(everyone).double()
        assert torch.allclose(after, expected, rtol=0, atol=tolerance), float((after - expected).abs().max())
    unscored = torch.isnan(clean_prob)
    assert (targets.rows(everyone)[unscored] == torch.nn.functional.one_hot(given[unscored], c).float()).all()


def _agreement_reference(counts, ids, predicted, current, k):
    """update_agreement written as a loop over samples, in plain Python."""
    counts = [int(c) for c in counts]
    for i, p, c in zip(ids.tolist(), predicted.tolist(), current.tolist()):
        if counts[i] >= k:
            continue  # frozen for good
        counts[i] = counts[i] + 1 if p == c else 0
    return counts


@pytest.mark.parametrize("n,k", [(1, 1), (37, 2), (250, 3)])
def test_agreement_counts_consecutive_refreshes_and_freezes_for_good(rng, n, k):
    """MixNN+'s freeze: the count grows while the model predicts the current label, drops to 0
    when it does not, stops at ``plus_freeze``; refreshes before the correction start count
    nothing; the pool may be any subset of the samples."""
    from mixnn_fast.train.methods import correction_mask, update_agreement

    c = 4
    cfg = TrainConfig(method="mixnn_plus", plus_freeze=k, correction_start=5)
    agreement = torch.zeros(n, dtype=torch.int16)
    expected = [0] * n
    for epoch in range(3, 14):
        ids = torch.from_numpy(np.sort(rng.choice(n, size=max(1, n * 2 // 3), replace=False)))
        current = torch.from_numpy(rng.integers(0, c, len(ids)))
        # mostly agreeing, so that some samples reach k
        predicted = torch.where(torch.from_numpy(rng.uniform(size=len(ids)) < 0.8), current,
                                torch.from_numpy(rng.integers(0, c, len(ids))))
        update_agreement(cfg, agreement, ids, predicted, current, epoch)
        if epoch >= cfg.correction_start:
            expected = _agreement_reference(expected, ids, predicted, current, k)
        assert agreement.tolist() == expected, epoch
    assert agreement.dtype == torch.int16 and int(agreement.max()) <= k
    if n > 1:
        assert (agreement >= k).any() and (agreement < k).any()  # the case both ways
    clean_prob = torch.from_numpy(rng.uniform(size=n)).float()
    mask = correction_mask(cfg, clean_prob, n, agreement)
    assert mask.tolist() == [p < 0.5 and a < k for p, a in zip(clean_prob.tolist(), agreement.tolist())]
    # without a freeze (or with MixNN's correction of every sample) the counts are ignored
    assert correction_mask(TrainConfig(method="mixnn_plus"), clean_prob, n, agreement).tolist() == \
        (clean_prob < 0.5).tolist()
    assert correction_mask(TrainConfig(method="mixnn_plus", plus_correction="all"), clean_prob, n, agreement) is None
    # a freeze where there is no selective correction to freeze would do nothing: refused
    for other in (dict(method="mixnn"), dict(method="mixnn_plus", plus_correction="all")):
        with pytest.raises(ValueError, match="plus_freeze"):
            TrainConfig(plus_freeze=k, **other)


def _stability_reference(stable, last, ids, predicted):
    """update_stability written as a loop over samples, in plain Python."""
    stable, last = [int(s) for s in stable], [int(p) for p in last]
    for i, p in zip(ids.tolist(), predicted.tolist()):
        stable[i] = min(stable[i] + 1, 32767) if last[i] == p else 1
        last[i] = p
    return stable, last


@pytest.mark.parametrize("n,k", [(1, 1), (41, 2), (263, 3)])
def test_stability_counts_refreshes_with_one_prediction_and_gates_the_correction(rng, n, k):
    """MixNN+'s stability gate: the count grows while the model predicts the same class, restarts
    at 1 when the prediction changes; samples outside a refresh's pool keep theirs; only samples
    the GMM calls noisy *and* whose count reached ``plus_consistent`` are corrected."""
    from mixnn_fast.train.methods import correction_mask, update_stability

    c = 5
    cfg = TrainConfig(method="mixnn_plus", plus_consistent=k, plus_consistent_min_agreement=0.0)  # gate always on
    stable = torch.zeros(n, dtype=torch.int16)
    last = torch.full((n,), -1, dtype=torch.int16)
    expected_stable, expected_last = [0] * n, [-1] * n
    previous = torch.from_numpy(rng.integers(0, c, n))
    for _ in range(9):
        ids = torch.from_numpy(np.sort(rng.choice(n, size=max(1, n * 2 // 3), replace=False)))
        # mostly the same prediction as before, so that some samples reach k
        keep = torch.from_numpy(rng.uniform(size=len(ids)) < 0.75)
        predicted = torch.where(keep, previous[ids], torch.from_numpy(rng.integers(0, c, len(ids))))
        previous[ids] = predicted
        update_stability(stable, last, ids, predicted)
        expected_stable, expected_last = _stability_reference(expected_stable, expected_last, ids, predicted)
        assert stable.tolist() == expected_stable and last.tolist() == expected_last
    assert stable.dtype == last.dtype == torch.int16
    if n > 1:
        assert (stable >= k).any() and (stable < k).any()  # the case both ways
    clean_prob = torch.from_numpy(rng.uniform(size=n)).float()
    clean_prob[0] = float("nan")  # not scored: never corrected
    mask = correction_mask(cfg, clean_prob, n, stable=stable)
    assert mask.tolist() == [p < 0.5 and s >= k for p, s in zip(clean_prob.tolist(), stable.tolist())]
    assert not correction_mask(cfg, clean_prob, n, stable=None).any()  # nothing counted yet: nothing stable
    # without the gate the counts are ignored
    assert correction_mask(TrainConfig(method="mixnn_plus", plus_consistent=0), clean_prob, n, stable=stable).tolist() == \
        (clean_prob < 0.5).tolist()
    # with a minimum agreement, the gate holds only after a refresh whose predictions agreed with
    # the given labels on at least that share (none recorded: it does not)
    threshold = float(rng.uniform(0.2, 0.8))
    gated_only_sometimes = TrainConfig(method="mixnn_plus", plus_consistent=k, plus_consistent_min_agreement=threshold)
    for given_agreement, gate in ((threshold - 1e-3, False), (threshold, True), (threshold + 1e-3, True),
                                  (None, False)):
        expected = [p < 0.5 and (s >= k or not gate) for p, s in zip(clean_prob.tolist(), stable.tolist())]
        assert correction_mask(gated_only_sometimes, clean_prob, n, stable=stable,
                               given_agreement=given_agreement).tolist() == expected
    assert correction_mask(cfg, clean_prob, n, stable=stable, given_agreement=0.0).tolist() == mask.tolist()
    # counts saturate instead of wrapping round
    full = torch.full((1,), 32767, dtype=torch.int16)
    update_stability(full, torch.zeros(1, dtype=torch.int16), torch.zeros(1, dtype=torch.int64),
                     torch.zeros(1, dtype=torch.int64))
    assert int(full) == 32767
    for other in (dict(method="mixnn"), dict(method="mixnn_plus", plus_correction="graded")):
        with pytest.raises(ValueError, match="plus_consistent"):
            TrainConfig(plus_consistent=k + 2, **other)  # 2 is the default: accepted with any method


def test_an_evaluation_pass_served_nothing_gives_nan_rows_when_missing_is_allowed():
    """A process whose shard of a small test set is empty (DDP) was served no batch: with
    ``allow_missing`` its logits are all NaN (they count as not scored), without it the pass is
    an error naming the uncovered samples."""
    from mixnn_fast.refresh.forward import forward_pass
    from mixnn_fast.train.inference import Inference

    model = torch.nn.Linear(3, 2)
    with pytest.raises(RuntimeError, match="did not cover 5 of 5"):
        forward_pass(model, [], torch.arange(5), torch.device("cpu"))
    empty = forward_pass(model, [], torch.arange(5), torch.device("cpu"), allow_missing=True)
    assert empty.logits.shape == (0, 0) and len(empty.ids) == 0

    class NoCopy(Inference):
        def pass_over(self, loader, ids, desc):
            return forward_pass(self.model, loader, ids, self.device, allow_missing=self.allow_missing)

    logits = NoCopy(model, torch.device("cpu"), autocast_dtype=None, memory_format=torch.contiguous_format,
                    progress=False, allow_missing=True).logits([], 5)
    assert logits.shape[0] == 5 and torch.isnan(logits).all()


@pytest.mark.parametrize("plus_loss", ["ce", "gce", "sce"])
def test_mixnn_plus_loss_on_mixed_targets_matches_float64_formula(plus_loss, rng):
    from mixnn_fast.train.methods import loss_function

    b, c = 13, 7
    logits = torch.from_numpy(rng.normal(scale=3.0, size=(b, c)))
    targets = torch.from_numpy(rng.dirichlet(np.full(c, 0.3), size=b))  # soft, like mixed targets
    cfg = TrainConfig(method="mixnn_plus", plus_loss=plus_loss, gce_q=0.6, sce_alpha=0.3, sce_beta=0.8)
    got = loss_function(cfg)(logits.float(), targets.float())
    p = torch.softmax(logits, dim=1)  # float64 reference, written out from the papers' formulas
    ce = -(targets * torch.log(p)).sum(1)
    want = {"ce": ce,
            "gce": (targets * (1 - p.clamp_min(1e-7) ** 0.6) / 0.6).sum(1),
            "sce": 0.3 * ce - 0.8 * (p * torch.log(targets.clamp(1e-4, 1.0))).sum(1)}[plus_loss].mean()
    assert float(got) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("n,vote,k", [(37, 5, 1), (60, 1, 2), (9, 20, 1)])
def test_neighbour_vote_raises_clean_probability_to_the_neighbours_agreement(n, vote, k, rng):
    """MixNN+'s vote against brute force in float64: the clean probability is the GMM's, or the share
    of the sample's ``vote`` nearest others (all n - 1 when the pool is smaller) that carry its
    current label, whichever is larger; the partners stay the k nearest."""
    c = 3
    given = torch.from_numpy(rng.integers(0, c, n))
    targets = SoftTargets(given, c, start_epoch=0)
    logits = torch.from_numpy(rng.normal(size=(n, c))).float()
    features = torch.from_numpy(rng.normal(size=(n, 6))).float()
    args = dict(epoch=0, logits=logits, features=features, correct=False)
    plain = refresh(stream(torch.arange(n), targets, given, **args),
                    RefreshOptions(neighbour_backend="exact", num_neighbours=k))
    voted = refresh(stream(torch.arange(n), targets, given, **args),
                    RefreshOptions(neighbour_backend="exact", num_neighbours=k, label_vote=vote))
    distances = torch.cdist(features.double(), features.double())
    distances.fill_diagonal_(float("inf"))
    order = distances.argsort(dim=1)[:, :n - 1]  # no ties among continuous random features
    shared = (given[order[:, :min(vote, n - 1)]] == given.unsqueeze(1)).double().mean(1)
    expected = torch.maximum(plain.clean_prob.double(), shared)
    torch.testing.assert_close(voted.clean_prob.double(), expected, rtol=0, atol=E32)
    assert torch.equal(voted.table.partners, order[:, :k])
    assert torch.equal(plain.table.partners, order[:, :k])
    called = ((plain.clean_prob < 0.5) & (shared >= 0.5)).double().mean()
    assert voted.stats["called_clean_by_vote"] == pytest.approx(float(called))


def test_gmm_separation_matches_ashmans_d_of_scikit_learns_fit(rng):
    from sklearn.mixture import GaussianMixture

    from mixnn_fast.refresh.gmm import GMM1D
    from mixnn_fast.refresh.refresh import gmm_separation

    x = np.concatenate([rng.normal(0.0, 1.0, 301), rng.normal(4.0, 2.0, 157)])
    ours = GMM1D(max_iter=500, tol=1e-12, reg_covar=1e-6, dtype=torch.float64).fit(torch.from_numpy(x))
    ref = GaussianMixture(2, max_iter=500, tol=1e-12, reg_covar=1e-6, random_state=0).fit(x[:, None])
    mu, var = ref.means_.ravel(), ref.covariances_.ravel()
    expected = np.sqrt(2) * abs(mu[0] - mu[1]) / np.sqrt(var.sum())
    assert gmm_separation(ours) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("split", [True, False])
def test_split_check_calls_nobody_noisy_unless_the_losses_split_in_two(split, rng):
    n, c = 80, 4
    given = torch.from_numpy(rng.integers(0, c, n))
    targets = SoftTargets(given, c, start_epoch=0)
    logits = torch.from_numpy(rng.normal(scale=0.05, size=(n, c))).float()  # every loss near log C: one bump
    if split:  # a quarter of the samples the model contradicts strongly: two bumps far apart
        logits += 8.0 * torch.nn.functional.one_hot(given, c).float()
        logits[: n // 4] -= 16.0 * torch.nn.functional.one_hot(given[: n // 4], c).float()
    args = dict(epoch=0, logits=logits, features=torch.from_numpy(rng.normal(size=(n, 3))).float(), correct=False)
    plain = refresh(stream(torch.arange(n), targets, given, **args), RefreshOptions(neighbour_backend="exact"))
    checked = refresh(stream(torch.arange(n), targets, given, **args),
                      RefreshOptions(neighbour_backend="exact", split_check=True))
    assert (plain.stats["gmm_separation"] > 2) == split
    if split:
        assert torch.equal(checked.clean_prob, plain.clean_prob) and (plain.clean_prob[: n // 4] < 0.5).all()
    else:
        assert (checked.clean_prob == 1).all() and not (plain.clean_prob == 1).all()
        assert (checked.table.weights == 0.5).all()  # every sample trusted: each mixed evenly with its neighbour


@pytest.mark.parametrize("threshold", [0.0, 0.2, 0.3, 0.5, 1.0])
def test_split_check_applies_only_where_predictions_agree_with_the_given_labels(threshold):
    rng = np.random.default_rng(7)  # one draw whose losses do not split (checked below), for every threshold
    n, c = 80, 4
    given = torch.from_numpy(rng.integers(0, c, n))
    targets = SoftTargets(given, c, start_epoch=0)
    # every loss near log C: one bump; the predictions (argmax of the noise) agree with about a
    # quarter of the given labels
    logits = torch.from_numpy(rng.normal(scale=0.05, size=(n, c))).float()
    args = dict(epoch=0, logits=logits, features=torch.from_numpy(rng.normal(size=(n, 3))).float(), correct=False)
    plain = refresh(stream(torch.arange(n), targets, given, **args), RefreshOptions(neighbour_backend="exact"))
    checked = refresh(stream(torch.arange(n), targets, given, **args),
                      RefreshOptions(neighbour_backend="exact", split_check=True, split_check_min_agreement=threshold))
    agreement = float((logits.double().argmax(1) == given).double().mean())
    assert checked.stats["given_label_agreement"] == pytest.approx(agreement)
    assert plain.stats["gmm_separation"] < 2 and not (plain.clean_prob == 1).all()
    applies = agreement >= threshold
    assert checked.stats["split_check_applied"] == float(applies) and "split_check_applied" not in plain.stats
    if applies:
        assert (checked.clean_prob == 1).all()
    else:
        assert torch.equal(checked.clean_prob, plain.clean_prob)


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.9])
def test_trust_weights_apply_only_where_predictions_agree_with_the_given_labels(threshold, rng):
    from mixnn_fast.refresh.weights import mixing_weights

    n, c = 50, 3
    given = torch.from_numpy(rng.integers(0, c, n))
    targets = SoftTargets(given, c, start_epoch=0)
    logits = torch.from_numpy(rng.normal(size=(n, c))).float()
    logits[: n // 2] += 5 * torch.nn.functional.one_hot(given[: n // 2], c).float()  # about 2/3 agree
    scores = stream(torch.arange(n), targets, given, epoch=0, logits=logits,
                    features=torch.from_numpy(rng.normal(size=(n, 4))).float(), correct=False)
    result = refresh(scores, RefreshOptions(neighbour_backend="exact", weights_mode="trust",
                                            trust_min_agreement=threshold))
    agreement = (logits.double().argmax(1) == given).double().mean()
    assert result.stats["given_label_agreement"] == pytest.approx(float(agreement))
    trusted = bool(agreement >= threshold)
    assert result.stats["anchors_trusted"] == float(trusted)
    position = result.table.partners[:, 0]  # ids 0..n-1: ids are positions here
    expected = mixing_weights(result.clean_prob, position.unsqueeze(1), mode="trust" if trusted else "gmm")
    assert torch.equal(result.table.weights, expected)


@pytest.mark.parametrize("pairs", ["symmetric", "one_pair"])
@pytest.mark.parametrize("min_spread", [0.0, 0.35, 0.95])
def test_trust_weights_apply_only_where_disagreements_spread_over_many_class_pairs(pairs, min_spread, rng):
    """The spread gate: trusted anchors only at a refresh whose disagreement spread reached
    ``trust_min_spread``; the spread recomputed here from its definition (scipy's entropy)."""
    from scipy.stats import entropy

    from mixnn_fast.refresh.weights import mixing_weights

    n, c = 61, 5
    given = torch.from_numpy(rng.integers(0, c, n))
    predicted = given.clone()
    disagree = torch.from_numpy(rng.permutation(n)[:25])
    if pairs == "symmetric":  # every other class, drawn at random
        predicted[disagree] = (given[disagree] + torch.from_numpy(rng.integers(1, c, len(disagree)))) % c
    else:  # one class to the next: few ordered pairs
        predicted[disagree] = (given[disagree] + 1) % c
    logits = 6 * torch.nn.functional.one_hot(predicted, c).float() + 0.1 * torch.from_numpy(
        rng.normal(size=(n, c))).float()
    targets = SoftTargets(given, c, start_epoch=0)
    scores = stream(torch.arange(n), targets, given, epoch=0, logits=logits,
                    features=torch.from_numpy(rng.normal(size=(n, 4))).float(), correct=False)
    result = refresh(scores, RefreshOptions(neighbour_backend="exact", weights_mode="trust",
                                            trust_min_agreement=0.5, trust_min_spread=min_spread))
    wrong = predicted != given
    counts = np.bincount((given[wrong] * c + predicted[wrong]).numpy(), minlength=c * c)
    spread = np.exp(entropy(counts[counts > 0])) / min(int(wrong.sum()), c * (c - 1))
    assert result.stats["disagreement_spread"] == pytest.approx(spread)
    trusted = bool(spread >= min_spread)  # 36 of 61 agree: the agreement gate holds
    assert result.stats["anchors_trusted"] == float(trusted)
    if pairs == "one_pair" and min_spread == 0.35:
        assert not trusted  # the case the gate is for
    position = result.table.partners[:, 0]
    expected = mixing_weights(result.clean_prob, position.unsqueeze(1), mode="trust" if trusted else "gmm")
    assert torch.equal(result.table.weights, expected)
