"""Export a trained csPCa model to the store: ONNX (dynamic batch), parity check, manifest, model card.

    python -m scanside.training.cspca.export var/cspca-run/model.pt [--store engines/models] [--version 1.0.0]

Writes engines/models/cspca-reference/<version>/{model.onnx, manifest.json, MODEL_CARD.md}.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from scanside.engines.manifest import ModelFile, ModelManifest, TensorSpec, sha256_file
from scanside.training.common import int8_card_section, real_data_card_section
from scanside.training.cspca.spec import CSPCA_SPEC

NAME = "cspca-reference"
VERSION = "1.0.0"
OPSET = 17
CARD_FILE = "MODEL_CARD.md"
REPORT_FILE = "EVALUATION.md"

#: runtime post-processing (scanside.engines.tasks.cspca reads it from the manifest)
POSTPROCESSING: Dict[str, Any] = {
    "lesion_threshold": 0.5,  # voxel likelihood that delimits a finding's component
    "min_peak": 0.5,  # a component is reported when its peak likelihood reaches this
    "min_volume_mm3": 30.0,  # smaller components are noise
    "split_dynamic": 0.1,  # a component with two peaks this far above their saddle is two findings
    "decision_threshold": 0.5,  # exam probability at or above which DCE is advised
    "axes": "in-plane principal axes of the component's largest-area axial slice, 4*sqrt(eigenvalue) (exact for a filled ellipse)",
}


def export_onnx(model, path: Path, opset: int = OPSET) -> Path:
    import torch

    model.eval()
    d, h, w = CSPCA_SPEC.shape  # type: ignore[misc]
    x = torch.zeros(1, len(CSPCA_SPEC.channels), d, h, w)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["likelihood", "probability"],
                      dynamic_axes={"input": {0: "batch"}, "likelihood": {0: "batch"}, "probability": {0: "batch"}},
                      opset_version=opset, dynamo=False)
    return path


def parity(model, onnx_path: Path, n: int = 2, seed: int = 0, inputs: Optional[np.ndarray] = None) -> Dict[str, float]:
    """Max abs difference torch vs ONNX Runtime on ``inputs`` (or random normal volumes), batch n."""
    import onnxruntime as ort
    import torch

    if inputs is None:
        d, h, w = CSPCA_SPEC.shape  # type: ignore[misc]
        inputs = np.random.default_rng(seed).normal(size=(n, len(CSPCA_SPEC.channels), d, h, w)).astype(np.float32)
    with torch.no_grad():
        lt, pt = model(torch.from_numpy(inputs))
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    lo, po = sess.run(["likelihood", "probability"], {"input": inputs})
    return {"likelihood_max_abs_diff": float(np.abs(lt.numpy() - lo).max()),
            "probability_max_abs_diff": float(np.abs(pt.numpy() - po).max()), "batch": int(inputs.shape[0])}


def build_manifest(onnx_path: Path, train_summary: Optional[dict] = None, parity_report: Optional[dict] = None,
                   version: str = VERSION) -> ModelManifest:
    d, h, w = CSPCA_SPEC.shape  # type: ignore[misc]
    return ModelManifest(
        name=NAME, version=version, task="cspca_detection",
        description=("Reference csPCa detector: axial T2W + ADC + high-b DWI -> voxel lesion likelihood and "
                     "exam-level csPCa probability. Decision support (DCE advice) only; trained on simulated phantoms."),
        inputs=[TensorSpec(name="input", shape=["batch", len(CSPCA_SPEC.channels), d, h, w],
                           description="T2W, ADC, HBV on the preprocessing grid, z-scored")],
        outputs=[TensorSpec(name="likelihood", shape=["batch", 1, d, h, w], description="voxel csPCa lesion likelihood 0..1"),
                 TensorSpec(name="probability", shape=["batch", 1], description="exam-level csPCa probability 0..1")],
        preprocessing=CSPCA_SPEC,
        files={"fp32": ModelFile(path="model.onnx", sha256=sha256_file(onnx_path), precision="fp32",
                                 size_bytes=onnx_path.stat().st_size, opset=OPSET)},
        postprocessing=dict(POSTPROCESSING),
        training_data=("simulator phantoms (scanside.simulator.phantom.make_phantom), bpMRI protocol of 4 vendor styles, "
                       "3 T / 1.5 T, random artifacts; seeds 0..N-1 (see metrics.training)"),
        metrics={"training": train_summary or {}},
        license="Apache-2.0", source="training/cspca (this repository)",
        parity=parity_report, model_card=CARD_FILE,
    )


def write_card(m: ModelManifest, root: Path) -> Path:
    """(Re)write the model card in *root* from *m*: after training, an evaluation or an INT8 release."""
    path = Path(root) / CARD_FILE
    path.write_text(render_card(m), encoding="utf-8")
    return path


def _run_dir(tr: dict) -> str:
    """The training run's --out folder, read from its recipe (default var/cspca-run)."""
    words = str(tr.get("recipe", "")).split(" && ")[-1].split()
    return words[words.index("--out") + 1] if "--out" in words[:-1] else "var/cspca-run"


