"""Models give logits and penultimate features from one pass, and never download weights."""
from __future__ import annotations

import math

import pytest
import torch

from mixnn_fast.train.models import build_model

E32 = torch.finfo(torch.float32).eps


def forward_rounding(model: torch.nn.Module, reference: torch.Tensor) -> float:
    """How far a float32 forward pass may be from the float64 one, in the reference's units.

    A float32 dot product of length K (a conv's C_in k_h k_w, a linear layer's inputs) rounds in
    whatever order the CPU's vector units and oneDNN's kernel pick; independent roundings grow
    like sqrt(K) eps of its size (Higham & Mary's probabilistic bound), and the layers' errors add
    in quadrature: sqrt(sum K) eps of the output's scale. Folding BatchNorm into the weights adds
    a rounding per weight, which that covers. Over 24 random models (AVX-512, AVX2, and MKL and
    oneDNN held to AVX2) the error stayed below 0.1 of this bound."""
    fan_in = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            fan_in += module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, torch.nn.Linear):
            fan_in += module.in_features
    return math.sqrt(fan_in) * E32 * float(reference.abs().max())


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


@pytest.mark.parametrize("name,in_channels,size", [("small_cnn", 1, 28), ("small_cnn", 3, 13), ("resnet34", 3, 16),
                                                    ("preact_resnet18", 3, 16)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_inference_copy_matches_the_eval_model_in_float64(name, in_channels, size, channels_last, rng):
    """The folded, channels-last copy computes model.eval() (reference: the unfolded model in
    float64), with BatchNorm statistics that are not the identity, and leaves the model as it was."""
    from mixnn_fast.train.models import inference_copy

    torch.manual_seed(int(rng.integers(2**31)))
    model = build_model(name, num_classes=5, in_channels=in_channels)
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = inference_copy(model, channels_last=channels_last)
    x = torch.randn(int(rng.integers(1, 6)), in_channels, size, size)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with torch.no_grad():
        logits, features = frozen(x.contiguous(memory_format=fmt), return_features=True)
        reference = [t.float() for t in _double_eval(model)(x.double(), return_features=True)]
    torch.testing.assert_close(logits, reference[0], rtol=0, atol=forward_rounding(model, reference[0]))
    torch.testing.assert_close(features, reference[1], rtol=0, atol=forward_rounding(model, reference[1]))
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    if name != "preact_resnet18":  # conv→BN pairs were folded (pre-activation blocks have none)
        assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.backbone.modules()) < \
            sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())


def _double_eval(model):
    import copy

    return copy.deepcopy(model).double().eval()
