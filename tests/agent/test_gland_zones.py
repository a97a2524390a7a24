"""Zones and gland coverage in the agent: zone_of on a known zone map, the GLAND_NOT_COVERED deviation
(profile threshold, message, stable key), the slab-end rule when the gland model runs, and the
profile's [coverage] validation."""
from __future__ import annotations

import numpy as np
import pytest

from scanside.agent.analysis.analysis import missed_end
from scanside.agent.schema.events import SeriesSummary, SlabGeometry
from scanside.engines.tasks.gland import GlandResult, coverage, zone_of
from scanside.agent.protocol.profiles import ProfileError, load_profile
from scanside.agent.protocol.checker import ProtocolChecker
from scanside.agent.state.database import StateStore
from scanside.engines.preprocess import Grid


def _zoned_gland() -> GlandResult:
    """A 20 x 40 x 40 grid at 3 x 1 x 1 mm (SPL, origin at LPS (0, 0, 0) for index 0): TZ in front (rows < 20),
    PZ behind (rows >= 20), inside a box of slices 5..14, rows 10..29, cols 10..29."""
    aff = np.zeros((4, 4))
    aff[:3, 0] = [0, 0, 3.0]  # d0 -> S
    aff[:3, 1] = [0, 1.0, 0]  # d1 -> P
    aff[:3, 2] = [1.0, 0, 0]  # d2 -> L
    aff[3, 3] = 1
    grid = Grid(shape=(20, 40, 40), affine=aff)
    zones = np.zeros(grid.shape, dtype=np.uint8)
    zones[5:15, 10:20, 10:30] = 1
    zones[5:15, 20:30, 10:30] = 2
    mask = zones > 0
    centroid = tuple(float(v) for v in grid.index_to_lps(np.argwhere(mask).mean(0)))
    return GlandResult(mask=mask, grid=grid, volume_ml=float(mask.sum()) * 3e-3, centroid_lps=centroid, windows=1,
                       seconds=0.0, model="test", zones=zones)


def test_zone_of_majority_centre_and_nearest() -> None:
    g = _zoned_gland()
    # voxels mostly in the PZ (rows 18..27: 2 rows TZ, 8 rows PZ) -> PZ, whatever the centre says
    pts = g.grid.index_to_lps(np.argwhere(np.ones((1, 10, 3), bool)) + [9, 18, 15])
    assert zone_of(g, pts, centre_lps=g.grid.index_to_lps([9, 12, 15])) == "PZ"
    # no voxels: the zone at the centre
    assert zone_of(g, None, g.grid.index_to_lps([9, 12, 15])) == "TZ"
    assert zone_of(g, [], g.grid.index_to_lps([9, 25, 15])) == "PZ"
    # centre just outside the gland (3 mm behind the PZ) -> the nearest zone within 5 mm; 8 mm -> None
    assert zone_of(g, None, g.grid.index_to_lps([9, 32, 15])) == "PZ"
    assert zone_of(g, None, g.grid.index_to_lps([9, 37, 15])) is None
    # no zone map (TAPS): None
    taps = GlandResult(mask=g.mask, grid=g.grid, volume_ml=g.volume_ml, centroid_lps=g.centroid_lps, windows=1, seconds=0)
    assert zone_of(taps, None, g.centroid_lps) is None
    assert g.zone_volumes_ml() == pytest.approx({"TZ": 10 * 10 * 20 * 3e-3, "PZ": 10 * 10 * 20 * 3e-3})


def _summary(series_id: str, label: str, start: float, end: float, number: int = 5, revision: int = 0) -> SeriesSummary:
    slab = SlabGeometry(normal=(0.0, 0.0, 1.0), center_lps_mm=(20.0, 20.0, (start + end) / 2), start_mm=start,
                        end_mm=end, n_slices=10, spacing_mm=3.0)
    return SeriesSummary(study_uid="1.2.3", series_uid=f"1.2.3.{number}", series_id=series_id, series_number=number,
                         series_description="ep2d_diff", label=label, label_confidence=0.99, plane="axial",
                         n_images=10, n_instances=10, reason="count", complete=True, revision=revision, slab=slab)


