"""End to end on scikit-learn's digits (real, small): every method trains through the same
loader, checkpoints, resumes, reports; the CLI drives it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import make_clothing1m

from mixnn_fast.app.cli import main as mixnn_main
from mixnn_fast.train.config import TrainConfig
from mixnn_fast.app.report import write_run_report
from mixnn_fast.train.trainer import CHECKPOINT, Trainer


def tiny_config(tmp_path, **overrides) -> TrainConfig:
    values = dict(dataset="digits", noise="symmetric_uniform", noise_rate=0.4, model="small_cnn",
                  model_widths=[8, 16, 16, 16], epochs=3, warmup_epochs=1, correction_start=2, restart_period=2,
                  batch_size=64, progress=False, tensorboard=False, out_dir=str(tmp_path / "run"), num_threads=2)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.parametrize("method", ["ce", "mixup", "gce", "sce", "mixnn"])
def test_every_method_trains_and_logs(tmp_path, method):
    trainer = Trainer(tiny_config(tmp_path, method=method))
    summary = trainer.fit()
    rows = trainer.metrics.rows
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert all(r["train_loss"] == r["train_loss"] for r in rows)  # finite, not NaN
    assert 0 <= summary["final_test_accuracy"] <= 1
    assert (tmp_path / "run" / CHECKPOINT).exists()
    if method == "mixnn":
        assert [r["phase"] for r in rows] == ["plain", "mixnn", "mixnn"]
        assert 0 <= rows[-1]["clean_auroc"] <= 1 and "correction_accuracy" in rows[-1]
        assert rows[-1]["extra_decode_fraction"] < 0.5  # neighbour-coherent batches
    # a model that learnt something beats chance (10 classes) on clean test digits
    if method in ("ce", "mixnn"):
        assert summary["best_test_accuracy"] > 0.2


@pytest.mark.parametrize("options", [dict(partners="in_batch"), dict(partners="random"), dict(weights="avg"),
                                     dict(weights="rdm"), dict(num_neighbours=2), dict(plan="naive"),
                                     dict(label_correction=False), dict(mix_given_labels=True),
                                     dict(authors_schedule=True), dict(gmm_history=2, gmm_loss="given"),
                                     dict(gmm_loss="argmax_targets"), dict(augment=False),
                                     dict(targets_storage="topk"), dict(targets_storage="float16"),
                                     dict(features_dtype="float16")])
def test_mixnn_ablations_run(tmp_path, options):
    trainer = Trainer(tiny_config(tmp_path, method="mixnn", epochs=2, **options))
    trainer.fit()
    # the authors' schedule trains plain mixup until label correction starts (epoch 2 here)
    assert trainer.metrics.rows[-1]["phase"] == ("mixup" if options.get("authors_schedule") else "mixnn")
    if options.get("plan") == "naive":
        assert trainer.metrics.rows[-1]["extra_decode_fraction"] == pytest.approx(options.get("num_neighbours", 1))


def test_resume_continues_from_the_checkpoint(tmp_path):
    first = Trainer(tiny_config(tmp_path, method="mixnn", epochs=2))
    first.fit()
    saved = {k: v.clone() for k, v in first.model.state_dict().items()}
    resumed = Trainer(tiny_config(tmp_path, method="mixnn", epochs=3), resume=True)
    assert resumed.start_epoch == 2
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert torch.equal(resumed.targets.targets, first.targets.targets)
    summary = resumed.fit()
    rows = resumed.metrics.rows
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    # the wall time counts the first process's epochs too, not only the resumed one's
    assert all(r["epoch_seconds"] > 0 for r in rows)
    assert summary["wall_seconds"] == pytest.approx(sum(r["epoch_seconds"] for r in rows))
    assert summary["wall_seconds"] > rows[-1]["epoch_seconds"]
    with pytest.raises(ValueError, match="noise_rate"):
        Trainer(tiny_config(tmp_path, method="mixnn", epochs=3, noise_rate=0.2), resume=True)


def test_report_files(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, method="mixnn"))
    summary = trainer.fit()
    summary = write_run_report(trainer.out_dir, trainer.label_record(), summary)
    for key in ("label_issues", "accuracy_plot", "clean_probability_plot", "confusion_plot"):
        assert (tmp_path / "run").joinpath(summary["files"][key].split("/")[-1]).exists(), key
    assert 0 <= summary["label_accuracy_after_correction"] <= 1
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["method"] == "mixnn"


def test_cli_train_and_evaluate(tmp_path, capsys):
    out = tmp_path / "cli"
    code = mixnn_main(["train", "--dataset", "digits", "--method", "ce", "--epochs", "1", "--model-widths", "8", "16",
                       "16", "16", "--no-progress", "--no-tensorboard", "--out-dir", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["wall_seconds"] > 0  # what the run cost, for the table
    assert mixnn_main(["evaluate", str(out), "--no-progress"]) == 0
    assert "test_accuracy" in capsys.readouterr().out
    assert mixnn_main(["train", "--dataset", "digits", "--method", "nope", "--out-dir", str(out)]) == 2
    assert "method" in capsys.readouterr().err


def test_no_augmentation_gives_the_same_images_every_epoch(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, method="ce", augment=False))
    assert trainer.loaders.plain.options.pad == 0 and not trainer.loaders.plain.options.flip
    seen = []
    for epoch in (0, 1):
        trainer.loaders.plain.set_epoch(epoch)
        batch = next(iter(trainer.loaders.plain))
        x, _ = batch.mix()
        seen.append({int(i): x[j] for j, i in enumerate(batch.anchor_ids)})
    common = sorted(set(seen[0]) & set(seen[1]))
    assert common and all(torch.equal(seen[0][i], seen[1][i]) for i in common)


def test_no_augmentation_is_refused_for_image_files(tmp_path):
    with pytest.raises(ValueError, match="augment"):
        tiny_config(tmp_path, dataset="image_folder", data_root=str(tmp_path), augment=False)


def test_clothing1m_balanced_draw_is_made_once_per_epoch_and_covers_loader_and_refresh(tmp_path, monkeypatch):
    import mixnn_fast.train.loaders as loaders_module

    fixture = make_clothing1m(tmp_path / "clothing1m", n_noisy_train=42, size=32)
    seeds: list[int] = []
    original = loaders_module.balanced_subset

    def counted(description, num_batches, batch_size, seed):
        seeds.append(seed)
        return original(description, num_batches, batch_size, seed)

    monkeypatch.setattr(loaders_module, "balanced_subset", counted)
    cfg = tiny_config(tmp_path, dataset="clothing1m", data_root=str(fixture.root), noise="none", method="mixnn",
                      epochs=2, warmup_epochs=1, correction_start=1, num_batches=2, batch_size=8, seed=5)
    trainer = Trainer(cfg)
    trainer.fit()
    assert seeds == [5, 6]  # one draw per epoch although the loader and the refresh both use it
    drawn = original(trainer.data.train, 2, 8, 6)
    assert torch.equal(trainer.last_refresh.ids, torch.from_numpy(np.sort(drawn)))
    assert trainer.loaders.mix.make_plan(1).stats.anchors == len(drawn)


def _folder_with_a_corrupt_image(tmp_path):
    from fixtures import make_jpeg_folder

    train = make_jpeg_folder(tmp_path / "train", n_per_class=6, size=40, num_classes=2)
    test = make_jpeg_folder(tmp_path / "test", n_per_class=3, size=40, num_classes=2, seed=1)
    bad = train.paths[4]
    Path(bad).write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)  # a JPEG header, then garbage
    return train, test, bad


CORRUPT_RUN = ["--dataset", "image_folder", "--noise", "none", "--method", "mixnn", "--epochs", "3",
               "--warmup-epochs", "1", "--correction-start", "2", "--restart-period", "1", "--batch-size", "4",
               "--model-widths", "4", "8", "8", "8", "--no-progress", "--no-tensorboard", "--num-threads", "1"]


def test_a_corrupt_image_mid_epoch_is_skipped_and_counted(tmp_path, capsys):
    train, test, bad = _folder_with_a_corrupt_image(tmp_path)
    out = tmp_path / "run"
    code = mixnn_main(["train", *CORRUPT_RUN, "--data-root", str(train.root), "--test-root", str(test.root),
                       "--on-error", "skip", "--out-dir", str(out)])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_images"] == 1 and list(summary["skipped_files"]) == [bad]
    assert summary["epochs"] == 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["skipped_images"] == 1 for r in rows)


def test_a_corrupt_image_is_named_when_not_skipping(tmp_path, capsys):
    train, test, bad = _folder_with_a_corrupt_image(tmp_path)
    code = mixnn_main(["train", *CORRUPT_RUN, "--data-root", str(train.root), "--test-root", str(test.root),
                       "--out-dir", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert bad in err and "on_error" in err


def test_a_list_file_leaving_the_dataset_root_is_refused_by_line(tmp_path, capsys):
    """mixnn train on a file list that names ``../`` paths: an error naming the list file and
    line, before anything is written; --allow-outside-root reads them."""
    from fixtures import make_path_label_list

    data = make_path_label_list(tmp_path / "data", n_per_class=4, size=40, num_classes=2)
    lines = data.list_path.read_text().splitlines()
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(Path(data.paths[0]).read_bytes())
    lines[2] = f"../outside.jpg {lines[2].rsplit(' ', 1)[1]}"
    data.list_path.write_text("\n".join(lines) + "\n")
    run = ["train", "--dataset", "file_list", "--data-root", str(data.list_path), "--noise", "none",
           "--method", "ce", "--epochs", "1", "--batch-size", "4", "--model-widths", "4", "8", "8", "8",
           "--no-progress", "--no-tensorboard", "--num-threads", "1", "--out-dir", str(tmp_path / "run")]
    assert mixnn_main(run) == 2
    err = capsys.readouterr().err
    assert f"{data.list_path}, line 3" in err and "outside" in err
    assert not (tmp_path / "run").exists()
    assert mixnn_main(run + ["--allow-outside-root"]) == 0


# ---- behaviour fixed with the partner table (each of these failed before it) ---------------------


def _epoch_batches(trainer, epoch: int):
    """The batches of ``epoch`` as the trainer sets them up (partners and weights attached)."""
    loader, _, _ = trainer._start_epoch(epoch)
    return list(loader)


def test_mixup_never_pairs_a_sample_with_itself_and_draws_one_lambda_per_batch(tmp_path, monkeypatch):
    import mixnn_fast.refresh.partners as partners_module

    modes = []
    original = partners_module.mixing_weights

    def spy(*args, **kwargs):
        modes.append(kwargs.get("mode"))
        return original(*args, **kwargs)

    monkeypatch.setattr(partners_module, "mixing_weights", spy)
    trainer = Trainer(tiny_config(tmp_path, method="mixup"))
    batches = _epoch_batches(trainer, 0)
    assert modes and set(modes) == {"mixup"}  # the weights come from weights.py's own mixup mode
    lambdas = []
    for batch in batches:
        assert batch.partner_ids.shape == (len(batch), 1)
        assert bool((batch.partner_ids[:, 0] != batch.anchor_ids).all())  # a derangement within the batch
        assert set(batch.partner_ids[:, 0].tolist()) <= set(batch.anchor_ids.tolist())  # partners in the batch
        assert torch.all(batch.weights == batch.weights[0])  # one λ per batch
        lambdas.append(float(batch.weights[0, 0]))
    assert len(set(lambdas)) == len(lambdas) > 3  # a new λ every batch


def test_authors_schedule_draws_one_lambda_per_mini_batch(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, method="mixnn", authors_schedule=True, warmup_epochs=1,
                                  correction_start=3, epochs=4))
    assert [trainer.phase(e) for e in range(4)] == ["plain", "mixup", "mixup", "mixnn"]
    lambdas = [float(b.weights[0, 0]) for b in _epoch_batches(trainer, 1)]
    assert len(set(lambdas)) == len(lambdas) > 3


def test_report_uses_the_runs_gmm_settings(tmp_path, monkeypatch):
    """The report's GMM is the run's (cfg.gmm_*), for the baselines and for MixNN's audit scores
    alike; MixNN's clean probability stays its last refresh's."""
    import mixnn_fast.train.trainer as trainer_module

    calls = []
    original = trainer_module.clean_probability

    def spy(losses, **kwargs):
        calls.append(kwargs)
        return original(losses, **kwargs)

    monkeypatch.setattr(trainer_module, "clean_probability", spy)
    settings = dict(gmm_max_iter=3, gmm_reg_covar=1e-2, gmm_tol=0.5)
    expected = dict(max_iter=3, tol=0.5, reg_covar=1e-2, seed=0)
    baseline = Trainer(tiny_config(tmp_path / "ce", method="ce", epochs=1, **settings))
    baseline.fit()
    record = baseline.label_record()
    assert calls == [expected]
    assert np.array_equal(record.clean_prob, record.clean_prob_given)

    calls.clear()
    mixnn = Trainer(tiny_config(tmp_path / "mixnn", method="mixnn", epochs=2, **settings))
    mixnn.fit()
    calls.clear()
    record = mixnn.label_record()
    assert calls == [expected]
    refreshed = mixnn.last_refresh
    assert np.array_equal(record.clean_prob[refreshed.ids.numpy()], refreshed.clean_prob.numpy())
    assert np.array_equal(record.corrected, mixnn.targets.corrected_labels().numpy())
    assert np.isfinite(record.prob_given).all() and (record.predicted >= 0).all()
    # the soft target's probability of the given label, against the store read directly
    given = mixnn.given_labels
    torch.testing.assert_close(torch.from_numpy(record.target_given).float(),
                               mixnn.targets.rows(torch.arange(len(given)))[torch.arange(len(given)), given])


def test_mix_given_labels_mixes_the_targets_once(tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path, method="mixnn", mix_given_labels=True, epochs=2))
    batch = _epoch_batches(trainer, 1)[0]
    asked = []
    original = type(batch).mix

    def spy(self, targets=None, **kwargs):
        asked.append(targets)
        return original(self, targets, **kwargs)

    monkeypatch.setattr(type(batch), "mix", spy)
    x, y = trainer._inputs(batch, "mixnn")
    assert asked == [None]  # the images only: the targets are not mixed by the kernel and then again
    w = batch.weights.double()
    expected = w[:, :1] * trainer.targets.targets[batch.anchor_ids].double() + \
        (w[:, 1:, None] * torch.nn.functional.one_hot(trainer.given_labels[batch.partner_ids], 10).double()).sum(1)
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=4 * torch.finfo(torch.float32).eps)


def test_a_run_with_rows_from_before_epoch_seconds_has_no_wall_time():
    """Rows written before epochs carried their wall time cannot say what the run cost: no
    ``wall_seconds`` rather than the part that happens to be known."""
    from mixnn_fast.train.outcome import summarise

    rows = [{"epoch": 0, "train_seconds": 1.0, "test_accuracy": 0.5},
            {"epoch": 1, "train_seconds": 1.0, "test_accuracy": 0.6, "epoch_seconds": 1.5}]
    assert "wall_seconds" not in summarise("ce", rows, 2, noise_rate=None, correction_accuracy=None,
                                           skipped_files=None)
    rows[0]["epoch_seconds"] = 2.0
    assert summarise("ce", rows, 2, noise_rate=None, correction_accuracy=None,
                     skipped_files=None)["wall_seconds"] == 3.5
