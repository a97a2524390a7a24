"""bench/gpu_check.py --dry-run: the GPU check's own code runs in CI (fake CUDA runtime and fake tensorrt), so the
one command a GPU machine gets has already run once."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"


@pytest.fixture()
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_records_what_ran_and_what_was_skipped(gpu_check, tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--dry-run", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["dry_run"] is True and rec["device"]["gpu"].startswith("none (dry run")
    buf = rec["checks"]["cuda_buffers"]
    assert buf["status"] == "passed", buf
    assert buf["max_abs_diff_vs_onnxruntime"] <= 1e-5 and buf["stream_handle_nonzero"] is True
    assert buf["buffer_bytes"]["x"] >= 8 * 256 * 4  # grown to the largest batch run (8)
    assert buf["freed"].startswith("all")
    trt = rec["checks"]["tensorrt_tests"]
    assert trt["status"] == "skipped" and "dry run" in trt["why"]
    assert rec["verdict"] == "no check failed"


def test_a_failed_check_is_recorded_and_fails_the_command(gpu_check, tmp_path: Path, monkeypatch, capsys) -> None:
    from scanside.engines.backends import tensorrt_engine
    monkeypatch.setattr(tensorrt_engine.TensorRTEngine, "_free", lambda self, t: None)  # close() leaks
    assert gpu_check.main(["--dry-run"]) == 1  # no --out: printed, nothing written
    rec = json.loads(capsys.readouterr().out.split("\n", 2)[-1])
    assert rec["checks"]["cuda_buffers"]["status"] == "failed"
    assert "not freed after close" in rec["checks"]["cuda_buffers"]["why"]
    assert rec["verdict"] == "failed: cuda_buffers"


@pytest.mark.skipif(importlib.util.find_spec("cuda") is not None, reason="cuda-python is installed here")
def test_without_cuda_bindings_the_real_check_is_skipped_with_the_reason(gpu_check, tmp_path: Path) -> None:
    with pytest.raises(gpu_check._Skip, match="not importable here: cuda"):
        gpu_check.cuda_buffers(False, tmp_path)