def test_gland_not_covered_deviation(tmp_path) -> None:
    g = _zoned_gland()  # gland slices 5..14 -> S from 15 to 42 mm (voxel centres)
    store = StateStore(tmp_path / "state.db")
    checker = ProtocolChecker(load_profile("pirads-2.1-bpmri"), store)
    t2 = _summary("t2", "T2WI_nan", -1.5, 58.5, number=3)
    full = _summary("dwi-a", "DWI_Low", -1.5, 58.5)
    assert coverage(g, full) == 1.0
    assert checker.coverage_deviation("1.2.3", full, t2, 1.0) is None
    # slab from 22.5 mm: slices 5, 6, 7 (15, 18, 21 mm) outside -> 30% missed, at the apex (inferior)
    short = _summary("dwi-b", "DWI_High", 22.5, 58.5, number=6)
    frac = coverage(g, short)
    assert frac == pytest.approx(0.7)
    assert missed_end(g, short) == "apex"
    dev = checker.coverage_deviation("1.2.3", short, t2, frac, missed_end(g, short))
    assert dev is not None and dev.code == "GLAND_NOT_COVERED" and dev.severity == "critical"
    assert dev.measured == "70% of the gland inside the slab" and dev.required == "≥ 95% of the gland"
    assert "misses 30% of the prostate (apex)" in dev.message and "caudally" in dev.message and dev.message.endswith(".")
    assert dev.series_id == "dwi-b" and dev.profile == "pirads-2.1-bpmri"
    # the same (series, T2W) pair -> the same key; another T2W revision -> another key; stored once
    again = checker.coverage_deviation("1.2.3", short, t2, 0.69, "apex")
    assert again.key == dev.key and again.alert_id == dev.alert_id
    t2b = t2.model_copy(update={"revision": 1})
    assert checker.coverage_deviation("1.2.3", short, t2b, frac).key != dev.key
    with store.transaction():
        assert store.append_event(dev) is not None
        assert store.append_event(again) is None
    # base missing: the other direction; a threshold from a site profile; a T2W is not checked
    top = _summary("dwi-c", "ADC", -1.5, 31.5, number=7)
    assert missed_end(g, top) == "base"
    assert "cranially" in checker.coverage_deviation("1.2.3", top, t2, coverage(g, top), "base").message
    assert checker.coverage_deviation("1.2.3", t2, t2, 0.5) is None
    site = tmp_path / "site.toml"
    site.write_text('[coverage]\nmin_fraction = 0.6\n')
    lenient = ProtocolChecker(load_profile("pirads-2.1-bpmri", site), store)
    assert lenient.coverage_deviation("1.2.3", short, t2, frac) is None
    off = tmp_path / "off.toml"
    off.write_text('[coverage]\nenabled = false\n')
    assert ProtocolChecker(load_profile("pirads-2.1-bpmri", off), store).coverage_deviation("1.2.3", short, t2, 0.1) is None


