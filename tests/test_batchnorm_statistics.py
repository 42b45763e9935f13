"""The weight average's BatchNorm statistics recomputed on the pool (``plus_average_bn``): each
layer's running mean and variance against a float64 reference taken from the layer's own inputs
(the mean over batches of each batch's mean and unbiased variance), across processes against the
one-process statistics of every batch, and in a run: the statistics of the average that is
tested, with no step of training changed."""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass

import pytest
import torch
import torch.distributed
import torch.multiprocessing as mp
from test_trainer import tiny_config

from mixnn_fast.train.batchnorm_statistics import batchnorm_layers, recompute_batchnorm_statistics
from mixnn_fast.train.distributed import Distributed
from mixnn_fast.train.trainer import Trainer

E32 = torch.finfo(torch.float32).eps


class _Batch:
    """What an EvalLoader serves: ``mix()`` gives the images, ``release()`` hands their buffer to
    the next batches; here it empties the tensor, as reusing the buffer would overwrite it."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def mix(self):
        return self.images, None

    def release(self) -> None:
        self.images.resize_(0)


class _Loader:
    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches = batches

    def __iter__(self):
        for images in self.batches:
            yield _Batch(images.clone())


def small_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.BatchNorm2d(5), torch.nn.ReLU(),
                                torch.nn.Conv2d(5, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(6), torch.nn.BatchNorm1d(6))
    model(torch.randn(2, 3, 9, 9))  # materialise the lazy layer
    for layer in batchnorm_layers(model):  # statistics unlike the ones the batches will give
        layer.running_mean.fill_(float("nan"))
        layer.running_var.fill_(float("nan"))
    return model


@dataclass
class Reference:
    """One BatchNorm layer's statistics in float64, and what their float32 rounding depends on:
    the most values one batch's statistic sums per channel, and the largest input magnitude."""

    mean: torch.Tensor
    variance: torch.Tensor
    values: int
    magnitude: float


