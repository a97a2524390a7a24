"""The systemd unit's resource limits match the agent's configured bounds (issue 20): enough descriptors
for every connection the agent admits plus its own, and memory for the largest series it accepts."""
from __future__ import annotations

import re
from pathlib import Path

from scanside.agent.runtime.config import AgentConfig

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "scanside.service"
OWN_FDS = 512  # SQLite (db, WAL, shm), models, inotify, logs, sockets of the sinks, threads' pipes: generous
SIZES = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _setting(name: str) -> str:
    values = re.findall(rf"^{name}=(\S+)\s*$", UNIT.read_text(), re.M)
    assert values, f"{name}= is not set in {UNIT.name}"
    return values[-1]


def _bytes(value: str) -> int:
    return int(value[:-1]) * SIZES[value[-1]] if value[-1] in SIZES else int(value)


def test_descriptors_cover_every_admitted_connection():
    c = AgentConfig()
    need = 3 * c.api.max_connections + c.cstore.max_associations + OWN_FDS  # admitted + one accept batch (api.py)
    assert int(_setting("LimitNOFILE").split(":")[-1]) >= need


def test_memory_covers_the_largest_series_decoded():
    c = AgentConfig()
    series_float32 = 2 * c.ingest.max_series_bytes  # declared 16-bit pixels, decoded to float32
    high, top = _bytes(_setting("MemoryHigh")), _bytes(_setting("MemoryMax"))
    assert series_float32 + 512 * 1024**2 <= high < top  # and the models and the runtime beside it
