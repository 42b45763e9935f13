"""Models give logits and penultimate features from one pass, and never download weights."""
from __future__ import annotations

import pytest
import torch

from mixnn_fast.train.models import build_model


@pytest.mark.parametrize("name,in_channels,size,dim", [
    ("small_cnn", 1, 28, 256), ("preact_resnet18", 3, 32, 512), ("resnet34", 3, 32, 512), ("small_cnn", 3, 17, 256),
])
def test_logits_and_features(name, in_channels, size, dim):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=in_channels).eval()
    x = torch.randn(3, in_channels, size, size)
    logits, features = model(x, return_features=True)
    assert logits.shape == (3, 7) and features.shape == (3, dim)
    torch.testing.assert_close(model(x), logits)
    torch.testing.assert_close(model.head(features), logits)  # logits come from exactly these features


def test_resnet50_loads_local_weights_only(tmp_path):
    source = build_model("resnet50", num_classes=14)
    path = tmp_path / "resnet50.pt"
    torch.save({k.removeprefix("backbone."): v for k, v in source.state_dict().items()
                if k.startswith("backbone.")}, path)
    loaded = build_model("resnet50", num_classes=14, weights_path=str(path))
    for (k, a), (_, b) in zip(source.backbone.state_dict().items(), loaded.backbone.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        build_model("resnet50", num_classes=14, weights_path=str(tmp_path / "missing.pt"))


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="small_cnn"):
        build_model("resnet9000", num_classes=10)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("small_cnn", num_classes=1)