def reference_statistics(model: torch.nn.Module, batches: list[torch.Tensor]) -> list[Reference]:
    """For each BatchNorm layer, in float64: the mean over the batches of at least two images of
    each batch's per-channel mean and unbiased variance of the layer's input (its training-mode
    input: the layers before it normalise by their batch's own statistics).  The inputs are
    computed on the model's device, as the recomputation computed them (a CUDA convolution may
    round differently from the CPU's, in TF32 by default)."""
    probe = copy.deepcopy(model)  # its running statistics move; the model's are what is checked
    probe.train()
    device = next(probe.parameters()).device
    inputs: dict[int, list[torch.Tensor]] = {}
    layers = batchnorm_layers(probe)
    hooks = [layer.register_forward_hook(
        lambda m, args, out, i=i: inputs.setdefault(i, []).append(args[0].double().cpu()))
        for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for images in batches:
                if len(images) > 1:
                    probe(images.to(device))
    finally:
        for hook in hooks:
            hook.remove()
    references = []
    for i in range(len(layers)):
        dims = [0] + list(range(2, inputs[i][0].dim()))
        means = torch.stack([x.mean(dims) for x in inputs[i]])
        variances = torch.stack([x.var(dims, unbiased=True) for x in inputs[i]])
        references.append(Reference(means.mean(0), variances.mean(0), max(x.numel() // x.shape[1] for x in inputs[i]),
                                    max(float(x.abs().max()) for x in inputs[i])))
    return references


def assert_statistics_close(mean: torch.Tensor, variance: torch.Tensor, reference: Reference) -> None:
    """float32 statistics against the float64 reference, to a bound from the dtype: a float32 sum
    of n values rounds by about sqrt(n) eps32 of its largest term (independent roundings add in
    quadrature, docs/testing.md); the variance sums squares, whose terms reach magnitude², and
    combining processes' statistics adds a few roundings more, hence the factors 4 and 8."""
    scale = math.sqrt(reference.values) * E32
    torch.testing.assert_close(mean.double().cpu(), reference.mean, rtol=0, atol=4 * scale * reference.magnitude)
    torch.testing.assert_close(variance.double().cpu(), reference.variance, rtol=0,
                               atol=8 * scale * reference.magnitude ** 2)


def random_batches(seed: int, sizes: list[int]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [3 * torch.randn(n, 3, 9, 9, generator=generator) + 1 for n in sizes]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed,sizes", [(0, [7, 7, 3]), (1, [5, 1, 11, 2]), (2, [13])])
def test_recomputed_statistics_are_the_mean_of_each_batchs_statistics(seed, sizes, device):
    """Odd batch sizes and a one-image batch, which is left out; every statistic overwritten; the
    batches come from the host and are moved to the model's device."""
    model = small_model(seed).to(device)
    batches = random_batches(seed, sizes)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "tracked" not in k}
    model.eval()
    images = recompute_batchnorm_statistics(model, _Loader(batches), torch.device(device))
    assert images == sum(n for n in sizes if n > 1)
    assert not model.training  # the mode it was given back in
    expected = reference_statistics(model, batches)
    for layer, reference in zip(batchnorm_layers(model), expected, strict=True):
        assert_statistics_close(layer.running_mean, layer.running_var, reference)
        assert layer.momentum == 0.1  # update_bn's cumulative average undone
        assert int(layer.num_batches_tracked) == sum(1 for n in sizes if n > 1)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights.items())  # the weights are left alone


def test_a_pool_with_no_batch_of_two_images_is_an_error():
    model = small_model(3)
    with pytest.raises(RuntimeError, match="no batch of two or more images"):
        recompute_batchnorm_statistics(model, _Loader(random_batches(3, [1, 1])), torch.device("cpu"))


def _rank_process(rank: int, world: int, init_file: str, shards: list[list[torch.Tensor]], out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = small_model(7)
        context = Distributed(rank=rank, world_size=world, local_rank=rank, backend="gloo")
        images = recompute_batchnorm_statistics(model, _Loader(shards[rank]), torch.device("cpu"), dist=context)
        torch.save({"images": images, "state": model.state_dict()}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("sizes", [([6, 9, 4], [5]), ([3, 1], []), ([8], [2, 2, 2, 7])])
def test_processes_agree_on_the_statistics_of_every_batch(tmp_path, sizes):
    """Each process passes its own shard (uneven counts, one empty): every rank ends with the
    statistics one process takes over all the batches."""
    shards = [random_batches(10 + i, list(s)) for i, s in enumerate(sizes)]
    mp.spawn(_rank_process, args=(2, str(tmp_path / "init"), shards, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    everything = [b for shard in shards for b in shard]
    model = small_model(7)
    expected = reference_statistics(model, everything)
    assert results[0]["images"] == results[1]["images"] == sum(len(b) for b in everything if len(b) > 1)
    for result in results:
        state = result["state"]
        means = [v for k, v in state.items() if k.endswith("running_mean")]
        variances = [v for k, v in state.items() if k.endswith("running_var")]
        for mean, variance, reference in zip(means, variances, expected, strict=True):
            assert_statistics_close(mean, variance, reference)


def test_a_run_tests_the_average_with_recomputed_statistics_and_trains_as_before(tmp_path):
    """The same run with the average's statistics averaged and recomputed: every training number,
    the model itself and the averaged weights equal to the bit; the average's statistics are the
    reference's over the pool's images; the tests (and the saved checkpoint) use them."""
    runs = {}
    for mode in ("averaged", "recomputed"):
        cfg = tiny_config(tmp_path / mode, method="mixnn_plus", epochs=4, restart_period=1, plus_average_last=0.5,
                          plus_average_bn=mode, eval_every=1, num_threads=1)
        trainer = Trainer(cfg)
        trainer.fit()
        runs[mode] = trainer
    plain, recomputed = runs["averaged"], runs["recomputed"]
    clocked = ("_seconds", "images_per_second", "_fraction")
    for before, after in zip(plain.metrics.rows, recomputed.metrics.rows, strict=True):
        for key, value in before.items():
            if key.endswith(clocked) or key == "test_accuracy":
                continue
            assert after[key] == value, key
    live = plain.model.state_dict()
    assert all(torch.equal(recomputed.model.state_dict()[k], v) for k, v in live.items())
    averaged = plain.averaged.module.state_dict()
    average = recomputed.averaged.module
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    assert all(torch.equal(average.state_dict()[k], v) for k, v in averaged.items() if not k.endswith(statistics))
    # the reference: the pool's images (the refresh's pass: unmixed, unaugmented) through the averaged weights
    pool = []
    for batch in recomputed.loaders.pool:
        x, _ = batch.mix()
        pool.append(x.clone().contiguous(memory_format=recomputed.memory_format))  # as the pass feeds them
        batch.release()
    assert sum(len(x) for x in pool) == recomputed.num_samples
    expected = reference_statistics(average, pool)
    for layer, reference in zip(batchnorm_layers(average), expected, strict=True):
        assert_statistics_close(layer.running_mean, layer.running_var, reference)
    # not the averaged statistics: the option changed what is tested
    assert not torch.allclose(batchnorm_layers(average)[0].running_var, batchnorm_layers(plain.averaged.module)[0].running_var)
    final = recomputed.metrics.rows[-1]
    assert final["test_accuracy"] == recomputed.test_accuracy()
    # the checkpoint keeps the recomputed statistics: a resumed run tests the same model
    resumed = Trainer(recomputed.cfg, resume=True)
    assert resumed.test_accuracy() == final["test_accuracy"]
    for trainer in (plain, recomputed, resumed):
        trainer.close()


@pytest.fixture(scope="module")
def statistics_by_mode(tmp_path_factory):
    """The averaged BatchNorm statistics a tiny MixNN+ run tests, with each fixed mode."""
    out = {}
    for mode in ("averaged", "recomputed"):
        cfg = tiny_config(tmp_path_factory.mktemp(mode), method="mixnn_plus", epochs=4, restart_period=1,
                          plus_average_last=0.5, plus_average_bn=mode, num_threads=1)
        trainer = Trainer(cfg)
        trainer.fit()
        out[mode] = {k: v.clone() for k, v in trainer.averaged.module.state_dict().items()}
        trainer.close()
    return out


@pytest.mark.parametrize("share, acts_as", [(None, "averaged"), (0.0, "averaged"), (0.49, "averaged"),
                                            (0.5, "recomputed"), (1.0, "recomputed")])
def test_symmetric_mode_recomputes_only_where_the_noise_looked_symmetric(tmp_path, monkeypatch, statistics_by_mode,
                                                                         share, acts_as):
    """``plus_average_bn="symmetric"``: the run's statistics are the averaged run's or the
    recomputed run's to the bit, as the share of refreshes that looked symmetric decides; the
    share is read from the rows up to the snapshot's own epoch (not yet logged)."""
    import mixnn_fast.train.trainer as trainer_module
    seen = []

    def share_of(rows, correction_start):
        seen.append([r["epoch"] for r in rows])
        return share

    monkeypatch.setattr(trainer_module, "symmetric_share", share_of)
    cfg = tiny_config(tmp_path, method="mixnn_plus", epochs=4, restart_period=1, plus_average_last=0.5,
                      plus_average_bn="symmetric", num_threads=1)
    trainer = Trainer(cfg)
    trainer.fit()
    state = trainer.averaged.module.state_dict()
    trainer.close()
    assert [epochs[-1] for epochs in seen][:2] == [2, 3]  # the snapshots of epochs 2 and 3, each with its row
    assert all(epochs == list(range(len(epochs))) for epochs in seen[:2])
    expected = statistics_by_mode[acts_as]
    assert all(torch.equal(state[k], v) for k, v in expected.items()), acts_as
    other = statistics_by_mode["recomputed" if acts_as == "averaged" else "averaged"]
    assert not all(torch.equal(state[k], v) for k, v in other.items())


@pytest.mark.parametrize("mode, share, expected", [
    ("recomputed", None, True), ("recomputed", 0.0, True), ("averaged", 1.0, False), ("averaged", None, False),
    ("symmetric", None, False), ("symmetric", 0.4999, False), ("symmetric", 0.5, True), ("symmetric", 0.9, True)])
def test_recomputes_average_statistics(mode, share, expected):
    from mixnn_fast.train.config import TrainConfig
    from mixnn_fast.train.methods import recomputes_average_statistics
    cfg = TrainConfig(method="mixnn_plus", plus_average_bn=mode)
    assert recomputes_average_statistics(cfg, share) is expected
