"""The one construction of the agent's model store (daemon / analysis layer): every `[engines]` setting
(INT8 parity gate, parity data, store folders, back-end order, caches) is passed, wherever a store is
needed: the daemon's analyzer, the protocol checker's gland check, the CLI and the evaluations."""
from __future__ import annotations

from typing import Any, Optional, Union

from scanside.agent.service.config import AgentConfig, EnginesConfig
from scanside.engines.store import ModelStore


def open_model_store(config: Union[AgentConfig, EnginesConfig, None] = None, **kw: Any) -> ModelStore:
    """A ModelStore with the configuration's [engines] settings (None: the defaults and the environment,
    as the agent would read them without a file). kw: extras for tests and tools (tensorrt_probe, engine_options)."""
    engines: Optional[EnginesConfig] = config.engines if isinstance(config, AgentConfig) else config
    return ModelStore.from_settings(engines if engines is not None else AgentConfig().engines, **kw)
