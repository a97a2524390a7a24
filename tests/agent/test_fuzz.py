"""Bad input at scale: mutated DICOM through read_header, load_volume and the pipeline's quarantine.

Properties (each input under a watchdog: a hang is a failure; peak Python/numpy memory traced):
* read_header returns an InstanceHeader or raises HeaderError, never anything else;
* load_volume on what read_header accepted returns a Volume or raises VolumeError;
* Pipeline.process_file never raises, and every file it refuses ends `quarantined` with a reason file.

Profiles: `ci` (deterministic, a few hundred inputs, part of `make test`) and `soak`
(SCANSIDE_FUZZ_PROFILE=soak, `make soak`). SCANSIDE_FUZZ_OUT=<file.json> writes the outcome counts
(bench/fuzz_report.py collects them into bench/results/fuzz.json).
"""
from __future__ import annotations

import functools
import io
import itertools
import json
import os
import signal
import struct
import tempfile
import time
import tracemalloc
import zlib
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from scanside.agent.dicom import header as header_mod
from scanside.agent.runtime.config import load_config
from scanside.agent.dicom.header import FrameRef, HeaderError, InstanceHeader, read_header
from scanside.agent.intake.pipeline import Pipeline, file_ref
from scanside.agent.state.database import StateStore
from scanside.agent.dicom.volume import Volume, VolumeError, load_volume
from tests.agent.factory import mr_dataset, write

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns on every bad value it meets

CAP = 4 * 1024**2  # per-file pixel cap used here (the default is 512 MiB): bombs and huge headers stay cheap
SLACK = 1024**2  # HEADER_SLACK_BYTES while these tests run
MEMORY_BOUND = 64 * 1024**2  # traced peak per input: a few times (CAP + SLACK), nowhere near a huge header's claim
WATCHDOG_S = 10.0  # one input, parse + decode: a hang is a failure
PARSE_DEADLINE_S = 3.0  # read_header's own parse deadline while these tests run (default 10 s)

