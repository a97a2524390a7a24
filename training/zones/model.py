"""A small 2.5D U-Net for the prostate zones (background / TZ / PZ).

Input  ``input``          float32 (B, 1, 24, 128, 128): z-scored T2W on ZONES_SPEC's grid.
Output ``probabilities``  float32 (B, 3, 24, 128, 128): softmax over (background, TZ, PZ).

Each slice is segmented by a 2D U-Net (3 levels, scanside.training.cspca.model's conv blocks) that sees
the slice and its two neighbours (zero beyond the volume): 2.5D for the same reason as the csPCa
model (Conv3d backward is slow on the shared 2-core CPU), and zone boundaries change slowly across
3 mm slices. Training works on single slice stacks (``slice_logits``); export wraps the whole
volume (``forward``) with a dynamic batch axis.
"""
from __future__ import annotations

import torch
from torch import nn

from scanside.training.cspca.model import _block, n_parameters  # noqa: F401  (re-exported)

N_CLASSES = 3


class ZoneNet(nn.Module):
    def __init__(self, widths: tuple[int, int, int] = (12, 24, 48), context: int = 1, n_classes: int = N_CLASSES):
        super().__init__()
        c1, c2, c3 = widths
        self.widths = tuple(widths)
        self.context = int(context)
        cin = 2 * self.context + 1
        self.enc1 = _block(cin, c1)
        self.enc2 = _block(c1, c2)
        self.enc3 = _block(c2, c3)
        self.pool = nn.MaxPool2d(2)
        self.up2 = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c3, c2, 1))
        self.dec2 = _block(2 * c2, c2)
        self.up1 = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c2, c1, 1))
        self.dec1 = _block(2 * c1, c1)
        self.head = nn.Conv2d(c1, n_classes, 1)

    def slice_logits(self, z: torch.Tensor) -> torch.Tensor:
        """(N, 2k+1, H, W) slice stacks -> (N, n_classes, H, W) logits."""
        e1 = self.enc1(z)
        e2 = self.enc2(self.pool(e1))
        e3 = self.enc3(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(e3), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.head(d1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) -> (B, n_classes, D, H, W) logits."""
        b, c, d, h, w = x.shape
        k = self.context
        xp = nn.functional.pad(x, (0, 0, 0, 0, k, k))
        st = torch.cat([xp[:, :, i:i + d] for i in range(2 * k + 1)], dim=1)  # (B, 2k+1, D, H, W)
        z = st.permute(0, 2, 1, 3, 4).reshape(b * d, c * (2 * k + 1), h, w)
        out = self.slice_logits(z)
        return out.reshape(b, d, -1, h, w).permute(0, 2, 1, 3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)
