"""`scanside convert calibrate|parity|trt` end to end on the tiny model and simulated DICOM."""
from __future__ import annotations

import json

from scanside.agent.cli.convert import main
from scanside.engines.manifest import ModelManifest
from scanside.engines.store import ModelStore


def test_calibrate_then_parity_then_the_store_loads_int8(tiny_model, t2w_exams: list, capsys) -> None:
    root = tiny_model.root.parent.parent
    rc = main(["convert", "--store", str(root), "calibrate", "tiny3d", "--data", str(t2w_exams[0]),
               "--data", str(t2w_exams[1]), "--variants", "int8_u8s8"])
    out = capsys.readouterr().out
    assert rc == 0 and json.loads(out)["samples"] == 2
    m = ModelManifest.load(tiny_model.root)
    assert "int8_u8s8" in m.files and m.parity is None
    rc = main(["convert", "--store", str(root), "parity", "tiny3d", "--data", str(t2w_exams[2]),
               "--data", str(t2w_exams[3]), "--threads", "1"])
    assert rc == 0
    m = ModelManifest.load(tiny_model.root)
    assert m.parity["variants"]["int8_u8s8"]["sha256"] == m.files["int8_u8s8"].sha256
    eng, sel = ModelStore(root, preference=["onnxruntime"]).open("tiny3d", variant="int8_u8s8")
    eng.close()
    assert sel.precision == "int8_qdq_u8s8"
    # no GPU/TensorRT here: a clear refusal, not a traceback
    rc = main(["convert", "--store", str(root), "trt", "tiny3d"])
    err = capsys.readouterr().err
    assert rc == 3 and "cannot build here" in err
    assert main(["convert", "--store", str(root), "calibrate", "nope", "--data", str(t2w_exams[0])]) == 2