settings.register_profile("ci", derandomize=True, max_examples=300, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("soak", derandomize=False, max_examples=4000, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = os.environ.get("SCANSIDE_FUZZ_PROFILE", "ci")
FUZZ = settings(settings.get_profile(PROFILE))

OUTCOMES: dict[str, Counter] = {"read_header": Counter(), "load_volume": Counter(), "pipeline": Counter()}


# ---------------------------------------------------------------------------- seeds
def _fixed_dataset(**kw):
    """A factory MR dataset with fixed UIDs: seeds must be byte-identical between runs (hypothesis
    replays draws, and a drawn position must mean the same byte)."""
    ds = mr_dataset("1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", **kw)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.3." + str(len(kw))
    return ds


def _factory_bytes(**kw) -> bytes:
    ds = _fixed_dataset(**kw)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@functools.lru_cache(maxsize=None)
def _deflated_bytes(extra_zeros: int = 0) -> bytes:
    """A deflated-explicit file; `extra_zeros` bytes of padding inside the deflate stream make a bomb
    (a few KiB on disk that inflate to whatever is asked)."""
    ds = _fixed_dataset()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    raw = buf.getvalue()
    if not extra_zeros:
        return raw
    body_start = header_mod._meta_group_end(raw)
    body = zlib.decompress(raw[body_start:], -zlib.MAX_WBITS)
    # a private OB element before Pixel Data would need sorting; pad *after* it (trailing bytes pydicom ignores
    # only if it is a valid element): a (0xFFFC,0xFFFC) Data Set Trailing Padding OB element at the very end
    pad = struct.pack("<HH2sHI", 0xFFFC, 0xFFFC, b"OB", 0, extra_zeros) + b"\0" * extra_zeros
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return raw[:body_start] + comp.compress(body + pad) + comp.flush()


def _element_flood(raw: bytes, n: int, deflate: bool = False) -> bytes:
    """n zero bytes before Pixel Data: n/8 empty (0000,0000) elements for the parser to walk."""
    body_start = header_mod._meta_group_end(raw)
    body = zlib.decompress(raw[body_start:], -zlib.MAX_WBITS) if deflate else raw[body_start:]
    i = body.find(header_mod.PIXEL_DATA_TAG)
    body = body[:i] + b"\0" * n + body[i:]
    if deflate:
        comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        body = comp.compress(body) + comp.flush()
    return raw[:body_start] + body


def _testdata(name: str) -> bytes | None:
    try:
        return Path(get_testdata_file(name)).read_bytes()
    except Exception:  # not shipped with this pydicom
        return None


def _simulated_seeds() -> list[bytes]:
    """Small vendor files from the exam simulator (16x16, 4 slices, 2 b-values): a Siemens mosaic with
    its CSA header, GE classic with private b-value tags, Philips and Siemens XA enhanced multi-frame."""
    import numpy as np

    from scanside.simulator.phantom import make_phantom
    from scanside.simulator.protocols import build_exam
    from scanside.simulator.render import render_series
    from scanside.simulator.vendors import get_writer
    from scanside.simulator.vendors.common import make_study_context

    phantom = make_phantom(1, n_lesions=0)
    seeds = []
    with tempfile.TemporaryDirectory() as d:
        for k, (vendor, enhanced, mosaic) in enumerate([("siemens", False, True), ("ge", False, False),
                                                        ("philips", True, False), ("siemens-xa", True, False)]):
            spec = next(s for s in build_exam("prostate-bpmri", vendor, 3.0, ()).series if s.kind == "dwi")
            spec = spec.model_copy(update={"matrix": (16, 16), "n_slices": 4, "b_values": spec.b_values[:2]})
            rendered = render_series(phantom, spec, 3.0, np.random.default_rng(k))
            files = get_writer(vendor).write_series(rendered, make_study_context(vendor, 1), Path(d) / vendor,
                                                    series_number=5, series_uid=f"1.2.826.0.1.3680043.8.498.77.{k}",
                                                    enhanced=enhanced, mosaic=mosaic)
            seeds.append(Path(files[0].path).read_bytes())
    return seeds


SEEDS: list[bytes] = [s for s in (
    _factory_bytes(),
    _factory_bytes(rows=16, cols=16, NumberOfFrames=1),
    _deflated_bytes(),
    *(_testdata(n) for n in ("MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm",
                             "image_dfl.dcm", "no_meta.dcm", "CT_small.dcm", "MR_small_jpeg_ls_lossless.dcm",
                             "emri_small.dcm", "badVR.dcm")),
    *_simulated_seeds(),
) if s]

TRANSFER_SYNTAXES = [b"1.2.840.10008.1.2", b"1.2.840.10008.1.2.1", b"1.2.840.10008.1.2.2", b"1.2.840.10008.1.2.1.99",
                     b"1.2.840.10008.1.2.4.50", b"1.2.840.10008.1.2.5", b"1.2.840.10008.1.2.4.90",
                     b"1.2.840.10008.5.1.4.1.1.4", b"1.2.3.4", b"", b"\xff\xfe garbage"]
VRS = [b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"OB", b"OD", b"OF", b"OW",
       b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"TM", b"UI", b"UL", b"UN", b"US", b"UT", b"zz", b"\0\0", b"I\x1a"]
KNOWN_TAGS = [(0x0028, 0x0010), (0x0028, 0x0011), (0x0028, 0x0100), (0x0028, 0x0002), (0x0028, 0x0008),
              (0x0020, 0x0032), (0x0020, 0x0037), (0x0028, 0x0030), (0x0008, 0x0008), (0x0020, 0x000E),
              (0x0020, 0x000D), (0x0008, 0x0018), (0x7FE0, 0x0010), (0x0008, 0x0016), (0x0018, 0x0050)]


# ---------------------------------------------------------------------------- mutations
def _set_meta_ts(raw: bytes, uid: bytes) -> bytes:
    """Replace (0002,0010) in the meta group, fixing its length and the group length."""
    i = raw.find(b"\x02\x00\x10\x00UI", 128)
    if i < 0:
        return raw
    old_len = struct.unpack("<H", raw[i + 6:i + 8])[0]
    value = uid + (b"\0" if len(uid) % 2 else b"")
    out = raw[:i + 6] + struct.pack("<H", len(value)) + value + raw[i + 8 + old_len:]
    g = out.find(b"\x02\x00\x00\x00UL\x04\x00", 128)
    if g >= 0:
        glen = struct.unpack("<I", out[g + 8:g + 12])[0] + len(value) - old_len
        out = out[:g + 8] + struct.pack("<I", glen & 0xFFFFFFFF) + out[g + 12:]
    return out


def _with_vr(raw: bytes, tag: tuple[int, int], vr: bytes) -> bytes:
    i = raw.find(struct.pack("<HH", *tag), 132)
    return raw[:i + 4] + vr + raw[i + 6:] if i >= 0 else raw


def _structured(raw: bytes, field: str, value) -> bytes:
    """Rewrite one header value through pydicom (huge Rows/Columns/NumberOfFrames, odd values)."""
    try:
        ds = pydicom.dcmread(io.BytesIO(raw), force=True)
        setattr(ds, field, value)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=False)
        return buf.getvalue()
    except Exception:
        return raw


@st.composite
def mutated(draw) -> bytes:
    raw = draw(st.sampled_from(SEEDS))
    if draw(st.booleans()):  # a structured mutation first
        kind = draw(st.sampled_from(["dims", "ts", "bomb", "preamble_garbage", "vr"]))
        if kind == "dims":
            field = draw(st.sampled_from(["Rows", "Columns", "NumberOfFrames", "BitsAllocated", "SamplesPerPixel"]))
            value = draw(st.sampled_from([0, 1, 2, 255, 4096, 65535, 10**6, 2**31 - 1, 10**9]))
            if field in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel"):
                value = min(value, 65535)
            raw = _structured(raw, field, value)
        elif kind == "ts":
            raw = _set_meta_ts(raw, draw(st.sampled_from(TRANSFER_SYNTAXES)))
        elif kind == "bomb":
            raw = _deflated_bytes(draw(st.sampled_from([CAP // 2, CAP + SLACK + 1, 4 * (CAP + SLACK), 64 * 1024**2])))
        elif kind == "preamble_garbage":
            n = draw(st.integers(1, 64))
            raw = raw[:132] + draw(st.binary(min_size=n, max_size=n)) + raw[132 + n:]
        else:  # wrong VR on a known tag (explicit VR files)
            raw = _with_vr(raw, draw(st.sampled_from(KNOWN_TAGS)), draw(st.sampled_from(VRS)))
    for _ in range(draw(st.integers(0, 4))):  # then byte-level damage anywhere
        n = len(raw)
        if n == 0:
            break
        pos = draw(st.integers(0, n - 1))
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "length_ff", "length_huge"]))
        if op == "flip":
            raw = raw[:pos] + bytes([raw[pos] ^ draw(st.integers(1, 255))]) + raw[pos + 1:]
        elif op == "truncate":
            raw = raw[:pos]
        elif op == "insert":
            raw = raw[:pos] + draw(st.binary(min_size=1, max_size=32)) + raw[pos:]
        elif op == "delete":
            raw = raw[:pos] + raw[pos + draw(st.integers(1, 64)):]
        else:  # bad lengths: 0xFFFFFFFF on a non-SQ element, or a length far past the end
            value = 0xFFFFFFFF if op == "length_ff" else draw(st.sampled_from([0x7FFFFFFF, 0x10000000, n * 2 + 1]))
            raw = raw[:pos] + struct.pack("<I", value) + raw[pos + 4:]
    return raw


# ---------------------------------------------------------------------------- harness
class Hang(BaseException):  # not an Exception: the code under test must not be able to swallow it
    pass


def _alarm(signum, frame):
    raise Hang(f"one input took more than {WATCHDOG_S} s")


def guarded(fn, *args, **kw):
    """Run fn under a SIGALRM watchdog and tracemalloc; returns (result or exception, peak bytes)."""
    old = signal.signal(signal.SIGALRM, _alarm)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, WATCHDOG_S)  # pytest-timeout's alarm, if armed: re-armed below
    t0 = time.monotonic()
    tracemalloc.start()
    try:
        try:
            result = fn(*args, **kw)
        except Exception as exc:  # noqa: BLE001 - classified by the caller
            result = exc
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - t0), 0.001))
    return result, peak


