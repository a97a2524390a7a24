"""GPU check in one go: what the TensorRT back end needs from a GPU machine, run once, recorded.

    python bench/gpu_check.py                 # on a GPU machine: writes bench/results/gpu.json
    python bench/gpu_check.py --dry-run       # anywhere (CI): fake CUDA too, prints the record

On a machine with an NVIDIA GPU and cuda-bindings (cuda-python) -- TensorRT not needed, no network needed:

1. ``device``: the GPU (cudaGetDeviceProperties), the CUDA driver and runtime versions and any driver/runtime
   mismatch (scanside.engines.backends.tensorrt_engine.gpu_report), torch and onnxruntime versions where they import.
2. ``cuda_buffers``: the TensorRT engine's own buffer code on the real CUDA runtime -- pinned host buffers
   (cudaMallocHost), device buffers, async copies on the engine's stream, the stream handle TensorRT gets,
   buffer growth, runs from several threads, close (every pointer freed, checked with
   cudaPointerGetAttributes / cudaHostGetFlags).  Only ``tensorrt`` is a stand-in
   (tests/engines/fake_tensorrt.py, built to the real signatures); its "kernel" moves the tensors through
   real device memory and computes with ONNX Runtime, so results are compared with ONNX Runtime FP32.
3. ``tensorrt_tests``: the TensorRT test files (tests/engines/test_tensorrt.py,
   tests/converters/test_tensorrt_build.py) under pytest; where ``tensorrt`` imports, that includes the real
   builds and runs (marked gpu), otherwise those are reported skipped with pytest's reason.

Every check is recorded as passed / failed / skipped with why, and the time it took; the exit status is 1
when a check failed.  --dry-run uses the fake CUDA runtime as well and skips the pytest step (CI runs those
tests itself); it writes only where --out says.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "bench" / "results" / "gpu.json"
TRT_TEST_FILES = ["tests/engines/test_tensorrt.py", "tests/converters/test_tensorrt_build.py"]
FAKE_TRT_VERSION = "10.3.0.26"  # the JetPack 6 TensorRT, the oldest the engine supports


def _missing(modules: List[str]) -> List[str]:
    import importlib.util
    return [m for m in modules if importlib.util.find_spec(m) is None]


def _check(name: str, checks: Dict[str, Any], fn: Callable[[], Dict[str, Any]]) -> None:
    t0 = time.perf_counter()
    try:
        out = fn()
    except _Skip as e:
        out = {"status": "skipped", "why": str(e)}
    except Exception as e:  # a failed check is recorded, the others still run
        out = {"status": "failed", "why": f"{type(e).__name__}: {e}"}
    out.setdefault("status", "passed")
    out["seconds"] = round(time.perf_counter() - t0, 2)
    checks[name] = out
    print(f"{name}: {out['status']}" + (f" ({out['why']})" if out.get("why") else ""), flush=True)


class _Skip(Exception):
    pass


# ---- 1. the device ---------------------------------------------------------------------------------------
def device_info(dry_run: bool) -> Dict[str, Any]:
    from scanside.engines.backends.tensorrt_engine import gpu_report, probe_cuda_device
    info: Dict[str, Any] = {"host": platform.node(), "machine": platform.machine(), "python": platform.python_version()}
    if dry_run:
        info["gpu"] = "none (dry run: fake CUDA runtime and fake tensorrt)"
        return info
    info.update(gpu_report())
    dev, why = probe_cuda_device(0)
    if dev is not None:
        info["gpu"] = {"name": dev.name, "compute_capability": dev.cc, "memory_bytes": dev.total_memory_bytes,
                       "integrated": dev.integrated}
    else:
        info["gpu"] = f"none: {why}"
    try:
        import torch
        info["torch"] = f"{torch.__version__} (cuda {torch.version.cuda}, available {torch.cuda.is_available()})"
    except Exception as e:
        info["torch"] = f"not importable ({type(e).__name__})"
    try:
        import onnxruntime
        info["onnxruntime"] = onnxruntime.__version__
    except Exception as e:
        info["onnxruntime"] = f"not importable ({type(e).__name__})"
    return info


# ---- 2. the engine's CUDA buffer path --------------------------------------------------------------------
def _freed_on_real_cuda(cudart: Any, device_ptrs: List[int], host_ptrs: List[int]) -> Dict[str, Any]:
    """After close: a freed device pointer is no longer a device allocation, a freed pinned pointer no longer
    has host flags.  cudaErrorInvalidValue from either call also means freed."""
    still: List[str] = []
    for p in device_ptrs:
        err, attrs = cudart.cudaPointerGetAttributes(p)
        if err == cudart.cudaError_t.cudaSuccess and attrs.type == cudart.cudaMemoryType.cudaMemoryTypeDevice:
            still.append(f"device {p:#x}")
    for p in host_ptrs:
        err, _flags = cudart.cudaHostGetFlags(p)
        if err == cudart.cudaError_t.cudaSuccess:
            still.append(f"pinned {p:#x}")
    cudart.cudaGetLastError()  # the probes above may leave a sticky-free error code behind
    if still:
        raise AssertionError(f"not freed after close: {still}")
    return {"device_buffers_freed": len(device_ptrs), "pinned_buffers_freed": len(host_ptrs)}


def cuda_buffers(dry_run: bool, work: Path) -> Dict[str, Any]:
    missing = _missing(["onnx", "onnxruntime", "pydantic", "numpy"] + ([] if dry_run else ["cuda"]))
    if missing:
        raise _Skip(f"not importable here: {', '.join(missing)}")
    import numpy as np

    from scanside.converters.tensorrt_build import BuildOptions, build_plan
    from scanside.engines.manifest import ModelManifest
    from scanside.engines.backends.onnxruntime_engine import OnnxRuntimeEngine
    from scanside.engines.backends.tensorrt_engine import TensorRTEngine, _import_cudart, probe_cuda_device
    from tests.engines._tiny import install_tiny, sample_input
    from tests.engines.fake_tensorrt import FakeGPU, FakeGPUEnv

    gpu = FakeGPU()
    if not dry_run:
        dev, why = probe_cuda_device(0)
        if dev is None:
            raise _Skip(f"no CUDA device: {why}")
        gpu = FakeGPU(name=dev.name, cc=dev.compute_capability, memory=dev.total_memory_bytes, integrated=dev.integrated)
    details: Dict[str, Any] = {"tensorrt": f"fake {FAKE_TRT_VERSION} (tests/engines/fake_tensorrt.py)",
                               "cuda": "fake runtime" if dry_run else "real cuda bindings"}
    with FakeGPUEnv(FAKE_TRT_VERSION, gpu, fake_cuda=dry_run) as env:
        cudart = _import_cudart()
        m = install_tiny(work / "models")
        updated, _ = build_plan(m, BuildOptions(precision="fp32", opt={"N": 2}, max={"N": 8}))
        m = ModelManifest.load(updated.root)
        with OnnxRuntimeEngine(providers=["CPUExecutionProvider"]).load(m) as ort:
            want = {b: ort.run({"x": sample_input(b, seed=b)})["logits"] for b in (1, 2, 3, 8)}
        eng = TensorRTEngine().load(m)
        try:
            eng.warmup()
            sizes = []
            worst = 0.0
            for b in (1, 3, 8, 2):  # 3 and 8 grow the buffers, 2 reuses them
                got = eng.run({"x": sample_input(b, seed=b)})["logits"]
                worst = max(worst, float(np.max(np.abs(got - want[b]))))
                sizes.append({name: t.nbytes for name, t in eng._io.items()})
            if worst > 1e-5:
                raise AssertionError(f"TensorRT engine output differs from ONNX Runtime by {worst}")
            if not sizes[1]["x"] > sizes[0]["x"] or sizes[3] != sizes[2]:
                raise AssertionError(f"buffers did not grow / were not reused: {sizes}")
            errors: List[str] = []

            def worker(b: int) -> None:
                for _ in range(10):
                    got = eng.run({"x": sample_input(b, seed=b)})["logits"]
                    if not np.allclose(got, want[b], rtol=1e-5, atol=1e-6):
                        errors.append(f"batch {b}")
            threads = [threading.Thread(target=worker, args=(b,)) for b in (1, 2, 3, 8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise AssertionError(f"concurrent runs gave wrong results: {errors[:4]}")
            stream_handle = int(eng._stream)
            device_ptrs = [t.device_ptr for t in eng._io.values() if t.nbytes]
            host_ptrs = [t.host_ptr for t in eng._io.values() if t.nbytes]
            details.update({"max_abs_diff_vs_onnxruntime": worst, "buffer_bytes": sizes[-1],
                            "stream_handle_nonzero": stream_handle != 0, "concurrent_runs": 40,
                            "engine": eng.describe().device})
        finally:
            eng.close()
        if dry_run:
            leaks = env.leaks()
            if any(leaks.values()):
                raise AssertionError(f"not freed after close: {leaks}")
            details["freed"] = "all (fake runtime's allocation table empty)"
        else:
            details["freed"] = _freed_on_real_cuda(cudart, device_ptrs, host_ptrs)
    return details


# ---- 3. the TensorRT tests -----------------------------------------------------------------------------------
def _trt_import_reason() -> Optional[str]:
    """None when ``import tensorrt`` works (asked in a child: a failed import must not poison this process)."""
    r = subprocess.run([sys.executable, "-c", "import tensorrt; print(tensorrt.__version__)"], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    if r.returncode == 0:
        return None
    last = (r.stderr.strip().splitlines() or ["?"])[-1]
    return f"tensorrt not importable ({last[:200]})"


def tensorrt_tests(dry_run: bool, timeout_s: int) -> Dict[str, Any]:
    if dry_run:
        raise _Skip("dry run (the suite runs these tests itself)")
    if _missing(["pytest"]):
        raise _Skip("pytest not importable here")
    trt_why = _trt_import_reason()
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *TRT_TEST_FILES]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "why": f"pytest ran past {timeout_s} s", "command": " ".join(cmd[1:])}
    out = r.stdout + r.stderr
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", out.splitlines()[-1]
                                                  if out.strip() else "")}
    skipped = sorted(set(re.findall(r"^SKIPPED \[\d+\] (.+)$", out, flags=re.M)))
    res: Dict[str, Any] = {"command": " ".join(cmd[1:]), "tensorrt": trt_why or "imports: real TensorRT tests ran",
                           "counts": counts, "skipped_reasons": skipped[:20]}
    if r.returncode != 0:
        res.update(status="failed", why=f"pytest exit {r.returncode}", tail=out[-4000:])
    elif trt_why:
        res["why"] = f"ran without TensorRT: {trt_why}; the real-TensorRT tests were skipped"
    return res


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="fake CUDA and tensorrt; no pytest step; for CI")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"where the record goes (default {DEFAULT_OUT.relative_to(ROOT)}; a dry run writes only here)")
    ap.add_argument("--pytest-timeout", type=int, default=200, help="seconds for the TensorRT tests")
    args = ap.parse_args(argv)
    out = args.out if (args.out is not None or args.dry_run) else DEFAULT_OUT
    t0 = time.perf_counter()
    checks: Dict[str, Any] = {}
    record: Dict[str, Any] = {"created_at": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
                              "command": "python bench/gpu_check.py" + (" --dry-run" if args.dry_run else ""),
                              "dry_run": args.dry_run}
    try:
        record["device"] = device_info(args.dry_run)
    except Exception as e:
        record["device"] = {"error": f"{type(e).__name__}: {e}"}
    with tempfile.TemporaryDirectory(prefix="scanside-gpu-check-") as tmp:
        _check("cuda_buffers", checks, lambda: cuda_buffers(args.dry_run, Path(tmp)))
    _check("tensorrt_tests", checks, lambda: tensorrt_tests(args.dry_run, args.pytest_timeout))
    record["checks"] = checks
    record["seconds"] = round(time.perf_counter() - t0, 1)
    failed = [k for k, v in checks.items() if v["status"] == "failed"]
    record["verdict"] = "failed: " + ", ".join(failed) if failed else "no check failed"
    text = json.dumps(record, indent=2, default=str)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        print(f"wrote {out}")
    else:
        print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
