from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def t2w_exams(tmp_path_factory: pytest.TempPathFactory) -> list:
    """Four simulated exams (siemens, ge, philips, siemens-xa) holding the axial T2W series only."""
    from tests.converters._models import make_t2w_exams

    return make_t2w_exams(tmp_path_factory.mktemp("t2w"), n=4)


@pytest.fixture()
def tiny_model(tmp_path: Path):
    from tests.converters._models import install_tiny_t2w

    return install_tiny_t2w(tmp_path / "models")


@pytest.fixture(scope="session")
def calibrated_tiny(tmp_path_factory: pytest.TempPathFactory, t2w_exams: list):
    """The tiny model calibrated on two exams (both INT8 variants), held-out set from the other two."""
    from scanside.converters.calibrate import calibrate
    from scanside.converters.calibration_data import build_set
    from tests.converters._models import install_tiny_t2w

    m = install_tiny_t2w(tmp_path_factory.mktemp("cal") / "models")
    cset = build_set(m, t2w_exams)
    cal, held = cset.split(2)
    r = calibrate(m, cal, data_description="simulated T2W")
    return r, cal, held