_names = itertools.count()


@pytest.fixture(scope="module", autouse=True)
def _small_slack():
    saved = header_mod.HEADER_SLACK_BYTES, header_mod.PARSE_DEADLINE_S
    header_mod.HEADER_SLACK_BYTES, header_mod.PARSE_DEADLINE_S = SLACK, PARSE_DEADLINE_S
    yield
    header_mod.HEADER_SLACK_BYTES, header_mod.PARSE_DEADLINE_S = saved
    out = os.environ.get("SCANSIDE_FUZZ_OUT")
    if out:
        Path(out).write_text(json.dumps({k: dict(sorted(v.items())) for k, v in OUTCOMES.items()}, indent=2))


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="scanside-fuzz-") as d:
        yield Path(d)


def _write(workdir: Path, raw: bytes) -> Path:
    p = workdir / "in" / f"f{next(_names):06d}.dcm"
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(raw)
    return p


# ---------------------------------------------------------------------------- properties
@FUZZ
@given(raw=mutated())
@example(raw=_set_meta_ts(SEEDS[0], b"1.2.840.10008.5.1.4.1.1.4"))  # regression: a SOP class UID as transfer syntax
@example(raw=_set_meta_ts(SEEDS[0], b"1.2.3.4"))  # a private UID as transfer syntax
@example(raw=_with_vr(SEEDS[0], (0x0008, 0x0016), b"I\x1a"))  # regression: unknown VR raised NotImplementedError
@example(raw=_element_flood(_deflated_bytes(), 2 * 1024**2, deflate=True))  # regression: parsed for > 10 s
@example(raw=_with_vr(SEEDS[0], (0x0028, 0x0100), b"SL"))  # regression: BitsAllocated as SL escaped load_volume
@example(raw=SEEDS[0] + b"\0" * 2 * 1024**2)  # regression: a flood after Pixel Data hung load_volume
@example(raw=_deflated_bytes(64 * 1024**2))  # deflate bomb: 64 MiB of zeros in a few KiB
@example(raw=_structured(SEEDS[0], "NumberOfFrames", 10**9))  # a billion frames declared
@example(raw=_structured(SEEDS[0], "Rows", 65535))
def test_read_header_and_volume_fail_only_with_their_errors(raw: bytes, workdir: Path) -> None:
    path = _write(workdir, raw)
    try:
        result, peak = guarded(read_header, path, CAP)
        assert peak < MEMORY_BOUND, f"read_header traced {peak} bytes"
        if isinstance(result, HeaderError):
            assert result.reason and isinstance(result.detail, str)
            OUTCOMES["read_header"][f"header_error:{result.reason}"] += 1
            return
        assert isinstance(result, InstanceHeader), f"read_header raised {result!r}"
        assert result.pixel_bytes <= CAP
        OUTCOMES["read_header"]["accepted"] += 1
        refs = [FrameRef(path=str(path), frame_index=f.frame_index) for f in result.frames[:1]]
        vol, peak = guarded(load_volume, refs, None, CAP)
        assert peak < MEMORY_BOUND, f"load_volume traced {peak} bytes"
        if isinstance(vol, VolumeError):
            OUTCOMES["load_volume"][f"volume_error:{vol.reason}"] += 1
        else:
            assert isinstance(vol, Volume), f"load_volume raised {vol!r}"
            OUTCOMES["load_volume"]["volume"] += 1
    finally:
        path.unlink()


