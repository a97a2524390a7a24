"""The PI-CAI baseline U-Net, rebuilt in plain torch, exported to ONNX with a scanside model declaration.

UNTRAINED: the weights are random (or a site's own checkpoint with ``--weights``).  The export is the worked
example of docs/cspca-models.md: it shows the interface and shape of a drop-in csPCa model, never accuracy.

Architecture (DIAGNijmegen/picai_baseline, src/picai_baseline/unet/training_setup/neural_networks/unets.py, a copy
of MONAI's ``UNet`` with ``num_res_units=0``; Apache-2.0): per level a strided 3x3x3 convolution down and a
strided 3x3x3 transposed convolution up, each followed by instance norm and PReLU ("NDA" order; the top up layer
is the convolution alone), the skip connection concatenating a level's input with what the levels below return.
picai_baseline's defaults (train.py): 3 input channels (T2W, ADC, high-b DWI), 2 classes, image shape
20 x 256 x 256, features [32, 64, 128, 256, 512, 1024], strides [(2,2,2), (1,2,2), (1,2,2), (1,2,2), (2,2,2)].
Module names follow MONAI's (``model.0.conv.weight``, ``model.1.submodule.0.adn.A.weight``, ...) so that a
state dict trained with picai_baseline loads with ``--weights`` (its checkpoints hold ``model_state_dict``).

Preprocessing (picai_prep / PI-CAI, as declared in the export): T2W, ADC and high-b DWI resampled onto the
T2W grid at 3.0 x 0.5 x 0.5 mm, centre crop 20 x 256 x 256, each channel z-scored (0.5-99.5 percentile clip).
Outputs: 2-class logits (softmax, class 1 = csPCa); the case-level likelihood is the maximum of the
detection map.

    python -m scanside.training.picai_unet OUT_DIR [--features 32,64,128,256,512,1024] [--shape 20,256,256]
                                          [--seed 0] [--weights CHECKPOINT.pt] [--name picai-unet-untrained]

writes OUT_DIR/model.onnx and OUT_DIR/declaration.json; then
``scanside models import OUT_DIR/model.onnx --declaration OUT_DIR/declaration.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

PICAI_FEATURES = (32, 64, 128, 256, 512, 1024)
PICAI_STRIDES = ((2, 2, 2), (1, 2, 2), (1, 2, 2), (1, 2, 2), (2, 2, 2))
PICAI_SHAPE = (20, 256, 256)
PICAI_SPACING = (3.0, 0.5, 0.5)
SOURCE = ("architecture: DIAGNijmegen/picai_baseline src/picai_baseline/unet/training_setup/neural_networks/unets.py "
          "(MONAI UNet, num_res_units=0; Apache-2.0), rebuilt in torch by training/picai_unet.py")


def build_unet(in_channels: int = 3, out_channels: int = 2, features: Sequence[int] = PICAI_FEATURES,
               strides: Sequence[Sequence[int]] = PICAI_STRIDES) -> Any:
    """The picai_baseline U-Net (torch.nn.Module, input (N, in_channels, d0, d1, d2) -> logits)."""
    import torch
    from torch import nn

    if len(features) < 2 or len(strides) < len(features) - 1:
        raise ValueError("need at least 2 feature sizes and len(features) - 1 strides")

    class SkipConnection(nn.Module):
        """cat([x, submodule(x)], channels) -- MONAI's SkipConnection (its attribute name kept for state dicts)."""

        def __init__(self, submodule: nn.Module) -> None:
            super().__init__()
            self.submodule = submodule

        def forward(self, x: "torch.Tensor") -> "torch.Tensor":
            return torch.cat([x, self.submodule(x)], dim=1)

    def conv(cin: int, cout: int, stride: Sequence[int], transposed: bool, conv_only: bool) -> nn.Module:
        # MONAI Convolution: "conv", then ADN ("N" instance norm, "D" dropout 0, "A" PReLU) unless conv_only
        block = nn.Sequential()
        if transposed:  # padding 1, output_padding stride - 1: exactly stride x the input size
            block.add_module("conv", nn.ConvTranspose3d(cin, cout, 3, stride=tuple(stride), padding=1,
                                                        output_padding=tuple(s - 1 for s in stride)))
        else:
            block.add_module("conv", nn.Conv3d(cin, cout, 3, stride=tuple(stride), padding=1))
        if not conv_only:
            adn = nn.Sequential()
            adn.add_module("N", nn.InstanceNorm3d(cout))
            adn.add_module("D", nn.Dropout(0.0))
            adn.add_module("A", nn.PReLU())
            block.add_module("adn", adn)
        return block

    def level(cin: int, cout: int, chans: Sequence[int], strs: Sequence[Sequence[int]], top: bool) -> nn.Module:
        c, s = chans[0], strs[0]
        if len(chans) > 2:
            sub, upc = level(c, c, chans[1:], strs[1:], False), c * 2
        else:  # the bottom: a stride-1 convolution
            sub, upc = conv(c, chans[1], (1, 1, 1), False, False), c + chans[1]
        return nn.Sequential(conv(cin, c, s, False, False), SkipConnection(sub), conv(upc, cout, s, True, top))

    class UNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = level(in_channels, out_channels, list(features), [tuple(s) for s in strides], True)

        def forward(self, x: "torch.Tensor") -> "torch.Tensor":
            return self.model(x)

    return UNet()


