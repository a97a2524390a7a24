"""Remote inference over the KServe v2 protocol (NVIDIA Triton, Seldon MLServer, KServe) with
`tritonclient` (gRPC by default, HTTP optional).  On load the server's model metadata is
checked against the manifest (names, datatypes, ranks, static dims) so a wrong remote model
fails at start, not on the first exam.

Optional dependency: ``pip install 'tritonclient[grpc]'`` (or ``[http]``).
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from scanside.engines.base import KSERVE_TO_NUMPY, NUMPY_TO_KSERVE, Engine, EngineError, EngineInfo, EngineUnavailable, \
    ManifestMismatch
from scanside.engines.manifest import ModelManifest, TensorSpec


def _client_module(protocol: str) -> Any:
    try:
        if protocol == "grpc":
            import tritonclient.grpc as mod
        elif protocol == "http":
            import tritonclient.http as mod
        else:
            raise ValueError(f"protocol must be 'grpc' or 'http', not {protocol!r}")
    except ImportError as e:
        raise EngineUnavailable("triton", f"tritonclient[{protocol}] not importable ({e}); "
                                          f"pip install 'tritonclient[{protocol}]'") from e
    return mod


def compare_metadata(manifest: ModelManifest, metadata: Dict[str, Any]) -> List[str]:
    """Differences between the manifest and a KServe v2 model-metadata document (plain dict)."""
    problems: List[str] = []
    for kind, specs in (("inputs", manifest.inputs), ("outputs", manifest.outputs)):
        remote = {t["name"]: t for t in metadata.get(kind, [])}
        for s in specs:
            t = remote.get(s.name)
            if t is None:
                problems.append(f"{kind[:-1]} {s.name!r} not served (server has {sorted(remote)})")
                continue
            want = NUMPY_TO_KSERVE[s.dtype]
            if t.get("datatype") != want:
                problems.append(f"{s.name!r}: server datatype {t.get('datatype')}, manifest {want}")
            shape = [int(d) for d in t.get("shape", [])]
            if shape and len(shape) != s.rank:
                # Triton with max_batch_size > 0 leaves the batch axis out of the metadata
                if len(shape) == s.rank - 1 and not isinstance(s.shape[0], int):
                    shape = [-1] + shape
                else:
                    problems.append(f"{s.name!r}: server rank {len(shape)} {shape}, manifest rank {s.rank} {s.shape}")
                    continue
            for a, (r, m) in enumerate(zip(shape, s.shape)):
                if r >= 0 and isinstance(m, int) and r != m:
                    problems.append(f"{s.name!r} axis {a}: server {r}, manifest {m}")
        if kind == "inputs":
            extra = [n for n in remote if n not in {s.name for s in specs}]
            if extra:
                problems.append(f"server inputs not in the manifest: {extra}")
    return problems


class TritonEngine(Engine):
    backend = "triton"

    def __init__(self, url: str = "localhost:8001", *, protocol: str = "grpc", model_name: Optional[str] = None,
                 model_version: str = "", timeout_s: float = 60.0, ready_timeout_s: float = 0.0,
                 ssl: bool = False, check_metadata: bool = True) -> None:
        """url: host:port of the server (gRPC 8001 / HTTP 8000 on Triton).  model_name defaults to the
        manifest's name; model_version '' lets the server choose."""
        super().__init__()
        self.url, self.protocol = url, protocol
        self.model_name_override, self.model_version = model_name, model_version
        self.timeout_s, self.ready_timeout_s, self.ssl, self.check_metadata = timeout_s, ready_timeout_s, ssl, check_metadata
        self.client: Any = None
        self._mod: Any = None
        self.server_metadata: Dict[str, Any] = {}
        self.model_metadata: Dict[str, Any] = {}

    @classmethod
    def availability(cls) -> Tuple[bool, str]:
        try:
            _client_module("grpc")
        except EngineUnavailable as e:
            return False, e.reason
        import tritonclient
        return True, f"tritonclient {getattr(tritonclient, '__version__', '?')}"

    @property
    def model_name(self) -> str:
        if self.model_name_override:
            return self.model_name_override
        return self._require_loaded().name

    def load(self, manifest: ModelManifest, variant: Optional[str] = None, *, verify: bool = True) -> "TritonEngine":
        """verify is accepted for the common interface; the files live on the server."""
        mod = self._client_module()
        name = self.model_name_override or manifest.name
        if self.protocol == "grpc":
            client = mod.InferenceServerClient(self.url, ssl=self.ssl)
        else:
            client = mod.InferenceServerClient(self.url, ssl=self.ssl, connection_timeout=self.timeout_s,
                                               network_timeout=self.timeout_s)
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            try:
                ready = client.is_model_ready(name, self.model_version)
                err: Optional[Exception] = None
            except Exception as e:  # InferenceServerException / connection errors
                ready, err = False, e
            if ready or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        if not ready:
            raise EngineUnavailable(self.backend, f"model {name!r} not ready on {self.protocol}://{self.url}"
                                                  + (f": {err}" if err else ""))
        self.model_metadata = self._as_dict(client.get_model_metadata(name, self.model_version, **self._json()))
        try:
            self.server_metadata = self._as_dict(client.get_server_metadata(**self._json()))
        except Exception:
            self.server_metadata = {}
        if self.check_metadata:
            problems = compare_metadata(manifest, self.model_metadata)
            if problems:
                raise ManifestMismatch(f"{manifest.ref}: remote model {name!r} on {self.url} does not match the "
                                       f"manifest: " + "; ".join(problems))
        self.client, self.manifest, self.variant = client, manifest, variant
        return self

    def _client_module(self) -> Any:
        if self._mod is None:
            self._mod = _client_module(self.protocol)
        return self._mod

    def _json(self) -> Dict[str, Any]:
        return {"as_json": True} if self.protocol == "grpc" else {}

    @staticmethod
    def _as_dict(md: Any) -> Dict[str, Any]:
        return md if isinstance(md, dict) else dict(md)

    def _run(self, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        mod = self._client_module()
        m = self._require_loaded()
        reqs = []
        for s in m.inputs:
            arr = inputs[s.name]
            ii = mod.InferInput(s.name, list(arr.shape), NUMPY_TO_KSERVE[str(arr.dtype)])
            if self.protocol == "grpc":
                ii.set_data_from_numpy(arr)
            else:
                ii.set_data_from_numpy(arr, binary_data=True)
            reqs.append(ii)
        outs = [mod.InferRequestedOutput(o.name) for o in m.outputs]
        kw: Dict[str, Any] = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        try:
            result = self.client.infer(self.model_name, reqs, model_version=self.model_version, outputs=outs, **kw)
        except Exception as e:
            raise EngineError(f"{m.ref}: remote inference on {self.url} failed: {e}") from e
        res: Dict[str, np.ndarray] = {}
        for o in m.outputs:
            arr = result.as_numpy(o.name)
            if arr is None:
                raise EngineError(f"{m.ref}: server returned no output {o.name!r}")
            res[o.name] = self._coerce(arr, o)
        return res

    @staticmethod
    def _coerce(arr: np.ndarray, spec: TensorSpec) -> np.ndarray:
        return arr if arr.dtype == np.dtype(spec.dtype) else arr.astype(spec.dtype)

    def describe(self) -> EngineInfo:
        m = self._require_loaded()
        import tritonclient
        srv = self.server_metadata
        return EngineInfo(
            backend=self.backend, model=m.ref, variant=self.variant, precision=None,
            device=f"remote {self.protocol}://{self.url}",
            library_versions={"tritonclient": getattr(tritonclient, "__version__", "?"),
                              "server": f"{srv.get('name', '?')} {srv.get('version', '?')}"},
            providers=[f"kserve-v2/{self.protocol}"],
            extra={"model_name": self.model_name, "model_version": self.model_version,
                   "platform": self.model_metadata.get("platform"),
                   "served_versions": self.model_metadata.get("versions")})

    def close(self) -> None:
        if self.client is not None:
            try:
                self.client.close()
            except Exception:
                pass
        self.client = None
        super().close()


def kserve_dtype_to_numpy(datatype: str) -> np.dtype:
    if datatype not in KSERVE_TO_NUMPY:
        raise EngineError(f"KServe datatype {datatype} has no numpy mapping here")
    return np.dtype(KSERVE_TO_NUMPY[datatype])
