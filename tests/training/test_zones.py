"""scanside.training.zones: the phantom's zones as ground truth; smoke training -> ONNX export (dynamic batch,
parity, manifest with labels background/TZ/PZ, model card); the runtime interface over it; the shipped
model's held-out evaluation through `scanside models evaluate` against a stated Dice floor."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from scanside.engines.manifest import ModelManifest  # noqa: E402
from scanside.engines.store import ModelStore  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def test_zone_target_follows_the_phantom():
    """Zones on a grid: TZ anterior of PZ, lesions in their own zone, nothing outside the slab."""
    from scanside.engines.preprocess import model_grid
    from scanside.simulator.phantom import make_phantom
    from scanside.training.zones.data import TZ, PZ, zone_labels, zone_target
    from scanside.training.zones.spec import ZONES_SPEC

    ph = make_phantom(21, n_lesions=1, cspca=True)
    z = zone_labels(ph)
    assert set(np.unique(z)) == {0, TZ, PZ}
    assert int(((z > 0) != ph.prostate_mask()).sum()) == 0
    les = ph.lesions[0]
    assert np.all(z[ph.lesion_masks == 1] == (TZ if les.zone == "TZ" else PZ))
    # TZ lies anterior (smaller y, LPS) of the PZ's centroid
    assert np.argwhere(z == TZ)[:, 1].mean() < np.argwhere(z == PZ)[:, 1].mean()
    from scanside.agent.dicom.volume import Volume

    ref = Volume.from_array_affine(np.zeros((24, 64, 64), np.float32), np.diag([3.0, 2.0, 2.0, 1.0]))
    # the model grid centred on the gland
    grid = model_grid(ref, ZONES_SPEC, center_lps=np.asarray(ph.prostate_center_lps_mm))
    y = zone_target(ph, grid)
    vox_ml = float(np.prod(grid.spacing)) / 1000.0
    assert (y > 0).sum() * vox_ml == pytest.approx(ph.prostate_volume_ml, rel=0.1)
    inside = np.zeros(grid.shape, bool)
    inside[:12] = True
    assert not zone_target(ph, grid, inside)[12:].any()


def test_smoke_training_exports_onnx_with_parity(tmp_path):
    import onnxruntime as ort

    from scanside.engines.tasks.gland import GlandService, ZONES_MODEL
    from scanside.training.zones.data import make_case
    from scanside.training.zones.export import export
    from scanside.training.zones.spec import LABELS, ZONES_SPEC
    from scanside.training.zones.train import train

    s = train(cases=2, minutes=5.0, out=str(tmp_path / "run"), batch=2, cache_dir=str(tmp_path / "cache"),
              max_steps=2, widths=(4, 8, 16), log=lambda *_: None)
    assert s["steps"] == 2 and s["cases"] == 2 and np.isfinite(s["final_loss"])
    m = export(tmp_path / "run" / "model.pt", tmp_path / "store", version="0.0.1")
    m2 = ModelManifest.load(m.root)
    assert m2.task == "gland_segmentation" and m2.preprocessing == ZONES_SPEC and m2.labels == list(LABELS)
    assert m2.labels == ["background", "TZ", "PZ"]
    assert (m.root / "MODEL_CARD.md").read_text().count("not validated on patients") == 1
    assert m.files["fp32"].size_bytes < 10 * 1024 * 1024 and len(m.files["fp32"].sha256) == 64
    assert m.parity["batch"] == 2 and m.parity["probabilities_max_abs_diff"] < 1e-4
    sess = ort.InferenceSession(str(m.file_path()), providers=["CPUExecutionProvider"])
    x = np.zeros((3, 1) + tuple(ZONES_SPEC.shape), np.float32)
    (p,) = sess.run(None, {"input": x})
    assert p.shape == (3, 3) + tuple(ZONES_SPEC.shape) and np.allclose(p.sum(1), 1.0, atol=1e-4)
    # the agent's one gland interface serves it when named (auto takes no gland model whose real-data figures
    # are unknown: a scanner's exams are real); the result carries a zone map
    store = ModelStore(tmp_path / "store")
    assert GlandService(store).model is None
    svc = GlandService(store, model=ZONES_MODEL)
    assert svc.model == ZONES_MODEL
    case = make_case(5)
    vol = case.grid.volume(case.x[0])
    res = svc.segment(vol)
    assert res is not None and res.model == "prostate-zones-reference/0.0.1"
    assert res.zones is not None and res.zones.shape == res.mask.shape == tuple(ZONES_SPEC.shape)
    assert set(np.unique(res.zones)) <= {0, 1, 2} and np.array_equal(res.zones > 0, res.mask)


def test_shipped_model_heldout_floor(tmp_path):
    """`scanside models evaluate prostate-zones-reference --json` on 4 fresh exams (one per vendor style, seeds
    never used in training) through the runtime DICOM path. Floor (training/zones/evaluate.py FLOOR): mean Dice
    whole gland >= 0.85, TZ >= 0.75, PZ >= 0.65; gland volume error (median) <= 20 %."""
    if not any(m.name == "prostate-zones-reference" for m in ModelStore().list()):
        pytest.skip("prostate-zones-reference not in engines/models")
    from scanside.training.zones.evaluate import FLOOR

    out = subprocess.run([sys.executable, "-m", "scanside.agent.cli", "models", "evaluate", "prostate-zones-reference", "--json",
                          "--exams-per-vendor", "1", "--seed", "970000", "--workdir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.stdout, out.stderr[-2000:]
    rep = json.loads(out.stdout)
    m = rep["metrics"]
    assert rep["exams"] == 4 and not rep["errors"]
    assert {r["vendor"] for r in rep["rows"]} == {"siemens", "siemens-xa", "ge", "philips"}
    for k, v in FLOOR.items():
        assert m[k] is not None and m[k] >= v, (k, m[k], v)
    assert m["volume_abs_error_pct_median"] <= 20.0
    assert rep["passed"] is True and out.returncode == 0