def declaration(name: str, version: str, shape: Sequence[int], features: Sequence[int], trained: bool) -> Dict[str, Any]:
    """The manifest fields scanside cannot read from the ONNX: task, preprocessing, how outputs are read, provenance."""
    label = "trained weights from the checkpoint given at export" if trained else \
        "UNTRAINED (random weights): shape and interface only, no diagnostic value"
    return {
        "name": name, "version": version, "task": "cspca_detection",
        "description": f"PI-CAI baseline U-Net (picai_baseline architecture, features {list(features)}), {label}. "
                       "Inputs T2W, ADC, high-b DWI on the T2W grid; outputs 2-class logits (class 1 = csPCa).",
        "preprocessing": {"channels": ["T2W", "ADC", "HBV"], "axcodes": "SPL", "spacing_mm": list(PICAI_SPACING),
                          "shape": list(shape), "crop": "center", "normalize": "zscore_percentile",
                          "clip_percentiles": [0.5, 99.5]},
        "cspca": {"input": "input", "detection_map": "logits", "detection_activation": "softmax",
                  "detection_channel": 1, "case_level": "map_max", "crop_on_gland": False},
        "postprocessing": {"lesion_threshold": 0.5, "min_peak": 0.5, "min_volume_mm3": 30.0,
                           "decision_threshold": 0.5, "split_dynamic": 0.1},
        "training_data": "none: random weights" if not trained else "the site's checkpoint (see source)",
        "metrics": {} if trained else {"untrained": True, "note": "no accuracy figure: random weights"},
        "license": "Apache-2.0 (architecture: picai_baseline / MONAI)",
        "source": SOURCE,
    }


def export(out_dir: Path, *, features: Sequence[int] = PICAI_FEATURES, strides: Sequence[Sequence[int]] = PICAI_STRIDES,
           shape: Sequence[int] = PICAI_SHAPE, seed: int = 0, weights: Optional[Path] = None,
           name: str = "picai-unet-untrained", version: str = "0.1.0", opset: int = 17) -> Tuple[Path, Path]:
    """Write OUT_DIR/model.onnx (input ``input`` (batch, 3, *shape), output ``logits`` (batch, 2, *shape)) and
    OUT_DIR/declaration.json; returns both paths."""
    import torch

    torch.manual_seed(seed)
    net = build_unet(3, 2, features, strides).eval()
    if weights is not None:
        state = torch.load(str(weights), map_location="cpu", weights_only=True)
        net.load_state_dict(state.get("model_state_dict", state) if isinstance(state, dict) else state)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "model.onnx"
    x = torch.zeros((1, 3) + tuple(int(v) for v in shape))
    with torch.no_grad():
        torch.onnx.export(net, (x,), str(onnx_path), input_names=["input"], output_names=["logits"], opset_version=opset,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    decl = out_dir / "declaration.json"
    decl.write_text(json.dumps(declaration(name, version, shape, features, weights is not None), indent=2) + "\n")
    return onnx_path, decl


def _ints(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scanside.training.picai_unet", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--features", default=",".join(map(str, PICAI_FEATURES)))
    ap.add_argument("--shape", default=",".join(map(str, PICAI_SHAPE)))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", type=Path, help="a picai_baseline checkpoint (model_state_dict) instead of random weights")
    ap.add_argument("--name", default=None, help="default picai-unet-untrained (picai-unet with --weights)")
    ap.add_argument("--version", default="0.1.0")
    a = ap.parse_args(argv)
    name = a.name or ("picai-unet" if a.weights else "picai-unet-untrained")
    onnx_path, decl = export(a.out, features=_ints(a.features), shape=_ints(a.shape), seed=a.seed, weights=a.weights,
                             name=name, version=a.version)
    print(f"{onnx_path}\n{decl}\nnext: scanside models import {onnx_path} --declaration {decl}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
