"""Non-inference work on the critical path, before and after the fast paths, measured back to back.

    .venv/bin/python bench/bench_decode.py [--exams 2] [--repeats 5]

For every series of simulated bp-MRI exams (Siemens mosaic DWI, GE, Philips enhanced multi-frame, Siemens XA):
scanside.agent.dicom.volume.load_volume with pydicom's own pixel decoder and the file parsed from disk ("reference": how it
was) against the current code (native pixels straight from the bytes, the file read once and parsed from
memory), alternating run by run so both see the same machine load; the volumes must be identical.  Then
scanside.engines.preprocess.prepare per shipped model spec (cspca-reference, sequence-classifier).
Writes bench/results/decode.json with the load average."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "decode.json"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--exams", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import scanside.agent.dicom.volume as av
    from scanside.agent.dicom.exam_reader import read_exam
    from scanside.simulator.scanner import simulate_exam

    tmp = Path(tempfile.mkdtemp(prefix="bench_decode_"))
    styles = [("siemens", {"mosaic": True}), ("ge", {}), ("philips", {"enhanced": True}), ("siemens-xa", {})]
    parts: List[Any] = []
    for i in range(args.exams):
        vendor, kw = styles[i % len(styles)]
        d = tmp / f"exam{i}"
        simulate_exam(vendor, d, seed=500 + i, profile="prostate-bpmri", **kw)
        # the daemon's read path (scanside.agent.dicom.exam_reader); every frame of each part is decoded, as before
        parts += [(vendor, s.summary.label, s.part) for s in read_exam(d).series]

    fast_impl, mem = av._native_fast, av._IN_MEMORY_BYTES

    def run(reference: bool, refs: Any) -> Any:
        av._native_fast = (lambda ds: None) if reference else fast_impl
        av._IN_MEMORY_BYTES = -1 if reference else mem
        try:
            t0 = time.perf_counter()
            v = av.load_volume(refs)
            return time.perf_counter() - t0, v
        finally:
            av._native_fast, av._IN_MEMORY_BYTES = fast_impl, mem

    res: Dict[str, Any] = {"command": "python bench/bench_decode.py " + " ".join(sys.argv[1:]),
                           "loadavg_at_start": [round(x, 2) for x in os.getloadavg()], "series": []}
    tot_ref = tot_fast = 0.0
    volumes: Dict[str, Any] = {}
    for vendor, label, part in parts:
        tr, tf = [], []
        try:
            for _ in range(args.repeats):
                a, va = run(True, part.refs)
                b, vb = run(False, part.refs)
                tr.append(a)
                tf.append(b)
        except av.VolumeError as e:
            res["series"].append({"vendor": vendor, "label": label, "skipped": e.reason})
            continue
        same = bool(np.array_equal(va.array, vb.array) and np.array_equal(va.affine, vb.affine))
        mr, mf = statistics.median(tr), statistics.median(tf)
        tot_ref += mr
        tot_fast += mf
        volumes.setdefault(label, vb)
        res["series"].append({"vendor": vendor, "label": label, "files": len({str(r.path) for r in part.refs}),
                              "shape": list(vb.shape), "reference_s": round(mr, 4), "fast_s": round(mf, 4),
                              "speedup": round(mr / mf, 2) if mf > 0 else None, "identical": same})
        print(f"  {vendor:11s} {label:9s} {len(part.refs):4d} frames  {mr:.4f} s -> {mf:.4f} s  identical={same}",
              flush=True)
    res["total"] = {"reference_s": round(tot_ref, 3), "fast_s": round(tot_fast, 3),
                    "speedup": round(tot_ref / tot_fast, 2) if tot_fast else None,
                    "all_identical": all(s.get("identical", True) for s in res["series"])}

    from scanside.engines.preprocess import prepare
    from scanside.engines.store import ModelStore

    prep: Dict[str, Any] = {}
    store = ModelStore(preference=["onnxruntime"])
    for name in ("cspca-reference", "sequence-classifier"):
        if not store.versions(name):
            continue
        spec = store.resolve(name).preprocessing
        if list(spec.channels) == ["series"]:
            vols = {"series": volumes.get("T2WI_nan") or next(iter(volumes.values()))}
        else:
            alias = {"T2W": ("T2WI_nan", "T2WI_fs"), "ADC": ("ADC",), "HBV": ("DWI_High",)}
            vols = {}
            for ch in spec.channels:
                v = next((volumes[k] for k in alias.get(ch, (ch,)) if k in volumes), None)
                if v is not None:
                    vols[ch] = v
            if len(vols) != len(spec.channels):
                continue
        ts = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            prepare(vols, spec)
            ts.append(time.perf_counter() - t0)
        prep[name] = {"median_s": round(statistics.median(ts), 4)}
    res["prepare"] = prep
    res["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({"total": res["total"], "prepare": prep, "loadavg": res["loadavg_at_end"]}, indent=1))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
