"""A small 3D ResNet (basic blocks, batch norm) for one series, (C, 16, 64, 64) -> 6 logits: channel 0 the
whole field of view, channels 1 and 2 fine-spacing centre details of it (scanside.training.sequence.data.PREPROCESS)."""
from __future__ import annotations

import torch
from torch import nn

from scanside.agent.schema.taxonomy import LABELS


class BasicBlock3d(nn.Module):
    def __init__(self, cin: int, cout: int, stride=1):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(cout)
        self.act = nn.ReLU(inplace=True)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv3d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm3d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.act(y + (x if self.short is None else self.short(x)))


class SeqResNet3d(nn.Module):
    """stem (kernel 3x5x5, stride 1,4,4: in-plane texture and noise seen at full resolution, then
    pooled away) -> 3 residual stages (stride 2 each) -> global average pool -> dropout -> linear.

    Input (N, C, 16, 64, 64): stem 16x16x16 -> 8x8x8 -> 4x4x4 -> 2x2x2.  ~0.5 M parameters."""

    def __init__(self, in_channels: int, n_classes: int = len(LABELS), widths=(16, 24, 48, 96), dropout: float = 0.2):
        super().__init__()
        w0, w1, w2, w3 = widths
        self.in_channels = in_channels
        self.stem = nn.Sequential(nn.Conv3d(in_channels, w0, (3, 5, 5), stride=(1, 4, 4), padding=(1, 2, 2), bias=False),
                                  nn.BatchNorm3d(w0), nn.ReLU(inplace=True))
        self.layer1 = BasicBlock3d(w0, w1, stride=2)
        self.layer2 = BasicBlock3d(w1, w2, stride=2)
        self.layer3 = BasicBlock3d(w2, w3, stride=2)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(w3, n_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def conv_bn_pairs(self) -> list[tuple[nn.Conv3d, nn.BatchNorm3d]]:
        """(conv, its batch norm) in execution order (as the ONNX export lists the Conv nodes)."""
        out = [(self.stem[0], self.stem[1])]
        for blk in (self.layer1, self.layer2, self.layer3):
            out += [(blk.conv1, blk.bn1), (blk.conv2, blk.bn2)]
            if blk.short is not None:
                out.append((blk.short[0], blk.short[1]))
        return out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled penultimate features (N, widths[-1]): what the out-of-distribution score measures."""
        return torch.flatten(self.pool(self.layer3(self.layer2(self.layer1(self.stem(x))))), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.features(x)))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
