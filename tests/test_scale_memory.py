"""What the refresh keeps between epochs must not grow with the pool's features.

A checkpoint holds the model, the optimiser, the soft targets and the run's bookkeeping; the
pool's (P, D) features are recomputed by the next refresh, never saved. Two tiny MixNN runs on
scikit-learn's digits whose models differ only in the width of their last layer (the feature
dimension D = 16 or 256): their checkpoints may differ by the bytes of the model's and the
optimiser's tensors, and by nothing proportional to P x D.
"""
from __future__ import annotations

import pytest
import torch

from mixnn_fast.train.config import TrainConfig
from mixnn_fast.train.trainer import CHECKPOINT, Trainer

# zip (torch.save) aligns each tensor's record to 64 bytes, and its pickled shapes and widths
# differ by a byte here and there: per tensor, at most this much beyond the tensors' own bytes
_PER_TENSOR_SLACK = 64 + 16


def _tensors(value) -> list[torch.Tensor]:
    """Every tensor inside nested dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _nbytes(value) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(value))


def _run(tmp_path, width: int) -> tuple[Trainer, dict, int]:
    out = tmp_path / f"width{width}"
    cfg = TrainConfig(dataset="digits", noise="symmetric_uniform", noise_rate=0.4, model="small_cnn",
                      model_widths=[8, 16, 16, width], method="mixnn", epochs=2, warmup_epochs=1,
                      correction_start=1, restart_period=2, batch_size=64, progress=False, tensorboard=False,
                      out_dir=str(out), num_threads=2)
    trainer = Trainer(cfg)
    trainer.fit()
    path = out / CHECKPOINT
    saved = torch.load(path, weights_only=True)
    return trainer, saved.get("state", saved), path.stat().st_size  # the file may wrap it with a checksum


@pytest.mark.slow
def test_checkpoint_size_does_not_depend_on_the_feature_width(tmp_path):
    narrow, narrow_state, narrow_size = _run(tmp_path, 16)
    wide, wide_state, wide_size = _run(tmp_path, 256)
    pool = narrow.num_samples
    # the features are the head's inputs: D = 16 and 256
    assert narrow.model.head.in_features == 16 and wide.model.head.in_features == 256

    # nothing in either checkpoint is shaped like the pool's features
    for state, width in ((narrow_state, 16), (wide_state, 256)):
        for tensor in _tensors(state):
            assert not (tensor.ndim == 2 and tensor.shape[0] >= pool and width in tensor.shape), \
                f"a {tuple(tensor.shape)} tensor in the checkpoint looks like the pool's features"

    modules = ("model", "optimizer")
    model_bytes = {name: _nbytes(wide_state["modules"][name]) - _nbytes(narrow_state["modules"][name])
                   for name in modules}
    assert model_bytes["model"] == _nbytes(wide.model.state_dict()) - _nbytes(narrow.model.state_dict()) > 0
    # every other tensor (targets, partner table, random states, ...) has the same size in both runs
    others = {key: value for key, value in wide_state.items() if key != "modules"}
    narrow_others = {key: value for key, value in narrow_state.items() if key != "modules"}
    assert _nbytes(others) == _nbytes(narrow_others)
    for name in wide_state["modules"]:
        if name not in modules:
            assert _nbytes(wide_state["modules"][name]) == _nbytes(narrow_state["modules"][name]), name

    difference = wide_size - narrow_size
    expected = sum(model_bytes.values())
    slack = _PER_TENSOR_SLACK * len(_tensors(wide_state)) + 256
    features_delta = pool * (256 - 16) * 2  # even float16 features would add this much
    print(f"checkpoint {narrow_size:,} -> {wide_size:,} bytes: +{difference:,}; model + optimiser tensors "
          f"+{expected:,}; the pool's features would add >= {features_delta:,}")
    assert abs(difference - expected) <= slack < features_delta
