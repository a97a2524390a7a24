"""Export: torch -> ONNX (dynamic batch axis, softmax probabilities out), ONNX Runtime parity,
ModelManifest and model card, installed as <store>/sequence-classifier/<version>/.

Also the way back (``load_from_onnx``): a shipped ONNX file restores the torch model for
fine-tuning (batch norm is folded into the convolutions by the exporter, so the restored model
carries identity batch norms and is fine-tuned with frozen statistics).
"""
from __future__ import annotations

import datetime as _dt
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import nn

from scanside.agent.schema.taxonomy import LABELS
from scanside.engines.manifest import ModelFile, ModelManifest, TensorSpec, sha256_file
from scanside.training.common import int8_card_section
from scanside.training.sequence.data import IN_CHANNELS, INPUT_SHAPE, PREPROCESS
from scanside.training.sequence.model import SeqResNet3d

NAME = "sequence-classifier"
INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
FEATURES_NAME = "features"
OPSET = 17
MODEL_FILE = "model.onnx"
CARD_FILE = "MODEL_CARD.md"
DEFAULT_STORE = Path(__file__).resolve().parents[2] / "engines" / "models"
REALISM_DATA = (
    " A fraction {realism} of the training exams (validation exams never) from the realistic phantom of "
    "scanside.training.sequence.realism: elastically deformed anatomy, fat septa, sub-tissue texture with T2, PD and ADC "
    "varying together in every sequence of the exam, tissue constants drawn per exam, and (GE habit) EPI series "
    "interpolated to a 256 matrix.")

TRAINING_DATA = (
    "Simulated phantoms only (scanside simulator): randomised prostate mpMRI exams of four vendor styles "
    "(Siemens VE, Siemens XA, GE, Philips), 1.5 and 3 T, varied planes, TE/TR/FOV/matrix/slice counts, "
    "b-values, noise, bias field, motion blur, ghosting, EPI distortion, fat shift and N/2 ghost in DWI, partial "
    "coverage and intensity scaling "
    "(scanside.simulator.render.Artifacts.sample per series), rendered directly with the DICOM writers' 12-bit quantisation. "
    "Not validated on patient data.")


class _WithSoftmax(nn.Module):
    """Probabilities and, second, the pooled features the agent's out-of-distribution score reads
    (scanside.engines.tasks.image_label; fitted by scanside.training.sequence.uncertainty)."""

    def __init__(self, net: SeqResNet3d):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.net.features(x)
        return torch.softmax(self.net.fc(f), dim=1), f


def export_onnx(model: nn.Module, path: Path) -> Path:
    model = model.eval()
    x = torch.zeros((2, IN_CHANNELS) + INPUT_SHAPE)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(_WithSoftmax(model), (x,), str(path), input_names=[INPUT_NAME],
                      output_names=[OUTPUT_NAME, FEATURES_NAME],
                      dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}, FEATURES_NAME: {0: "batch"}},
                      opset_version=OPSET, do_constant_folding=True, dynamo=False)
    return path


def onnx_parity(model: nn.Module, path: Path, n: int = 4, seed: int = 0) -> Dict[str, Any]:
    """Max absolute difference of torch and ONNX Runtime probabilities on random inputs (batch n)."""
    import onnxruntime as ort

    x = np.random.default_rng(seed).standard_normal((n, IN_CHANNELS) + INPUT_SHAPE).astype(np.float32)
    with torch.no_grad():
        ref = torch.softmax(model.eval()(torch.from_numpy(x)), 1).numpy()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    got = sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    return {"max_abs_diff": float(np.abs(ref - got).max()), "batch": n, "argmax_equal": bool((ref.argmax(1) == got.argmax(1)).all()),
            "onnxruntime": ort.__version__, "torch": torch.__version__}


