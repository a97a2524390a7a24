"""The one construction of the agent's model store (daemon / analysis layer): every `[engines]` setting
(INT8 parity gate, parity data, store folders, back-end order, caches) is passed, wherever a store is
needed: the daemon's analyzer, the protocol checker's gland check, the CLI and the evaluations."""
from __future__ import annotations

from typing import Any, Optional, Union

from scanside.agent.runtime.config import AgentConfig, EnginesConfig
from scanside.engines.store import ModelStore


def open_model_store(config: Union[AgentConfig, EnginesConfig, None] = None, **kw: Any) -> ModelStore:
    """A ModelStore with the configuration's [engines] settings (None: the defaults and the environment,
    as the agent would read them without a file). kw: extras for tests and tools (tensorrt_probe, engine_options)."""
    engines: Optional[EnginesConfig] = config.engines if isinstance(config, AgentConfig) else config
    return ModelStore.from_settings(engines if engines is not None else AgentConfig().engines, **kw)


def gland_model_active(config: AgentConfig) -> bool:
    """The agent will segment the gland (scanside.agent.analysis.analysis): [gland] enabled and a gland model in the store."""
    section = config.gland
    if not section.enabled:
        return False
    try:
        from scanside.engines.tasks.gland import resolve_model

        return resolve_model(open_model_store(config), section.model) is not None
    except Exception:  # no store, unreadable manifests: no gland model
        return False
