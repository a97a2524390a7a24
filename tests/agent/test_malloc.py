"""`scanside run` caps glibc's malloc arenas (agent/runtime/malloc.py) unless MALLOC_ARENA_MAX says otherwise."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

CHECK = "from scanside.agent.runtime.malloc import limit_malloc_arenas; print(limit_malloc_arenas())"


def _run(env_extra: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env,
                          check=True).stdout.strip()


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_arena_cap_is_set_on_glibc_and_an_explicit_setting_wins():
    assert _run({}) == "True"
    assert _run({"MALLOC_ARENA_MAX": "4"}) == "False"


def test_run_command_caps_arenas_before_the_agent_starts():
    import inspect

    from scanside.agent import cli

    src = inspect.getsource(cli.cmd_run)
    assert src.index("limit_malloc_arenas()") < src.index("Agent(config)")


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_memory_goes_back_to_the_os():
    """Many small blocks freed inside the heap stay resident until malloc_trim hands them back."""
    code = (
        "import ctypes\n"
        "from scanside.agent.runtime.malloc import release_free_memory\n"
        "def rss():\n"
        "    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1])\n"
        "keep = [bytearray(4000) for _ in range(60000)]\n"  # ~240 MB of small heap blocks
        "for i in range(0, len(keep) - 1):\n"
        "    keep[i] = None\n"  # all freed but the last: the heap top stays in use, no automatic trim
        "before = rss()\n"
        "ok = release_free_memory()\n"
        "print(ok, before - rss())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "True" and int(out[1]) > 100_000, out  # > 100 MB given back
