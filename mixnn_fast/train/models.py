"""Classifiers that expose their penultimate-layer features, which MixNN's refresh needs.

Every model here is a :class:`Classifier`: a backbone mapping images (B, C_in, H, W) to features
(B, D), then one linear layer to logits (B, num_classes).  ``model(x)`` gives logits;
``model(x, return_features=True)`` gives (logits, features) from the same forward pass.

Built-in backbones: ``small_cnn`` (28×28 images), ``preact_resnet18`` and ``resnet34`` (CIFAR-style,
3×3 stem), ``resnet50`` (torchvision; ImageNet weights only from a local file, never a download),
and any ``torchvision:<name>`` or ``timm:<name>`` model that is installed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class Classifier(nn.Module):
    """backbone (B, C_in, H, W) → features (B, feature_dim) → linear → logits (B, num_classes)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        features = self.backbone(x)
        logits = self.head(features)
        return (logits, features) if return_features else logits


# ---- a small CNN for 28×28 images (Fashion-MNIST) ---------------------------------------------


def small_cnn_backbone(in_channels: int = 1, widths: Sequence[int] = (32, 64, 128, 256)) -> tuple[nn.Module, int]:
    """Four 3×3 conv-BN-ReLU stages, max-pooling after the second and third, global average pool."""
    layers: list[nn.Module] = []
    channels = in_channels
    for i, width in enumerate(widths):
        layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        if i in (1, 2):
            layers.append(nn.MaxPool2d(2))
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), channels


# ---- CIFAR-style ResNets (3×3 stem, no max-pool) ------------------------------------------------


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32×32 inputs: 3×3 stem, four stages (64-128-256-512), global average pool → (B, 512)."""

    def __init__(self, block, num_blocks: Sequence[int], in_channels: int = 3, preact: bool = False) -> None:
        super().__init__()
        self.in_planes = 64
        self.preact = preact
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages = []
        for planes, blocks, stride in zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2)):
            strides = [stride] + [1] * (blocks - 1)
            stage = []
            for s in strides:
                stage.append(block(self.in_planes, planes, s))
                self.in_planes = planes
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.final_bn = nn.BatchNorm2d(512) if preact else None

    def forward(self, x):
        out = self.conv1(x)
        if not self.preact:
            out = F.relu(self.bn1(out))
        out = self.stages(out)
        if self.final_bn is not None:
            out = F.relu(self.final_bn(out))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


# ---- torchvision / timm ---------------------------------------------------------------------------


def load_local_weights(module: nn.Module, path: str | Path) -> None:
    """Load a state dict from a local file into ``module`` (its classifier layer is skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights_path: {path} does not exist (weights are never downloaded)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier.", "head."))}
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"weights_path: {path} has keys this model does not: {unexpected[:5]}...")
    if any(not k.startswith(("fc.", "classifier.", "head.")) for k in missing):
        raise ValueError(f"weights_path: {path} lacks keys of this model: {missing[:5]}...")


def torchvision_backbone(name: str, weights_path: str | None = None) -> tuple[nn.Module, int]:
    import torchvision

    try:
        model = torchvision.models.get_model(name, weights=None)
    except ValueError as exc:
        raise ValueError(f"model: torchvision has no model {name!r}") from exc
    if weights_path:
        load_local_weights(model, weights_path)
    for attr in ("fc", "classifier", "head"):
        layer = getattr(model, attr, None)
        if isinstance(layer, nn.Linear):
            setattr(model, attr, nn.Identity())
            return model, layer.in_features
        if isinstance(layer, nn.Sequential) and isinstance(layer[-1], nn.Linear):
            dim = layer[-1].in_features
            layer[-1] = nn.Identity()
            return model, dim
    raise ValueError(f"model: cannot find the final linear layer of torchvision's {name!r}")


def timm_backbone(name: str, weights_path: str | None = None) -> tuple[nn.Module, int]:
    try:
        import timm
    except ImportError as exc:
        raise ValueError(f"model: timm:{name} needs the timm package, which is not installed") from exc
    model = timm.create_model(name, pretrained=False, num_classes=0)
    if weights_path:
        load_local_weights(model, weights_path)
    return model, model.num_features


def build_model(name: str, num_classes: int, in_channels: int = 3, *, weights_path: str | None = None,
                widths: Sequence[int] | None = None) -> Classifier:
    """A :class:`Classifier` by name: small_cnn, preact_resnet18, resnet34, resnet50,
    torchvision:<name>, timm:<name>.  ``weights_path``: a local state-dict file (ImageNet weights
    for resnet50 on Clothing1M, say); nothing is ever downloaded."""
    if num_classes < 2:
        raise ValueError(f"num_classes: must be >= 2, got {num_classes}")
    if name == "small_cnn":
        backbone, dim = small_cnn_backbone(in_channels, widths or (32, 64, 128, 256))
    elif name == "preact_resnet18":
        backbone, dim = CifarResNet(PreActBlock, (2, 2, 2, 2), in_channels, preact=True), 512
    elif name == "resnet34":
        backbone, dim = CifarResNet(BasicBlock, (3, 4, 6, 3), in_channels), 512
    elif name == "resnet50":
        backbone, dim = torchvision_backbone("resnet50", weights_path)
    elif name.startswith("torchvision:"):
        backbone, dim = torchvision_backbone(name.split(":", 1)[1], weights_path)
    elif name.startswith("timm:"):
        backbone, dim = timm_backbone(name.split(":", 1)[1], weights_path)
    else:
        raise ValueError(f"model: unknown model {name!r}; expected small_cnn, preact_resnet18, resnet34, resnet50, "
                         "torchvision:<name> or timm:<name>")
    if weights_path and name in ("small_cnn", "preact_resnet18", "resnet34"):
        load_local_weights(backbone, weights_path)
    return Classifier(backbone, dim, num_classes)


def inference_copy(model: Classifier, *, channels_last: bool = True) -> Classifier:
    """An eval-mode copy of ``model`` for forward passes without gradients (the refresh, the
    test set): each convolution followed by its BatchNorm is folded into one convolution, and the
    weights are stored channels-last.

    Why: on the CPU a refresh pass over the training pool costs about half a training epoch
    unless it is made cheaper; folding BatchNorm removes a pass over every activation, and
    oneDNN's channels-last convolutions are about 2× faster than NCHW ones for the small models
    used here (bench/epoch.py).  The copy computes the same function as ``model.eval()`` up to
    float rounding (tests/test_models.py).  Backbones that torch.fx cannot trace (data-dependent
    control flow) are copied without folding.  Feed it inputs in the same memory format
    (``x.contiguous(memory_format=torch.channels_last)``) to avoid a conversion per layer.
    """
    import copy

    from torch.fx.experimental.optimization import fuse

    frozen = copy.deepcopy(model).eval()
    try:
        frozen.backbone = fuse(frozen.backbone)
    except Exception:  # noqa: BLE001 - tracing failed: fall back to the unfused copy (same results)
        pass
    if channels_last:
        frozen = frozen.to(memory_format=torch.channels_last)
    for parameter in frozen.parameters():
        parameter.requires_grad_(False)
    return frozen
