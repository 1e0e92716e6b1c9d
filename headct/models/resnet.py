"""A MONAI 3D ResNet (trained from scratch, a baseline) behind the same token interface as the ViT.

``forward_features(x) -> (B, 1 + N, D)``: token 0 is the global average of the last feature map (the ResNet's
usual pooled feature), tokens 1..N are its N spatial positions, so every head and pooling choice of
`headct.models.heads.Classifier` works unchanged. MONAI is imported only when a ResNet is built.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

DEPTHS: tuple[str, ...] = ("resnet10", "resnet18")
EMBED_DIM = 512  # channels of the last stage of MONAI's basic-block ResNets: the token width D


class ResNetBackbone(nn.Module):
    """MONAI `ResNet` (3D, basic blocks, no classifier layer) as a token backbone; D = 512.

    Args:
        name: "resnet10" or "resnet18".
        in_chans: input channels (HU windows).
    """

    def __init__(self, name: str = "resnet18", in_chans: int = 3) -> None:
        super().__init__()
        if name not in DEPTHS:
            raise ValueError(f"unknown ResNet {name!r}; allowed: {DEPTHS}")
        from monai.networks.nets import resnet

        self.net = getattr(resnet, name)(spatial_dims=3, n_input_channels=in_chans, feed_forward=False)
        self.arch: dict[str, Any] = {"name": name, "in_chans": in_chans}
        self.embed_dim = EMBED_DIM

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z) -> (B, 1 + N, 512): global average first, then the last feature map's positions."""
        net = self.net
        x = net.act(net.bn1(net.conv1(x)))
        if not net.no_max_pool:
            x = net.maxpool(x)
        x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, D)
        return torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)


def build_backbone(arch: dict[str, Any]) -> nn.Module:
    """A ViT3D (``arch`` of a model directory), a ResNet (``{"name": "resnet18", "in_chans": 3}``), the small
    CNN (``{"name": "cnn", "in_chans": 3, "channels": [8, 16, 32, 64]}``) or the small CNN's masked restoration
    read out by its residual (the same plus ``"readout": "residual", "mask_ratio": 0.6``; a fine-tuned classifier
    of `finetune.pool: residual`)."""
    if arch.get("name") == "cnn":
        from headct.models.cnn import DEFAULT_CHANNELS, SmallCNN3D

        allowed = {"name", "in_chans", "channels", "readout", "mask_ratio"}
        unknown = sorted(set(arch) - allowed)
        if unknown:
            raise ValueError(f"unknown CNN arch keys {unknown}; allowed: {sorted(allowed)}")
        cnn = SmallCNN3D(int(arch.get("in_chans", 3)), tuple(int(c) for c in arch.get("channels", DEFAULT_CHANNELS)))
        if "readout" not in arch and "mask_ratio" not in arch:
            return cnn
        if arch.get("readout") != "residual" or "mask_ratio" not in arch:
            raise ValueError(f"a CNN read out by its restoration residual needs readout 'residual' and a mask_ratio, "
                             f"got readout {arch.get('readout')!r}, mask_ratio {arch.get('mask_ratio')!r}")
        from headct.models.restoration import MaskedRestoration, ResidualReadout

        return ResidualReadout(MaskedRestoration(cnn, float(arch["mask_ratio"])))
    if str(arch.get("name", "")).startswith("resnet"):
        unknown = sorted(set(arch) - {"name", "in_chans"})
        if unknown:
            raise ValueError(f"unknown ResNet arch keys {unknown}; allowed: ['in_chans', 'name']")
        return ResNetBackbone(arch["name"], int(arch.get("in_chans", 3)))
    from headct.models.vit import build_encoder

    return build_encoder(arch)
