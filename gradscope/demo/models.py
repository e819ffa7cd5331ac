"""Small models the demo's scenarios are built from."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn


def kaiming(model: nn.Module) -> nn.Module:
    """He init for ReLU layers: keeps activation variance constant through depth."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def relu_mlp(dim: int = 32, width: int = 128, out: int = 4, dropout: float = 0.0) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict(fc1=nn.Linear(dim, width), act1=nn.ReLU())
    if dropout:
        layers["drop"] = nn.Dropout(dropout)
    layers.update(fc2=nn.Linear(width, width), act2=nn.ReLU(), head=nn.Linear(width, out))
    return kaiming(nn.Sequential(layers))


class Exp(nn.Module):
    """exp(x): overflows to inf for inputs above ~88, a classic NaN source."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.exp(x)


class UnusedBranch(nn.Module):
    """A frozen pretrained stem, a trained body, and an ``aux`` head that forward() never calls."""

    def __init__(self, dim: int = 32, width: int = 64, out: int = 4) -> None:
        super().__init__()
        self.stem, self.act1 = nn.Linear(dim, width), nn.ReLU()
        self.fc, self.act2, self.head = nn.Linear(width, width), nn.ReLU(), nn.Linear(width, out)
        self.aux = nn.Linear(width, out)  # defined, never used: its parameters never get a gradient
        kaiming(self)
        self.stem.requires_grad_(False)  # frozen on purpose: must not be reported

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.act2(self.fc(self.act1(self.stem(x)))))
