"""Triton/KServe v2 engine against a REAL v2 server: Seldon MLServer (PyPI), started here as a
subprocess with a small custom runtime serving the same ONNX through onnxruntime.  Outputs are
compared with the local ONNX Runtime engine.

MLServer pins an older fastapi than the project, so it lives in its own venv:
    python -m venv .venv-mlserver && .venv-mlserver/bin/pip install mlserver onnxruntime numpy
(or point SCANSIDE_MLSERVER at an `mlserver` executable).  The client side needs
`tritonclient[grpc]` in the project venv.  Without either, the server tests skip and say so.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pytest

from scanside.engines.base import EngineError, ManifestMismatch
from scanside.engines.manifest import ModelManifest
from scanside.engines.backends.triton_engine import TritonEngine, compare_metadata
from tests.engines._tiny import install_tiny, sample_input

REPO = Path(__file__).resolve().parents[2]

RUNTIME = '''
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntimeModel(MLModel):
    async def load(self) -> bool:
        uri = await get_model_uri(self._settings)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        self.session = ort.InferenceSession(uri, so, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        outs = self.session.run(self.output_names, feeds)
        return InferenceResponse(model_name=self.name, model_version=self.version,
                                 outputs=[NumpyCodec.encode_output(n, v) for n, v in zip(self.output_names, outs)])
'''


def _mlserver() -> Optional[str]:
    for cand in (os.environ.get("SCANSIDE_MLSERVER"), str(REPO / ".venv-mlserver" / "bin" / "mlserver"),
                 shutil.which("mlserver")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


def _tritonclient() -> Optional[str]:
    try:
        import tritonclient.grpc  # noqa: F401
    except ImportError as e:
        return str(e)
    return None


MLSERVER = _mlserver()
CLIENT_MISSING = _tritonclient()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _v2_metadata(specs) -> list:
    from scanside.engines.base import NUMPY_TO_KSERVE
    return [{"name": s.name, "datatype": NUMPY_TO_KSERVE[s.dtype],
             "shape": [d if isinstance(d, int) else -1 for d in s.shape]} for s in specs]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    if CLIENT_MISSING:
        pytest.skip(f"tritonclient[grpc] not installed ({CLIENT_MISSING}); pip install 'tritonclient[grpc]'")
    if MLSERVER is None:
        pytest.skip("Seldon MLServer not installed: python -m venv .venv-mlserver && "
                    ".venv-mlserver/bin/pip install mlserver onnxruntime numpy (or set SCANSIDE_MLSERVER)")
    tmp = tmp_path_factory.mktemp("mlserver")
    m = install_tiny(tmp / "store")
    repo = tmp / "repo"
    mdir = repo / m.name
    mdir.mkdir(parents=True)
    shutil.copyfile(m.file_path(), mdir / "model.onnx")
    (mdir / "ort_runtime.py").write_text(RUNTIME)
    (mdir / "model-settings.json").write_text(json.dumps({
        "name": m.name, "implementation": "ort_runtime.OnnxRuntimeModel",
        "parameters": {"uri": "./model.onnx", "version": m.version},
        "inputs": _v2_metadata(m.inputs), "outputs": _v2_metadata(m.outputs)}))
    grpc_port, http_port, metrics_port = _free_port(), _free_port(), _free_port()
    (repo / "settings.json").write_text(json.dumps({
        "http_port": http_port, "grpc_port": grpc_port, "metrics_port": metrics_port, "host": "127.0.0.1",
        "parallel_workers": 0, "load_models_at_startup": True, "debug": False}))
    log = open(tmp / "mlserver.log", "w")
    proc = subprocess.Popen([MLSERVER, "start", str(repo)], cwd=repo, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"127.0.0.1:{grpc_port}"
    try:
        deadline = time.monotonic() + 45
        eng = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                eng = TritonEngine(url, ready_timeout_s=1.0).load(m)
                break
            except EngineError:
                continue
        if eng is None:
            log.flush()
            pytest.fail(f"MLServer did not serve {m.ref} on {url} within 45 s (exit {proc.poll()}):\n"
                        + (tmp / "mlserver.log").read_text()[-3000:])
        eng.close()
        yield m, url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.mark.slow
def test_remote_matches_local_onnxruntime(served: tuple) -> None:
    from scanside.engines.backends.onnxruntime_engine import OnnxRuntimeEngine
    m, url = served
    x = sample_input(3)
    with TritonEngine(url).load(m) as remote, OnnxRuntimeEngine(intra_op_threads=1).load(m) as local:
        a = remote.run({"x": x})["logits"]
        b = local.run({"x": x})["logits"]
        info = remote.describe()
    assert a.shape == (3, 2) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert info.backend == "triton" and info.library_versions["server"].startswith("mlserver")
    assert info.providers == ["kserve-v2/grpc"]


@pytest.mark.slow
def test_store_picks_remote_when_configured(served: tuple) -> None:
    m, url = served
    store = ModelStoreFor(m, url)
    engine, sel = store.open(m.name)
    with engine:
        assert sel.backend == "triton" and "no TensorRT plan" in sel.skipped["tensorrt"]
        assert engine.run({"x": sample_input(1)})["logits"].shape == (1, 2)


def ModelStoreFor(m: ModelManifest, url: str):
    from scanside.engines.store import ModelStore
    return ModelStore(m.root.parent.parent, preference=["tensorrt", "triton", "onnxruntime"],
                      engine_options={"triton": {"url": url}})


@pytest.mark.slow
def test_metadata_mismatch_is_refused(served: tuple) -> None:
    m, url = served
    d = json.loads(m.to_json())
    d["inputs"][0]["shape"] = ["N", 1, 16, 16, 4]
    wrong = ModelManifest.model_validate(d).set_root(m.root)
    with pytest.raises(ManifestMismatch, match="'x' axis 2: server 8, manifest 16"):
        TritonEngine(url).load(wrong)


@pytest.mark.slow
def test_unknown_model_is_unavailable(served: tuple) -> None:
    from scanside.engines.base import EngineUnavailable
    m, url = served
    other = m.model_copy(update={"name": "not-served"})
    with pytest.raises(EngineUnavailable, match="'not-served' not ready"):
        TritonEngine(url).load(other)


# ---- no server needed ------------------------------------------------------------------------------
def test_compare_metadata_plain() -> None:
    from tests.engines._tiny import tiny_manifest_dict
    m = ModelManifest.model_validate(tiny_manifest_dict("0" * 64))
    good = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 1, 8, 8, 4]}],
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 2]}]}
    assert compare_metadata(m, good) == []
    # Triton with max_batch_size > 0 leaves the batch axis out
    assert compare_metadata(m, {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8, 8, 4]}],
                                "outputs": [{"name": "logits", "datatype": "FP32", "shape": [2]}]}) == []
    bad = {"inputs": [{"name": "x", "datatype": "FP16", "shape": [-1, 1, 8, 8]}, {"name": "y", "datatype": "FP32"}],
           "outputs": []}
    problems = compare_metadata(m, bad)
    assert any("datatype FP16" in p for p in problems) and any("'x' axis 2: server 1, manifest 8" in p for p in problems)
    assert any("output 'logits' not served" in p for p in problems)
    assert any("server inputs not in the manifest: ['y']" in p for p in problems)