@pytest.fixture(scope="module")
def pipeline(workdir: Path):
    config = load_config(**{"state.dir": str(workdir / "state"), "ingest.max_image_bytes": CAP,
                            "ingest.max_series_bytes": 64 * CAP})
    store = StateStore(config.db_path)
    yield Pipeline(config, store)
    store.close()


@FUZZ
@given(raw=mutated())
@example(raw=_with_vr(SEEDS[0], (0x0008, 0x0016), b"I\x1a"))
def test_pipeline_quarantines_every_bad_file_with_its_reason(raw: bytes, workdir: Path, pipeline: Pipeline) -> None:
    path = _write(workdir, raw)
    outcome, _ = guarded(pipeline.process_file, str(path))
    assert not isinstance(outcome, BaseException), f"process_file raised {outcome!r}"
    if outcome.status == "error":
        done, _ = guarded(pipeline.quarantine, str(path), outcome.error)
        assert done is None, f"quarantine raised {done!r}"
        row = pipeline.store.file_status(str(path))
        assert row["status"] == "quarantined" and row["reason"].startswith(outcome.error.reason)
        note = json.loads((pipeline.config.quarantine_path / f"{file_ref(str(path))}.reason.json").read_text())
        assert note["reason"] == outcome.error.reason
        OUTCOMES["pipeline"][f"quarantined:{outcome.error.reason}"] += 1
    else:
        assert outcome.status in {"ingested", "duplicate", "ignored", "index"}, outcome
        OUTCOMES["pipeline"][outcome.status] += 1