def test_coverage_threshold_is_validated(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[coverage]\nmin_fraction = 1.5\n')
    with pytest.raises(ProfileError, match="coverage.min_fraction"):
        load_profile("pirads-2.1-mpmri", bad)
    typo = tmp_path / "typo.toml"
    typo.write_text('[coverage]\nmin_fractoin = 0.9\n')
    with pytest.raises(ProfileError, match="min_fractoin"):
        load_profile("pirads-2.1-mpmri", typo)
    assert load_profile("pirads-2.1-bpmri").coverage.min_fraction == 0.95


def test_slab_ends_are_left_to_the_gland_check_only_when_it_runs(tmp_path) -> None:
    store = StateStore(tmp_path / "state.db")
    t2 = _summary("t2", "T2WI_nan", -36.0, 36.0, number=3)
    short = _summary("dwi", "DWI_Low", -11.0, 19.0, number=6)  # centre +4 mm (in tolerance), ends 25 / 17 mm off
    profile = load_profile("pirads-2.1-bpmri")
    assert [d.code for d in [ProtocolChecker(profile, store).misaligned("1.2.3", short, t2)] if d] == ["DWI_T2_MISALIGNED"]
    assert ProtocolChecker(profile, store, gland_coverage=True).misaligned("1.2.3", short, t2) is None
    # a centre off by more than the tolerance is still misaligned with the gland model
    off = _summary("dwi2", "DWI_Low", -1.0, 29.0, number=8)
    assert ProtocolChecker(profile, store, gland_coverage=True).misaligned("1.2.3", off, t2).code == "DWI_T2_MISALIGNED"
    always = tmp_path / "always.toml"
    always.write_text('[geometry]\nedge_check = "always"\n')
    strict = ProtocolChecker(load_profile("pirads-2.1-bpmri", always), store, gland_coverage=True)
    assert strict.misaligned("1.2.3", short, t2).code == "DWI_T2_MISALIGNED"


def _analyzer(tmp_path, gland_result):
    """An Analyzer over a state database holding an axial T2W and a two-part DWI series (b50, b800) whose slab
    starts at 22.5 mm (misses 30% of _zoned_gland); its gland model replaced by a fixed result."""
    import threading

    from scanside.agent.analysis.analysis import Analyzer
    from scanside.agent.runtime.config import load_config
    from scanside.agent.schema.events import SeriesCompleted
    from scanside.engines.store import ModelStore

    config = load_config(**{"state.dir": str(tmp_path / "state"), "protocol.profile": "pirads-2.1-bpmri"})
    store = StateStore(tmp_path / "state.db")
    t2 = _summary("t2", "T2WI_nan", -1.5, 58.5, number=3)
    low = _summary("dwi:b50", "DWI_Low", 22.5, 58.5, number=6)
    high = _summary("dwi:b800", "DWI_High", 22.5, 58.5, number=6)
    with store.transaction():
        for s in (t2, low, high):
            store.append_event(SeriesCompleted(key=f"done:{s.series_id}", study_uid=s.study_uid, series=s))
    a = Analyzer(config, store, threading.Condition(), model_store=ModelStore(tmp_path / "empty"))
    a.gland = lambda: object()  # type: ignore[method-assign]
    a.gland_for = lambda t2, volume=None: gland_result  # type: ignore[method-assign]
    return a, store, (t2, low, high)


def test_analyzer_raises_coverage_once_per_acquisition(tmp_path) -> None:
    a, store, (t2, low, high) = _analyzer(tmp_path, _zoned_gland())
    a._coverage(low)
    a._coverage(high)  # the second part of the same acquisition: the same key
    a._coverage(t2)  # the T2W again (e.g. after a restart): re-checks the DWI, adds nothing
    devs = [e for e in store.events_after(0, limit=1000) if e.type == "protocol_deviation"]
    assert [(d.code, d.measured) for d in devs] == [("GLAND_NOT_COVERED", "70% of the gland inside the slab")]
    assert ":t2:t2:r0" in devs[0].key


def test_analyzer_checks_slab_ends_itself_when_no_gland_is_found(tmp_path) -> None:
    g = _zoned_gland()
    empty = GlandResult(mask=np.zeros_like(g.mask), grid=g.grid, volume_ml=0.0, centroid_lps=None, windows=1,
                        seconds=0.0, zones=np.zeros_like(g.zones))
    a, store, (t2, low, high) = _analyzer(tmp_path, empty)
    a._coverage(low)
    a._coverage(high)
    devs = [e for e in store.events_after(0, limit=1000) if e.type == "protocol_deviation"]
    # centre 12 mm off: misaligned whatever the gland -> the pipeline says it, not the analyzer
    assert devs == []
    a2, store2, (t2b, low2, _) = _analyzer(tmp_path / "b", empty)
    short = low2.model_copy(update={"series_id": "dwi2", "series_uid": "1.2.3.9",
                                    "slab": low2.slab.model_copy(update={"start_mm": 12.0, "end_mm": 45.0,
                                                                         "center_lps_mm": (20.0, 20.0, 28.0)})})
    a2._coverage(short)
    a2._coverage(short)
    devs = [e for e in store2.events_after(0, limit=1000) if e.type == "protocol_deviation"]
    assert [d.code for d in devs] == ["DWI_T2_MISALIGNED"] and "slab ends differ" in devs[0].measured
