"""One model store construction (scanside.agent.analysis.model_store.open_model_store / ModelStore.from_settings): every
[engines] setting reaches the store, wherever the agent, its checks or the CLI build one."""
from __future__ import annotations

import argparse
from pathlib import Path

from scanside.agent.runtime.config import load_config
from scanside.agent.analysis.model_store import open_model_store
from scanside.engines.store import store_from_args as cli_store
from scanside.engines.store import PACKAGE_MODELS_DIR


def test_every_engines_setting_reaches_the_store(tmp_path):
    config = load_config(**{"engines.int8_tolerance": 0.07, "engines.parity_data": "any",
                            "engines.models_dirs": [str(tmp_path / "a"), str(tmp_path / "b")],
                            "engines.user_models_dir": str(tmp_path / "user"), "engines.preference": ["onnxruntime"],
                            "engines.cache_dir": str(tmp_path / "cache")})
    store = open_model_store(config)
    assert store.int8_tolerance == 0.07 and store.parity_data == "any"
    assert store.roots == [tmp_path / "a", tmp_path / "b"] and store.user_dir == tmp_path / "user"
    assert store.preference == ["onnxruntime"] and not store.auto_preference
    assert store.engine_options["openvino"]["cache_dir"] == tmp_path / "cache" / "openvino"


def test_defaults_are_the_packages_store_with_the_real_data_gate(monkeypatch):
    for name in ("SCANSIDE_MODELS_DIR", "SCANSIDE_USER_MODELS_DIR", "SCANSIDE_ENGINE_PREFERENCE", "SCANSIDE_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    store = open_model_store()
    assert store.roots == [PACKAGE_MODELS_DIR] and store.int8_tolerance == 0.02 and store.parity_data == "real"
    assert store.auto_preference


def test_the_store_environment_names_are_read_by_the_configuration(tmp_path, monkeypatch):
    """SCANSIDE_MODELS_DIR and friends still work, as defaults of [engines] (read in scanside.agent.runtime.config), and the
    nested names override them like every other key."""
    monkeypatch.setenv("SCANSIDE_MODELS_DIR", f"{tmp_path / 'x'}:{tmp_path / 'y'}")
    monkeypatch.setenv("SCANSIDE_ENGINE_PREFERENCE", "onnxruntime")
    monkeypatch.setenv("SCANSIDE_ENGINES__INT8_TOLERANCE", "0.05")
    config = load_config()
    assert config.engines.models_dirs == [tmp_path / "x", tmp_path / "y"]
    store = open_model_store(config)
    assert store.roots == [tmp_path / "x", tmp_path / "y"] and store.preference == ["onnxruntime"]
    assert store.int8_tolerance == 0.05


def test_the_agent_and_the_cli_use_the_one_construction(tmp_path):
    from scanside.agent.service.daemon import Agent

    config = load_config(**{"watch.folder": str(tmp_path / "export"), "state.dir": str(tmp_path / "state"),
                            "engines.int8_tolerance": 0.11, "api.enabled": False})
    agent = Agent(config)
    try:
        assert agent.analyzer.model_store() is agent.model_store and agent.model_store.int8_tolerance == 0.11
    finally:
        agent.store.close()
    args = argparse.Namespace(store=[str(tmp_path / "s")], user_dir=None, prefer="onnxruntime", parity_data="any")
    store = cli_store(args)
    assert store.roots == [Path(tmp_path / "s")] and store.preference == ["onnxruntime"] and store.parity_data == "any"
    assert store.int8_tolerance == 0.02  # the [engines] default, as in the agent