# ---------------------------------------------------------------------------- caps, directly
def test_oversized_file_is_refused_before_decoding(tmp_path: Path) -> None:
    p = write(mr_dataset(generate_uid(), generate_uid(), rows=64, cols=64), tmp_path / "big.dcm")  # 8 KiB of pixels
    assert read_header(p, 8192).pixel_bytes == 8192
    with pytest.raises(HeaderError) as err:
        read_header(p, 8191)
    assert err.value.reason == "oversized" and not err.value.retryable
    with pytest.raises(VolumeError) as verr:
        load_volume([FrameRef(path=str(p))], max_bytes=8191)
    assert verr.value.reason == "oversized"
    assert load_volume([FrameRef(path=str(p))], max_bytes=8192).shape == (1, 64, 64)


def test_deflate_bomb_is_oversized_and_an_honest_deflated_file_reads(tmp_path: Path) -> None:
    ok = tmp_path / "ok.dcm"
    ok.write_bytes(_deflated_bytes())
    h = read_header(ok)
    assert h.transfer_syntax_uid == DeflatedExplicitVRLittleEndian and h.rows == 8
    assert load_volume([FrameRef(path=str(ok))]).shape == (1, 8, 8)
    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(_deflated_bytes(64 * 1024**2))
    assert bomb.stat().st_size < 256 * 1024
    t0 = time.perf_counter()
    result, peak = guarded(read_header, bomb, CAP)
    assert isinstance(result, HeaderError) and result.reason == "oversized", result
    assert peak < 8 * 1024**2, peak  # streamed in chunks: never holds the inflated data set
    assert time.perf_counter() - t0 < WATCHDOG_S


def test_series_past_its_cap_quarantines_its_further_files(tmp_path: Path) -> None:
    per_file = 8 * 8 * 2
    config = load_config(**{"state.dir": str(tmp_path / "state"), "ingest.max_series_bytes": 3 * per_file})
    store = StateStore(config.db_path)
    try:
        pipe = Pipeline(config, store)
        series = generate_uid()
        study = generate_uid()
        paths = [write(mr_dataset(series, study, instance=i + 1, position=(0, 0, 3.0 * i)), tmp_path / f"{i}.dcm")
                 for i in range(5)]
        other = write(mr_dataset(generate_uid(), study), tmp_path / "other.dcm")
        outcomes = [pipe.process_file(str(p)) for p in paths]
        assert [o.status for o in outcomes] == ["ingested"] * 3 + ["error"] * 2
        assert {o.error.reason for o in outcomes[3:]} == {"series_oversized"}
        for p, o in zip(paths[3:], outcomes[3:]):
            pipe.quarantine(str(p), o.error)
            assert store.file_status(str(p))["status"] == "quarantined"
        assert pipe.process_file(str(other)).status == "ingested"  # the cap is per series
        # a restarted agent counts the series from the database
        again = Pipeline(config, store)
        late = write(mr_dataset(series, study, instance=9, position=(0, 0, 30.0)), tmp_path / "late.dcm")
        assert again.process_file(str(late)).error.reason == "series_oversized"
        assert len(store.series_headers(series)) == 3
    finally:
        store.close()


def test_a_flood_of_empty_elements_is_refused_within_the_parse_deadline(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(header_mod, "PARSE_DEADLINE_S", 0.2)
    for name, raw in (("plain", _element_flood(SEEDS[0], 8 * 1024**2)),
                      ("deflated", _element_flood(_deflated_bytes(), 8 * 1024**2, deflate=True))):
        p = tmp_path / f"{name}.dcm"
        p.write_bytes(raw)
        t0 = time.perf_counter()
        with pytest.raises(HeaderError) as err:
            read_header(p)
        assert err.value.reason == "too_complex", (name, err.value)
        assert time.perf_counter() - t0 < 5.0
    trailing = tmp_path / "trailing.dcm"  # the header is fine; the flood follows Pixel Data, which only load_volume parses
    trailing.write_bytes(SEEDS[0] + b"\0" * 8 * 1024**2)
    assert read_header(trailing).rows == 8
    with pytest.raises(VolumeError) as verr:
        load_volume([FrameRef(path=str(trailing))])
    assert verr.value.reason == "unreadable_file" and "too_complex" in str(verr.value)


def test_load_volume_turns_a_malformed_value_into_a_volume_error(tmp_path: Path) -> None:
    p = tmp_path / "sl.dcm"
    p.write_bytes(_with_vr(SEEDS[0], (0x0028, 0x0100), b"SL"))  # BitsAllocated as SL: 2 bytes cannot be an SL
    with pytest.raises(HeaderError):
        read_header(p)
    with pytest.raises(VolumeError) as err:  # what load_volume does when handed it anyway
        load_volume([FrameRef(path=str(p))])
    assert err.value.reason == "unreadable_file"