def build_manifest(version: str, onnx_path: Path, *, training: Optional[dict] = None,
                   parity: Optional[dict] = None, metrics: Optional[dict] = None, model_width: int = 96) -> ModelManifest:
    import onnx

    opset = next((o.version for o in onnx.load(str(onnx_path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx")), OPSET)
    return ModelManifest(
        name=NAME, version=version, task="sequence_classification",
        description="3D ResNet that identifies a prostate MR series from its images alone (no header input): "
                    "T2WI_nan, T2WI_fs, DWI_Low (b<500), DWI_High (b>=500), ADC, other (DCE phase, T1, localizer). "
                    "Protocol QA and decision support: flags series whose header label disagrees with the images.",
        inputs=[TensorSpec(name=INPUT_NAME, dtype="float32", shape=["batch", IN_CHANNELS, *INPUT_SHAPE],
                           description="one series volume, scanside.engines.preprocess.prepare with `preprocessing`")],
        outputs=[TensorSpec(name=OUTPUT_NAME, dtype="float32", shape=["batch", len(LABELS)],
                            description="softmax class probabilities in `labels` order"),
                 TensorSpec(name=FEATURES_NAME, dtype="float32", shape=["batch", int(model_width)],
                            description="pooled penultimate features (out-of-distribution score)")],
        preprocessing=PREPROCESS, labels=list(LABELS),
        files={"fp32": ModelFile(path=MODEL_FILE, sha256=sha256_file(onnx_path), precision="fp32",
                                 size_bytes=onnx_path.stat().st_size, opset=opset)},
        default_variant="fp32",
        postprocessing={"type": "softmax_argmax", "dynamic_series": "middle temporal phase (scanside.agent.dicom.frames.select_frames)"},
        training_data=TRAINING_DATA + (REALISM_DATA.format(realism=training["realism"]) if (training or {}).get("realism")
                                       else "") + (f" Training run: {_training_summary(training)}" if training else ""),
        metrics=metrics or {}, license="Apache-2.0", source="scanside training/sequence (trained in-repo)",
        parity=parity, model_card=CARD_FILE)


def _training_summary(t: dict) -> str:
    keys = ("exams", "samples", "epochs", "steps", "lr", "params", "seconds_data", "seconds_fit", "seconds_total", "threads",
            "init_from", "realism", "constants_sd", "wide_intensity")
    return ", ".join(f"{k}={t[k]}" for k in keys if k in t)


def export_model(model: nn.Module, version: str, *, store_root: Optional[Path] = None, training: Optional[dict] = None,
                 metrics: Optional[dict] = None, overwrite: bool = True) -> ModelManifest:
    """ONNX + parity + manifest + model card -> <store_root>/sequence-classifier/<version>/."""
    from scanside.engines.store import ModelStore

    root = Path(store_root) if store_root is not None else DEFAULT_STORE
    with tempfile.TemporaryDirectory() as td:
        onnx_path = export_onnx(model, Path(td) / MODEL_FILE)
        parity = onnx_parity(model, onnx_path)
        if parity["max_abs_diff"] > 1e-4:
            raise RuntimeError(f"ONNX parity failed: {parity}")
        m = build_manifest(version, onnx_path, training=training, parity=parity, metrics=metrics,
                           model_width=int(model.fc.in_features))
        card = Path(td) / CARD_FILE
        card.write_text(render_card(m, training), encoding="utf-8")
        store = ModelStore([root], user_dir=None)
        return store.install(m, {MODEL_FILE: onnx_path, CARD_FILE: card}, root=root, overwrite=overwrite)


def _describe_preprocessing(m: ModelManifest) -> str:
    p = m.preprocessing
    if p is None:
        return "none recorded."
    shape = "x".join(str(v) for v in p.shape or ())
    text = (f"the series kept in its own acquisition axes (slice, row, col); channel 0 its whole field of view resized "
            f"to {shape}{' with anti-aliasing' if p.antialias else ''}")
    views = [f"channel {i} its centre at {' x '.join(f'{s:g}' for s in v.spacing_mm)} mm, cropped to {shape}"
             for i, v in enumerate(p.detail_views, 1)]
    if views:
        text += "; " + "; ".join(views) + (" (the acquired resolution and noise texture, which the resize erases)")
    lo, hi = p.clip_percentiles
    return text + f"; each channel z-scored after {lo:g}-{hi:g} percentile clipping."


def _error_summary(errors: list) -> str:
    """'3 T2WI_fs read as DWI_Low (axial), 1 ...' from the evaluation's misclassified series."""
    if not errors:
        return "none listed"
    counts: Dict[tuple, int] = {}
    for e in errors:
        key = (e.get("label"), e.get("pred") or e.get("error"), e.get("plane"))
        counts[key] = counts.get(key, 0) + 1
    parts = [f"{n} {t} read as {p} ({pl})" for (t, p, pl), n in sorted(counts.items(), key=lambda kv: -kv[1])]
    return ", ".join(parts) + " (see EVALUATION.md)"


def _below_target(r: dict) -> bool:
    """An evaluated subset under the issue's target (accuracy >= 0.995, kappa >= 0.99)."""
    return r.get("accuracy", 0) < 0.995 or r.get("kappa", 0) < 0.99


def write_card(m: ModelManifest, root: Path) -> Path:
    """(Re)write the model card in *root* from *m*: after training, an evaluation or an INT8 release."""
    path = Path(root) / CARD_FILE
    path.write_text(render_card(m, training_record(m)), encoding="utf-8")
    return path


def training_record(m: ModelManifest) -> Dict[str, str]:
    """The training run's key=value figures, read back from the manifest's training_data text."""
    t: Dict[str, str] = {}
    if m.training_data and "params=" in m.training_data:
        for kv in m.training_data.split("Training run:")[-1].split(","):
            if "=" in kv:
                k, v = kv.strip().split("=", 1)
                t[k] = v
    return t


def render_card(m: ModelManifest, training: Optional[dict] = None) -> str:
    """The model card (markdown). Evaluation figures are filled in by `scanside models evaluate --write`."""
    ev = m.metrics.get("evaluation") if m.metrics else None
    lines = [
        f"# Model card: {m.name} {m.version}", "",
        "## Intended use",
        "Protocol QA and decision support beside the scanner: identify the sequence of each completed series "
        "from its pixels alone, so that a series whose header (description, tags) disagrees with its images is "
        "flagged to the technologist. Not a diagnostic device; never used to make clinical decisions on its own.", "",
        "## Model",
        f"- 3D ResNet (stem + 3 residual stages, ~{training.get('params', 'n/a') if training else 'n/a'} parameters), "
        f"input `{m.inputs[0].name}` {m.inputs[0].shape}, output `{m.outputs[0].name}` {m.outputs[0].shape}.",
        f"- Labels: {', '.join(m.labels or [])}. `other` = DCE (one temporal phase: the agent passes the middle one), "
        "T1, localizer (the largest single-orientation group of a multi-plane localizer).",
        "- Preprocessing (scanside.engines.preprocess.prepare, shared by training, evaluation and the agent): " + _describe_preprocessing(m),
        f"- File: {m.files['fp32'].path} ({m.files['fp32'].size_bytes} bytes, sha256 {m.files['fp32'].sha256}).",
        *_same_weights_line(m), "",
        "## Training data",
        m.training_data or "", "",
        "## Evaluation",
    ]
    others = {seed: e for seed, e in (m.metrics.get("evaluations") or {}).items()
              if ev and e.get("command") != ev.get("command")}
    if ev:
        lines += [f"Measured by `scanside models evaluate {m.name}` ({ev.get('measured_at', '')}) on freshly simulated "
                  "DICOM exams through the runtime path (DICOM -> scanside.agent.dicom.header/series -> scanside.agent.dicom.volume -> "
                  f"scanside.engines.preprocess -> {ev.get('backend') or 'engine'}):", ""]
        for subset, r in ev.get("subsets", {}).items():
            lines.append(f"- {subset}: n={r['n']}, accuracy {r['accuracy']:.4f}, Cohen's kappa {r['kappa']:.4f}")
        lines += ["", "See EVALUATION.md for per-class figures and the confusion matrix."]
        if others:
            lines += ["", "Other fresh sets measured the same way (each set's first seed; none used for training):"]
            for seed, e in others.items():
                a = e["subsets"].get("all", {})
                lines.append(f"- `{e['command']}`: n={a.get('n')}, accuracy {a.get('accuracy', 0):.4f}, Cohen's kappa "
                             f"{a.get('kappa', 0):.4f} ({e.get('errors')} misclassified)")
            history = list((m.metrics.get("evaluations") or {}).values())  # every set, the one above included
            n_all = sum(e["subsets"].get("all", {}).get("n", 0) for e in history)
            wrong = sum(int(e.get("errors") or 0) for e in history)
            if n_all:
                lines.append(f"- pooled, {len(history)} sets: {n_all - wrong} of {n_all} series right "
                             f"(accuracy {(n_all - wrong) / n_all:.4f})")
        low = [k for k, r in ev.get("subsets", {}).items() if _below_target(r)]
        low += [f"all of set {seed}" for seed, e in others.items() if _below_target(e["subsets"].get("all", {}))]
        if low:
            lines += ["", f"**Below the target** (accuracy >= 0.995, kappa >= 0.99) on: {', '.join(low)}. "
                      f"Errors in the set above: {_error_summary(ev.get('errors') or [])}."]
    else:
        lines.append("Not yet evaluated (run `scanside models evaluate sequence-classifier --write`).")
    from scanside.training.sequence.real import real_card_section

    from scanside.training.sequence.adapt import adaptation_card_section

    lines += real_card_section(m)
    lines += adaptation_card_section(m)
    lines += uncertainty_card_section(m)
    lines += int8_card_section(m)
    lines += ["", "## Limitations",
              "- Trained and evaluated on simulated phantoms only; not validated on patients. Real scanners, coils, "
              "implants, other anatomy and unusual protocols may fail silently: retrain on a site's labelled series "
              "(`scanside models train sequence`) and re-evaluate before relying on it.",
              "- Real scans (see above): the simulator's phantom is a few flat-valued compartments filling about half the "
              "field of view, where a real pelvis fills it with textured anatomy; the model keys on the phantom's look "
              "(real axial T2W reads as ADC, real ADC maps as DWI_Low) and neither wider intensity randomisation nor the "
              "feature-distance score fitted on simulated series catches that; a class input range, where the model has "
              "one, makes most of those answers `uncertain`. Site adaptation (`scanside models adapt`) "
              "on the site's own header-labelled exams, and shadow mode until it is validated there, are the remedies "
              "here; a phantom that looks like a real pelvis is the open one (bench/results/sequence_transfer.json).",
              "- DWI_Low/DWI_High is decided at b = 500 s/mm^2 from the images; b-values near 500 are ambiguous by nature.",
              "- One volume per series: a dynamic series is judged on one phase, a multi-plane localizer on one plane.",
              "- Classes outside the taxonomy (e.g. spectroscopy, perfusion maps) are forced into one of the six labels.",
              ""]
    return "\n".join(lines)


def _same_weights_line(m: ModelManifest) -> list:
    w = (m.metrics or {}).get("same_weights_as")
    if not w:
        return []
    return [f"- Same weights as {w['model']} (its FP32 file {w['sha256'][:12]}..., probabilities within {w['max_abs_diff']:g}), "
            "re-exported with a second output `features` for the uncertainty gate; the simulated evaluations below are "
            f"{w['model']}'s and hold for this file. FP32 only: INT8 variants come from a calibration on real data."]


def uncertainty_card_section(m: ModelManifest) -> list:
    u = (m.postprocessing or {}).get("uncertainty")
    if not u:
        return ["", "## Uncertainty", "No uncertainty gate fitted: every series gets a label, however unsure."]
    r = u.get("report") or {}
    return ["", "## Uncertainty (scanside.engines.tasks.image_label)",
            f"- Temperature scaling T = {u['temperature']:g} (fitted {r.get('temperature_fitted', 'n/a')}, kept >= "
            f"{r.get('min_temperature', 'n/a')}: never sharper than the model, since the fit sees simulated series only); "
            f"a calibrated confidence below {u['min_confidence']:g} makes the image label `uncertain` (no LABEL_MISMATCH alert).",
            f"- Out-of-distribution score: squared Mahalanobis distance of the pooled features (`{u.get('feature_output')}`) "
            f"to the nearest class mean (shared, shrunk covariance; {u.get('stats_file')}); above {u.get('ood_threshold', 0):.4g} "
            f"(the {r.get('ood_quantile', 'n/a')} quantile of held-out simulated series) the label is `uncertain`.",
            f"- Fitted on {u.get('fitted_on', 'n/a')}. On the threshold half: {r.get('threshold_uncertain_rate', 'n/a')} "
            f"uncertain, accuracy of the confident {r.get('threshold_accuracy_confident', 'n/a')}, ECE "
            f"{r.get('ece_before', 'n/a')} before and {r.get('ece_after', 'n/a')} after temperature scaling."
            ] + _class_ranges_lines(m, u, r)


def _class_ranges_lines(m: ModelManifest, u: dict, r: dict) -> list:
    if not u.get("class_ranges_file"):
        return []
    thr = ", ".join(f"{k} {v:g}" for k, v in (r.get("class_input_ranges") or {}).items())
    gate = ((m.metrics or {}).get("evaluation") or {}).get("gate") or {}
    cost = (f" On the evaluation's fresh simulated series the whole gate answers `uncertain` on "
            f"{gate['uncertain_rate']:.1%} of {gate['n']}." if gate.get("n") else "")
    return [f"- Class input range ({u['class_ranges_file']}): the prepared input's statistics (intensity percentiles, "
            "gradient, high-frequency share, channel correlations; scanside.engines.tasks.input_range) against the fit "
            "series of the class the model names (held-out simulated series; for a site-adapted version the site's own "
            "and the replay); beyond the class' threshold (1.25x the largest distance of the threshold series: "
            f"{thr}) the label is `uncertain` with the statistics that are out. A class without a threshold here had "
            f"too few series to measure a spread and is not range-checked.{cost}"]


def load_from_onnx(path: Path) -> SeqResNet3d:
    """Rebuild the torch model from an exported ONNX file (conv weights with batch norm folded in;
    batch norms set to identity with the folded bias). Verified by the caller's parity check."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in g.graph.initializer}
    convs = [n for n in g.graph.node if n.op_type == "Conv"]
    if not convs:
        raise ValueError(f"{path}: no Conv nodes")
    model = SeqResNet3d(in_channels=int(inits[convs[0].input[1]].shape[1])).eval()
    pairs = model.conv_bn_pairs()
    if len(convs) != len(pairs):
        raise ValueError(f"{path}: {len(convs)} Conv nodes, model has {len(pairs)}")
    # match by execution order; shapes must agree
    with torch.no_grad():
        for node, (conv, bn) in zip(convs, pairs):
            w = inits[node.input[1]]
            if tuple(w.shape) != tuple(conv.weight.shape):
                raise ValueError(f"{path}: Conv {node.name} weight {w.shape} != {tuple(conv.weight.shape)}")
            conv.weight.copy_(torch.from_numpy(w))
            b = inits[node.input[2]] if len(node.input) > 2 else np.zeros(w.shape[0], np.float32)
            bn.weight.fill_(1.0)
            bn.bias.copy_(torch.from_numpy(b))
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
        gemm = next(n for n in g.graph.node if n.op_type in ("Gemm", "MatMul"))
        w = inits[gemm.input[1]]
        trans_b = next((a.i for a in gemm.attribute if a.name == "transB"), 0)
        if gemm.op_type == "MatMul" or not trans_b:
            w = w.T
        model.fc.weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
        model.fc.bias.copy_(torch.from_numpy(inits[gemm.input[2]]))
    return model


def copy_version(src: ModelManifest, dest_root: Path) -> Path:
    """Copy a model version directory (tests, retraining stores)."""
    dest = Path(dest_root) / src.name / src.version
    shutil.copytree(src.root, dest, dirs_exist_ok=True)
    return dest


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def reexport_with_features(base: ModelManifest, version: str, store_root: Optional[Path] = None) -> ModelManifest:
    """The same weights as ``base`` (restored from its FP32 ONNX) exported as ``version`` with the
    features output the uncertainty gate needs; probabilities must match ``base`` within 1e-5 on random
    inputs, or nothing is written. Training record and simulated evaluations carry over (same weights);
    INT8 variants do not (the store runs FP32 until a calibration on real data makes new ones)."""
    import onnxruntime as ort

    model = load_from_onnx(base.file_path("fp32")).eval()
    x = np.random.default_rng(7).standard_normal((4, IN_CHANNELS) + INPUT_SHAPE).astype(np.float32)
    ref = ort.InferenceSession(str(base.file_path("fp32")), providers=["CPUExecutionProvider"]).run(None, {INPUT_NAME: x})[0]
    m = export_model(model, version, store_root=store_root, overwrite=False)
    got = ort.InferenceSession(str(m.file_path("fp32")), providers=["CPUExecutionProvider"]).run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    diff = float(np.abs(ref - got).max())
    if diff > 1e-5:
        shutil.rmtree(m.root, ignore_errors=True)
        raise RuntimeError(f"re-export of {base.ref} differs from it by {diff}")
    metrics = {k: v for k, v in base.metrics.items() if k in ("evaluation", "evaluations")}
    metrics["same_weights_as"] = {"model": base.ref, "sha256": base.files["fp32"].sha256, "max_abs_diff": diff}
    m = m.model_copy(update={"training_data": base.training_data, "metrics": metrics})
    m.set_root(Path(m.root))
    m.save(Path(m.root))
    for extra in ("EVALUATION.md",):
        if (Path(base.root) / extra).is_file():
            shutil.copyfile(Path(base.root) / extra, Path(m.root) / extra)
    m = ModelManifest.load(Path(m.root))
    write_card(m, Path(m.root))
    return m


if __name__ == "__main__":  # python -m scanside.training.sequence.export --from 1.4.0 --version 1.4.1
    import argparse
    import json

    from scanside.engines.store import ModelStore

    ap = argparse.ArgumentParser(description=reexport_with_features.__doc__)
    ap.add_argument("--from", dest="base", required=True, help="version to re-export")
    ap.add_argument("--version", required=True)
    a = ap.parse_args()
    out = reexport_with_features(ModelStore([DEFAULT_STORE], user_dir=None).resolve(f"{NAME}@{a.base}"), a.version)
    print(json.dumps({"model": out.ref, "path": str(out.root), **out.metrics["same_weights_as"]}, indent=2))
