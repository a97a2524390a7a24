"""A partial benchmark run (--only, --skip-taps, TAPS not imported) keeps the figures it did not re-measure,
with the machine they were measured on, instead of erasing them from bench/results."""
from __future__ import annotations

import pytest


@pytest.fixture
def bench(bench_modules):
    return bench_modules


def _prev(kept_earlier=None):
    prev = {"machine": {"cpu": "last-run"},
            "models": {"sequence-classifier": {"v": 1}, "cspca-reference": {"v": 2}, "prostate-gland-taps": {"v": 3}}}
    if kept_earlier:
        prev["kept_from_previous_run"] = {"models": kept_earlier, "machine": {"cpu": "first-run"}}
    return prev


def test_skip_taps_keeps_the_taps_figures(bench):
    bench_cpu, _ = bench
    res = {"models": {}}
    bench_cpu.keep_previous(res, _prev(), only=[], skip_taps=True)
    assert res["models"] == {"prostate-gland-taps": {"v": 3}}
    assert res["kept_from_previous_run"] == {"models": ["prostate-gland-taps"],
                                             "machines": {"prostate-gland-taps": {"cpu": "last-run"}}}


def test_a_figure_kept_twice_keeps_the_machine_it_was_measured_on(bench):
    bench_cpu, _ = bench
    res = {"models": {}}
    bench_cpu.keep_previous(res, _prev(kept_earlier=["prostate-gland-taps"]), only=[], skip_taps=True)
    assert res["kept_from_previous_run"]["machines"] == {"prostate-gland-taps": {"cpu": "first-run"}}
    # kept with a model measured in the last run: each keeps its own machine
    mixed = {"models": {}}
    bench_cpu.keep_previous(mixed, _prev(kept_earlier=["prostate-gland-taps"]), only=["cspca-reference"], skip_taps=False)
    assert mixed["kept_from_previous_run"]["machines"] == {"prostate-gland-taps": {"cpu": "first-run"},
                                                           "sequence-classifier": {"cpu": "last-run"}}


def test_only_keeps_every_other_model_and_a_full_run_keeps_nothing(bench):
    bench_cpu, _ = bench
    res = {"models": {}}
    bench_cpu.keep_previous(res, _prev(), only=["cspca-reference"], skip_taps=False)
    assert sorted(res["models"]) == ["prostate-gland-taps", "sequence-classifier"]
    full = {"models": {}}
    bench_cpu.keep_previous(full, _prev(), only=[], skip_taps=False)
    assert full == {"models": {}}


def test_roofline_keeps_a_model_it_could_not_measure(bench):
    _, roofline = bench
    res = {"models": {"sequence-classifier": {"v": 10}, "cspca-reference": {"v": 20}}}
    prev = dict(_prev(), peaks={"best_gflops_per_s": 99.0})
    roofline.keep_unmeasured(res, prev)
    assert res["models"]["prostate-gland-taps"] == {"v": 3}
    assert res["models"]["sequence-classifier"] == {"v": 10}
    assert res["kept_from_previous_run"]["runs"] == {
        "prostate-gland-taps": {"machine": {"cpu": "last-run"}, "peaks_best_gflops_per_s": 99.0}}


def test_roofline_leaves_a_model_whose_timings_cpu_json_kept_to_its_earlier_entry(bench):
    """bench_cpu --only cspca-reference keeps the classifier's timings from an older host; the roofline must
    not divide them by this run's peaks, and each kept model keeps the run (machine, peaks) it came from."""
    _, roofline = bench
    cpu = {"kept_from_previous_run": {"models": ["prostate-gland-taps", "sequence-classifier"]}}
    assert roofline.timed_elsewhere(cpu) == {"prostate-gland-taps", "sequence-classifier"}
    assert roofline.timed_elsewhere({}) == set()
    prev = {"machine": {"cpu": "last-run"}, "peaks": {"best_gflops_per_s": 180.0},
            "models": {"sequence-classifier": {"v": 1}, "cspca-reference": {"v": 2}, "prostate-gland-taps": {"v": 3}},
            "kept_from_previous_run": {"models": ["prostate-gland-taps"], "machine": {"cpu": "first-run"},
                                       "peaks_best_gflops_per_s": 170.0}}
    res = {"models": {"cspca-reference": {"v": 20}}}  # only csPCa measured against this run's peaks
    roofline.keep_unmeasured(res, prev)
    assert res["models"] == {"cspca-reference": {"v": 20}, "sequence-classifier": {"v": 1}, "prostate-gland-taps": {"v": 3}}
    runs = res["kept_from_previous_run"]["runs"]
    assert runs["prostate-gland-taps"] == {"machine": {"cpu": "first-run"}, "peaks_best_gflops_per_s": 170.0}
    assert runs["sequence-classifier"] == {"machine": {"cpu": "last-run"}, "peaks_best_gflops_per_s": 180.0}
    again = {"models": {"cspca-reference": {"v": 30}}}  # kept twice: still where each was measured
    roofline.keep_unmeasured(again, dict(res, machine={"cpu": "third-run"}, peaks={"best_gflops_per_s": 400.0}))
    assert again["kept_from_previous_run"]["runs"] == runs
