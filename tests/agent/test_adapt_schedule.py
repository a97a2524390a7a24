"""[adapt] scheduling (scanside.agent.analysis.adapt_schedule): off by default, runs only when enough new exams are in,
reloads the classifier only on a promotion."""
from __future__ import annotations

import sys

from scanside.agent.analysis.adapt_schedule import AdaptScheduler, adapt_command
from scanside.agent.runtime.config import AgentConfig


def _config(**adapt) -> AgentConfig:
    return AgentConfig.model_validate({"watch": {"folder": "/tmp/x"}, "state": {"dir": "/tmp/st"}, "adapt": adapt})


def test_off_by_default_and_the_command_adapts_from_the_agents_own_state():
    c = _config()
    assert c.adapt.enabled is False
    s = AdaptScheduler(c, lambda: 100, lambda r: None).start()
    assert not s.running
    cmd = adapt_command(_config(user_dir="/models/user"))
    assert cmd[cmd.index("--from-state") + 1] == "/tmp/st" and cmd[cmd.index("--user-dir") + 1] == "/models/user"
    assert "adapt" in cmd and "sequence-classifier" in cmd


def _fake(decision: str) -> list:
    return [sys.executable, "-c", f"import json; print('log line'); print(json.dumps({{'decision': '{decision}'}}))"]


def test_runs_when_enough_new_exams_and_reloads_only_on_promotion():
    exams = [3]
    promoted = []
    s = AdaptScheduler(_config(enabled=True, min_new_exams=5), lambda: exams[0], promoted.append, command=_fake("promoted"))
    assert s.run_if_due() is None  # 3 < 5 new exams
    exams[0] = 6
    assert s.run_if_due()["decision"] == "promoted" and len(promoted) == 1
    assert s.run_if_due() is None  # nothing new since
    kept = AdaptScheduler(_config(enabled=True, min_new_exams=1), lambda: 9, promoted.append, command=_fake("kept_current"))
    assert kept.run_if_due()["decision"] == "kept_current" and len(promoted) == 1


def test_a_failing_run_is_recorded_not_raised():
    s = AdaptScheduler(_config(enabled=True, min_new_exams=1), lambda: 1, lambda r: None,
                       command=[sys.executable, "-c", "import sys; sys.exit('boom')"])
    r = s.run_if_due()
    assert r["decision"] == "error" and "boom" in r["reason"]


def test_the_child_sees_the_configured_model_store(tmp_path):
    from scanside.agent.analysis.adapt_schedule import child_environment

    c = AgentConfig.model_validate({"watch": {"folder": "/tmp/x"}, "engines": {"models_dirs": [str(tmp_path / "m")]}})
    assert child_environment(c)["SCANSIDE_MODELS_DIR"] == str(tmp_path / "m")