def _host_note(tr: dict) -> str:
    """How busy the machine was while the model trained (the 1-minute load average the trainer recorded)."""
    if tr.get("host_note"):
        return tr["host_note"]
    la = tr.get("loadavg")
    if la:
        return f"1-minute load average {la['start'][0]} at the start, {la['end'][0]} at the end"
    return "a 2-core machine shared with other jobs"


def render_card(m: ModelManifest) -> str:
    ev = m.metrics.get("evaluation") or {}
    tr = m.metrics.get("training") or {}
    fig = ev.get("metrics") or {}

    def f(k, nd=3):
        v = fig.get(k)
        return "not measured yet" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))

    sec = tr.get("seconds", {})
    lines = [
        f"# Model card: {m.name} {m.version}", "",
        "## Intended use",
        "Decision support at the scanner: after the bpMRI series (axial T2W, ADC, high-b DWI) are in, an exam-level",
        "csPCa probability and lesion findings (centre, long/short axis) help decide whether DCE should be added",
        "(`DCE_ADVISED` vs `BPMRI_SUFFICIENT`). **Not a diagnosis, not for reporting.** A radiologist reads every exam.", "",
        "## Training data",
        "**Simulated phantoms only; not validated on patients.** Cases are rendered by `simulator` (digital pelvis",
        "phantom with zonal prostate and ellipsoid lesions; ground truth from the simulator). csPCa rule of the",
        "simulator: largest diameter >= 8 mm and ADC <= 1100 x 1e-6 mm^2/s; indolent lesions (small, or ADC > 1100)",
        "are negatives. Vendor styles siemens / siemens-xa / ge / philips, 3 T and 1.5 T, random artifacts",
        f"(noise, bias field, motion, ghosting, intensity; EPI distortion, fat shift and N/2 ghost in DWI). Training cases: {tr.get('cases', '?')}"
        f" ({tr.get('csPCa_cases', '?')} csPCa), seeds 0..{int(tr.get('cases', 1)) - 1}.", "",
        "## Model",
        f"Input grid {CSPCA_SPEC.shape} voxels at {CSPCA_SPEC.spacing_mm} mm (SPL), centred on the axial T2W slab",
        "(or the gland centroid), z-score after 0.5-99.5 percentile clipping per channel (`scanside.engines.preprocess.prepare`).",
        "2.5D U-Net (each slice with its two neighbours, 3 levels, "
        f"{tr.get('parameters', '?')} parameters); exam probability = sigmoid(a * max voxel logit + b),",
        "a and b refitted on whole training exams. Findings: threshold the likelihood map, 3D connected components,",
        f"each split between its peaks when two rise {POSTPROCESSING['split_dynamic']} above their saddle; centre =",
        "likelihood-weighted centroid (LPS), long/short axis from the in-plane principal axes.",
        f"Training time (2 CPU threads; {_host_note(tr)}): training {sec.get('train', '?')} s,"
        f" exam-head fit {sec.get('exam_head', '?')} s, total {sec.get('total', '?')} s over {len(tr.get('stages', [])) or 1}"
        f" stage(s), {tr.get('steps', '?')} steps, of which rendering the training cases (cached as npz under"
        f" var/cspca-cache) {sec.get('data', '?')} s.",
        f"Recipe: `{tr.get('recipe', 'python -m scanside.training.cspca.train')}`, then `python -m scanside.training.cspca.export {_run_dir(tr)}/model.pt`.",
        "",
        "## Measured figures (fresh held-out simulated exams, runtime DICOM path)",
        f"- exams: {ev.get('exams', 'n/a')} ({ev.get('positives', 'n/a')} csPCa), command: `{ev.get('command', 'n/a')}`",
        f"- AUROC {f('auroc')}, AP {f('ap')}, ranking score {f('ranking_score')} (picai-eval)",
        f"- ECE {f('ece')} (10 bins); sensitivity / specificity at {POSTPROCESSING['decision_threshold']}: "
        f"{f('sensitivity')} / {f('specificity')}",
        f"- lesion-level: csPCa lesions >= 8 mm detected {f('lesion_sensitivity')}, median centre error "
        f"{f('centre_error_median_mm', 1)} mm, within 5 mm {f('centre_within_5mm')}; false-positive findings per "
        f"negative exam {f('fp_findings_per_negative_exam')} (csPCa lesions counted as picai_eval counts them: one",
        "  per connected tumour region of the target on the model grid)",
        f"- NOT_ASSESSED rate (inputs outside the validated range, `input_range.json`): {f('not_assessed_rate')}",
        *int8_card_section(m), *real_data_card_section(m), "",
        "## Limitations",
        "- Simulated anatomy, contrast and artifacts only; the real-world performance is unknown.",
        "- The simulator's csPCa rule is a simplification (size + ADC); Gleason grade, PSA, zone-specific PI-RADS",
        "  criteria and DCE are not modelled.",
        "- Coarse grid (1.5 mm in-plane): lesions < 8 mm are near the resolution limit; axes are measured on the grid.",
        "- The crop is centred on the T2W slab; a gland far off the slab centre (> ~30 mm) can fall outside it.",
        "- The exam probability is calibrated on simulated prevalence (~50 %); recalibrate for a site.",
    ]
    return "\n".join(lines) + "\n"


def export(pt_path, store_root=None, version: str = VERSION) -> ModelManifest:
    from scanside.engines.store import PACKAGE_MODELS_DIR
    from scanside.training.cspca.train import load_model

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
