"""Export a trained zonal model to the store: ONNX (dynamic batch), parity check, manifest, model card.

    python -m scanside.training.zones.export var/zones-run/model.pt [--store engines/models] [--version 1.0.0]

Writes engines/models/prostate-zones-reference/<version>/{model.onnx, manifest.json, MODEL_CARD.md}.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from scanside.engines.manifest import ModelFile, ModelManifest, TensorSpec, sha256_file
from scanside.training.common import real_data_card_section
from scanside.training.zones.spec import LABELS, ZONES_SPEC

NAME = "prostate-zones-reference"
VERSION = "1.0.0"
OPSET = 17
CARD_FILE = "MODEL_CARD.md"
REPORT_FILE = "EVALUATION.md"

#: runtime post-processing (scanside.engines.tasks.gland.segment_zones reads it from the manifest)
POSTPROCESSING: Dict[str, Any] = {
    "zones": "argmax over (background, TZ, PZ)",
    "largest_component": True,  # the gland (TZ u PZ) is its largest connected component
    "min_gland_ml": 2.0,  # a smaller 'gland' is noise: none found
}


def export_onnx(model, path: Path, opset: int = OPSET) -> Path:
    import torch

    model.eval()
    d, h, w = ZONES_SPEC.shape  # type: ignore[misc]
    x = torch.zeros(1, 1, d, h, w)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["probabilities"],
                      dynamic_axes={"input": {0: "batch"}, "probabilities": {0: "batch"}},
                      opset_version=opset, dynamo=False)
    return path


def parity(model, onnx_path: Path, n: int = 2, seed: int = 0) -> Dict[str, float]:
    """Max abs difference torch vs ONNX Runtime on random normal volumes, batch n."""
    import onnxruntime as ort
    import torch

    d, h, w = ZONES_SPEC.shape  # type: ignore[misc]
    inputs = np.random.default_rng(seed).normal(size=(n, 1, d, h, w)).astype(np.float32)
    with torch.no_grad():
        pt = model(torch.from_numpy(inputs)).numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    po = sess.run(["probabilities"], {"input": inputs})[0]
    return {"probabilities_max_abs_diff": float(np.abs(pt - po).max()),
            "argmax_agreement": float((pt.argmax(1) == po.argmax(1)).mean()), "batch": n}


def build_manifest(onnx_path: Path, train_summary: Optional[dict] = None, parity_report: Optional[dict] = None,
                   version: str = VERSION) -> ModelManifest:
    d, h, w = ZONES_SPEC.shape  # type: ignore[misc]
    return ModelManifest(
        name=NAME, version=version, task="gland_segmentation",
        description=("Reference prostate zonal segmentation: axial T2W -> background / transition zone (TZ) / "
                     "peripheral zone (PZ); whole gland = TZ u PZ. Trained on simulated phantoms only."),
        inputs=[TensorSpec(name="input", shape=["batch", 1, d, h, w], description="T2W on the preprocessing grid, z-scored")],
        outputs=[TensorSpec(name="probabilities", shape=["batch", len(LABELS), d, h, w],
                            description="softmax over (background, TZ, PZ)")],
        preprocessing=ZONES_SPEC, labels=list(LABELS),
        files={"fp32": ModelFile(path="model.onnx", sha256=sha256_file(onnx_path), precision="fp32",
                                 size_bytes=onnx_path.stat().st_size, opset=OPSET)},
        postprocessing=dict(POSTPROCESSING),
        training_data=("simulator phantoms (scanside.simulator.phantom.make_phantom), axial T2W of the bpMRI protocol of 4 vendor "
                       "styles rendered by scanside.simulator.render.render_series, 3 T / 1.5 T, random artifacts and slab "
                       "placement; seeds 0..N-1 (see metrics.training)"),
        metrics={"training": train_summary or {}},
        license="Apache-2.0", source="training/zones (this repository)",
        parity=parity_report, model_card=CARD_FILE,
    )


def write_card(m: ModelManifest, root: Path) -> Path:
    """(Re)write the model card in *root* from *m*: after training, an evaluation or an INT8 release."""
    path = Path(root) / CARD_FILE
    path.write_text(render_card(m), encoding="utf-8")
    return path


def render_card(m: ModelManifest) -> str:
    ev = m.metrics.get("evaluation") or {}
    tr = m.metrics.get("training") or {}
    fig = ev.get("metrics") or {}
    sec = tr.get("seconds", {})

    def f(k, nd=3):
        v = fig.get(k)
        return "not measured yet" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))

    lines = [
        f"# Model card: {m.name} {m.version}", "",
        "## Intended use",
        "At the scanner, on the axial T2W: the prostate's transition zone (TZ) and peripheral zone (PZ), and the whole",
        "gland (TZ u PZ). The agent uses it for the zone of each lesion finding, the gland volume, the centre of the",
        "csPCa crop and the check that each DWI/ADC slab covers the gland (GLAND_NOT_COVERED). Not for reporting.", "",
        "## Training data",
        "**Trained on simulated phantoms only; not validated on patients.** Cases are the axial T2W of the",
        "`simulator` (digital pelvis phantom with a zonal prostate: TZ central/anterior growing with gland volume,",
        "PZ posterior-lateral; lesions belong to their zone), vendor styles siemens / siemens-xa / ge / philips,",
        "3 T and 1.5 T, random artifacts (noise, bias field, motion, ghosting, intensity), field of view",
        "140-200 mm and slab centre off the gland (the gland is sometimes cut by the slab ends).",
        f"Training cases: {tr.get('cases', '?')} (seeds {tr.get('seeds', '?')}). Ground truth: the phantom's tissue",
        "labels resampled (nearest) onto the model grid; outside the T2W slab is background.", "",
        "## Model",
        f"Input grid {ZONES_SPEC.shape} voxels at {ZONES_SPEC.spacing_mm} mm (SPL), centred on the axial T2W slab,",
        "z-score after 0.5-99.5 percentile clipping (`scanside.engines.preprocess.prepare`). 2.5D U-Net (each slice with its two",
        f"neighbours, 3 levels, {tr.get('parameters', '?')} parameters), softmax over background / TZ / PZ; at run time",
        "argmax, then the gland's largest connected component.",
        f"Training time (2 CPU threads on a 2-core machine shared with other jobs): loop {sec.get('train', '?')} s, total"
        f" {sec.get('total', '?')} s including rendering the cases ({sec.get('data', '?')} s), {tr.get('steps', '?')} steps"
        f" of {tr.get('batch', '?')} slice stacks. Recipe: `{tr.get('recipe', 'python -m scanside.training.zones.train')}`, then"
        f" `python -m scanside.training.zones.export {tr.get('checkpoint', 'var/zones-run/model.pt')}`.", "",
        "## Measured figures (fresh held-out simulated exams, runtime DICOM path)",
        f"- exams: {ev.get('exams', 'n/a')} (seeds from {ev.get('seed', 'n/a')}, all four vendor styles), command: `{ev.get('command', 'n/a')}`",
        f"- Dice: whole gland {f('dice_gland_mean')} (min {f('dice_gland_min')}), TZ {f('dice_tz_mean')}, PZ {f('dice_pz_mean')}",
        f"- gland volume error: median {f('volume_abs_error_pct_median', 1)} %, p90 {f('volume_abs_error_pct_p90', 1)} % "
        f"(against the phantom's gland inside the T2W slab, on the model grid)",
        f"- inference per T2W series (prepare + ONNX + post-processing, CPU): median {f('seconds_per_series_median', 3)} s",
        *real_data_card_section(m), "",
        "## Limitations",
        "- Simulated anatomy and contrast only; real glands (BPH nodules, central zone, anterior fibromuscular stroma,",
        "  post-treatment changes) are not modelled: the real-world performance is unknown.",
        "- Two zones only (TZ, PZ); the central zone is not separated. The crop (128 x 128 x 72 mm) is centred on the",
        "  T2W slab: a gland more than ~30 mm off the slab centre in-plane is cut off.",
        "- Coarse grid (1 mm in-plane, 3 mm slices): volumes below ~5 ml and thin PZ horns are approximate.",
    ]
    return "\n".join(lines) + "\n"


def export(pt_path, store_root=None, version: str = VERSION) -> ModelManifest:
    from scanside.engines.store import PACKAGE_MODELS_DIR
    from scanside.training.zones.train import load_model

    pt_path = Path(pt_path)
    model = load_model(pt_path)
    root = Path(store_root) if store_root else PACKAGE_MODELS_DIR
    dest = root / NAME / version
    onnx_path = export_onnx(model, dest / "model.onnx")
    par = parity(model, onnx_path)
    summary = None
    tj = pt_path.parent / "train.json"
    if tj.is_file():
        summary = json.loads(tj.read_text())
        summary["checkpoint"] = pt_path.as_posix()
    m = build_manifest(onnx_path, summary, par, version)
    m.save(dest)
    (dest / CARD_FILE).write_text(render_card(m), encoding="utf-8")
    return ModelManifest.load(dest)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--store", default=None)
    ap.add_argument("--version", default=VERSION)
    a = ap.parse_args(argv)
    m = export(a.checkpoint, a.store, a.version)
    print(json.dumps({"manifest": str(m.root), "parity": m.parity, "size_bytes": m.files["fp32"].size_bytes}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
