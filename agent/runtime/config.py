"""Agent configuration: one TOML file validated by pydantic, overridden by SCANSIDE_* environment
variables (nested with a double underscore: SCANSIDE_SERIES__QUIET_PERIOD_S=5), overridden in turn by
the command line (load_config's overrides). Unknown keys are refused, in the file and in SCANSIDE_*
names alike (scanside.agent.runtime.siteconfig). `scanside config init` writes a commented example of every key.

An invalid configuration stops the agent with a message naming the field.
"""
from __future__ import annotations

import os
import sys
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WatchConfig(_Section):
    folder: Optional[Path] = Field(None, description="the scanner's DICOM export folder (read only)")
    recursive: bool = True
    polling: bool = Field(False, description="poll instead of inotify: for SMB/NFS mounts, where inotify sees nothing")
    poll_interval_s: float = Field(1.0, gt=0)
    settle_s: float = Field(0.5, ge=0, description="a file whose size and mtime stay unchanged this long is taken as written (used when no close/rename event arrives)")
    ignore_suffixes: list[str] = Field(default_factory=lambda: [".tmp", ".part", ".partial", ".swp", "~", ".lock", ".json", ".txt"])


class IngestConfig(_Section):
    retry_delays_s: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0], description="waits between attempts at a file that is not readable yet")
    quarantine_after_s: float = Field(10.0, ge=0, description="a file still unreadable after this long unchanged is quarantined")
    quarantine_dir: Optional[Path] = Field(None, description="default: <state dir>/quarantine")
    quarantine_mode: Literal["copy", "move"] = Field("copy", description="copy leaves the export folder untouched (it may be read-only)")
    stall_after_s: float = Field(60.0, gt=0, description="the ingest loop counts as stalled (unhealthy: no systemd watchdog pings) when it has not come round for this long")
    max_image_bytes: int = Field(512 * 1024**2, gt=0, description="a file whose declared pixels (Rows x Columns x Frames x bytes per sample), or whose inflated deflate stream, exceed this is quarantined as oversized")
    max_series_bytes: int = Field(2 * 1024**3, gt=0, description="declared pixel bytes one series may hold; files past it are quarantined as series_oversized (the series keeps what it has)")
    quarantine_max_copy_bytes: int = Field(600 * 1024**2, ge=0, description="a quarantined file larger than this (or sparse, or not a regular file) gets its reason file only, no copy: the quarantine folder shares its disk with the state database")
    resource_retry_max_s: float = Field(3600.0, gt=0, description="a file the agent could not open for lack of its own descriptors or memory is retried (never quarantined) for this long, then set aside until the next start")
    batch_max_files: int = Field(64, ge=1, description="files the ingest worker records in one state transaction (a crash loses no file: those not committed are read again on restart)")
    batch_max_ms: float = Field(50.0, gt=0, description="a batch commits after this long even when more files are due (the API and outputs wait for the database meanwhile)")


class SeriesConfig(_Section):
    quiet_period_s: float = Field(10.0, gt=0, description="a series with no expected count completes this long after its last image")
    incomplete_grace_s: float = Field(60.0, gt=0, description="a series short of its expected count is closed as incomplete after this long")


class StateConfig(_Section):
    dir: Path = Field(Path("var/scanside"), description="SQLite database, quarantine and outputs (systemd: StateDirectory)")
    open_check_s: float = Field(2.0, ge=0, description="seconds opening the database may spend checking its pages; "
                                                        "past them the check finishes beside the running agent")


class OutputConfig(_Section):
    stdout: bool = Field(True, description="one JSON line per event on standard output")
    jsonl: Optional[Path] = Field(None, description="append-only event log; default <state dir>/events.jsonl")


class PrivacyConfig(_Section):
    include_file_paths: bool = Field(False, description="put file paths in events and logs (export folder names can hold patient names)")


class CStoreConfig(_Section):
    enabled: bool = Field(False, description="run a DICOM C-STORE receiver (SCP) that feeds the same ingest path as the folder watcher")
    ae_title: str = Field("SCANSIDE", min_length=1, max_length=16, pattern=r"^[ -~]*[!-~][ -~]*$", description="this receiver's AE title; associations called to another title are rejected")
    host: str = Field("127.0.0.1", description="address to listen on: set the interface the scanner reaches (0.0.0.0 for all); any address but loopback needs allowed_calling_aes")
    port: int = Field(11112, ge=0, le=65535, description="TCP port (ports below 1024 need CAP_NET_BIND_SERVICE, which the systemd unit does not grant)")
    allowed_calling_aes: list[str] = Field(default_factory=list, description="calling AE titles accepted (the scanner's); required when host is not loopback, unless accept_any_calling_ae")
    accept_any_calling_ae: bool = Field(False, description="accept any calling AE title on a non-loopback address (not advised: anyone on the network can store)")
    folder: Optional[Path] = Field(None, description="where received objects are written (temp file, then rename); default <state dir>/received")
    max_pdu: int = Field(256 * 1024, ge=0, description="maximum PDU size received, bytes (0 = unlimited: one PDU may then take any amount of memory)")
    max_object_bytes: int = Field(600 * 1024**2, gt=0, description="largest object accepted; objects are spooled to disk as they arrive (never held in memory) and a larger one is refused (0xC211) and not kept")
    max_associations: int = Field(4, ge=1, description="concurrent associations")
    network_timeout_s: float = Field(60.0, gt=0)
    fsync: bool = Field(True, description="flush each object to disk before confirming it to the sender")

    @model_validator(mode="after")
    def _callers_when_exposed(self) -> "CStoreConfig":
        from scanside.agent.runtime.auth import is_loopback

        if self.enabled and not is_loopback(self.host) and not self.allowed_calling_aes and not self.accept_any_calling_ae:
            raise ValueError(f"cstore.allowed_calling_aes is required when cstore.host is not a loopback address "
                             f"(host {self.host!r}); or set cstore.accept_any_calling_ae = true")
        return self


class ApiConfig(_Section):
    enabled: Optional[bool] = Field(None, description="serve the HTTP API, /metrics and the technologist console; unset: on for `scanside run` and `scanside demo`, off for an Agent embedded in another program")
    host: str = Field("127.0.0.1", description="address to listen on; any address that is not loopback requires a token")
    port: int = Field(8686, ge=0, le=65535, description="TCP port (0: any free port)")
    token: Optional[SecretStr] = Field(None, description="bearer token (Authorization: Bearer ...); required when host is not a loopback address")
    token_file: Optional[Path] = Field(None, description="read the token from this file instead (systemd LoadCredential=)")
    sse_heartbeat_s: float = Field(15.0, gt=0, description="comment line sent on an idle /v1/events stream so proxies keep it open")
    # issue 20: bounds on what a client can hold (see agent/service/apiguard.py); systemd LimitNOFILE leaves room for them
    max_connections: int = Field(64, ge=1, description="open API connections (console streams included); one more is closed at once")
    header_timeout_s: float = Field(10.0, gt=0, description="a connection that has not sent a complete request head in this long is closed")
    body_timeout_s: float = Field(30.0, gt=0, description="a request body not complete in this long closes the connection")
    max_body_bytes: int = Field(64 * 1024, ge=0, description="largest request body; larger ones get 413 before any byte is read (after the token check)")
    allowed_hosts: list[str] = Field(default_factory=list, description="Host names accepted besides the loopback ones (a name the agent is reached by); with a loopback bind, other Host headers get 421 (DNS rebinding)")
    docs: bool = Field(False, description="serve /docs (Swagger UI, which loads its script from cdn.jsdelivr.net) and /openapi.json, token-checked")

    def token_value(self) -> Optional[str]:
        if self.token is not None:
            return self.token.get_secret_value() or None
        if self.token_file is not None:
            return self.token_file.read_text(encoding="utf-8").strip() or None
        return None

    @model_validator(mode="after")
    def _token_when_exposed(self) -> "ApiConfig":
        from scanside.agent.runtime.auth import check_exposure

        if self.enabled is not False and self.token_file is None:
            check_exposure(self.host, self.token.get_secret_value() if self.token else None)
        return self


class ReadinessConfig(_Section):
    min_free_disk_bytes: int = Field(512 * 1024 * 1024, ge=0, description="/readyz fails when the state folder's file system has less free space than this")


class WebhookConfig(_Section):
    url: Optional[str] = Field(None, pattern=r"^https?://", description="POST each event here as JSON (enabled when set); at least once, Idempotency-Key = event key")
    secret: Optional[SecretStr] = Field(None, description="HMAC-SHA256 signing secret (Standard Webhooks headers); 'whsec_<base64>' or any string")
    event_types: list[str] = Field(default_factory=list, description="send only these event types (empty: all)")
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(10.0, gt=0, description="also bounds writing the body and waiting for the answer")
    total_timeout_s: float = Field(30.0, gt=0, description="one delivery, connect to last response byte, never takes longer (a receiver trickling bytes is cut off)")
    max_response_bytes: int = Field(64 * 1024, ge=0, description="response body read at most (kept for the dead-letter record); the rest is not read")
    backoff_initial_s: float = Field(1.0, gt=0, description="first retry delay; doubles per failed attempt")
    backoff_max_s: float = Field(300.0, gt=0, description="retry delay cap (a receiver's Retry-After is honoured up to this)")
    backoff_jitter: float = Field(0.5, ge=0, le=1, description="each delay is scaled by a random factor in [1 - jitter, 1]")
    max_attempts: int = Field(50, ge=1, description="failed attempts on one event (connection errors, 5xx, 401/403/404/429, ...) before it becomes a dead letter (recorded in the state database, skipped; scanside.agent.outputs.retry); ~4 h with the default delays")


class DicomSendConfig(_Section):
    host: str = Field(..., min_length=1, description="PACS / console C-STORE SCP host")
    port: int = Field(104, ge=1, le=65535)
    called_ae: str = Field("ANY-SCP", min_length=1, max_length=16, description="the receiver's AE title")
    calling_ae: str = Field("SCANSIDE", min_length=1, max_length=16, description="our AE title")
    connect_timeout_s: float = Field(10.0, gt=0, description="TCP connect timeout")
    acse_timeout_s: float = Field(30.0, gt=0, description="association negotiation timeout")
    dimse_timeout_s: float = Field(60.0, gt=0, description="wait for each C-STORE response")
    network_timeout_s: float = Field(60.0, gt=0)
    backoff_initial_s: float = Field(5.0, gt=0)
    backoff_max_s: float = Field(600.0, gt=0)
    max_attempts: int = Field(30, ge=1, description="failed C-STOREs of one exam's objects (no association, timeouts, out of resources) before they become a dead letter (scanside.agent.outputs.retry); ~4 h with the default delays")


class DicomOutputConfig(_Section):
    folder: Optional[Path] = Field(None, description="write a TID 1500 SR and a lesion-likelihood SEG per exam here (enabled when set)")
    send: Optional[DicomSendConfig] = Field(None, description="also C-STORE them to a PACS or console")
    series_number_sr: int = Field(9901, ge=1, description="series number of the SR series")
    series_number_seg: int = Field(9902, ge=1, description="series number of the SEG series")
    manufacturer: str = "scanside"
    institution_name: Optional[str] = None
    write_max_attempts: int = Field(500, ge=1, description="failed writes of one exam's objects to the folder (full, read-only, I/O error; retried every 1 to 10 s, about 80 min in all, /readyz false meanwhile) before they become a dead letter (scanside.agent.outputs.retry)")


class ProtocolConfig(_Section):
    enabled: bool = Field(True, description="check each series against the protocol profile as it completes, and the exam for missing series when it ends")
    profile: str = Field("pirads-2.1-mpmri", min_length=1, description="shipped profile name (pirads-2.1-mpmri, pirads-2.1-bpmri) or path to a profile TOML")
    site_profile: Optional[Path] = Field(None, description="site profile TOML overriding the profile (tables merge key by key)")
    exam_quiet_period_s: float = Field(600.0, gt=0, description="an exam ends this long after its last image (longer than the longest acquisition, during which nothing arrives); or at an explicit 'exam done'")

    @model_validator(mode="after")
    def _profile_loads(self) -> "ProtocolConfig":
        from scanside.agent.protocol.profiles import ProfileError, load_profile

        try:
            load_profile(self.profile, self.site_profile)
        except ProfileError as exc:
            raise ValueError(str(exc)) from exc
        return self


class EnginesConfig(_Section):
    models_dirs: list[Path] = Field(default_factory=list, description="model store folders searched in order (empty: the models shipped in the package); also SCANSIDE_MODELS_DIR (os.pathsep-separated)")
    user_models_dir: Optional[Path] = Field(None, description="bring-your-own models, searched after models_dirs (scanside models add writes there); also SCANSIDE_USER_MODELS_DIR")
    preference: list[Literal["tensorrt", "openvino", "onnxruntime", "triton"]] = Field(default_factory=list, description="back-end order (empty: automatic, scanside.engines.store.default_preference); also SCANSIDE_ENGINE_PREFERENCE (comma-separated)")
    cache_dir: Optional[Path] = Field(None, description="compiled-model caches (OpenVINO, ONNX Runtime's TensorRT); empty: ~/.cache/scanside; also SCANSIDE_CACHE_DIR")
    int8_tolerance: Optional[float] = Field(0.02, ge=0, le=1, description="parity gate: an INT8 model variant or plan is refused unless its manifest's parity report (scanside convert parity) was measured on that file and its loss (1 - Dice against FP32, accuracy or AUROC drop) is at most this; unset disables the gate")
    parity_data: Literal["real", "any"] = Field("real", description="real: an INT8 variant runs only where its parity report was measured on real DICOM (scanside convert calibrate/parity --data on the site's exams), else FP32 runs; any: simulated-only parity is accepted too (the demo and the simulator)")


class GlandConfig(_Section):
    enabled: bool = Field(True, description="segment the prostate gland on each completed axial T2W series: volume, zones of the lesion findings, centroid for the csPCa crop, slab coverage of the DWI/ADC series (GLAND_NOT_COVERED); used only when a gland model is in the store")
    model: str = Field("auto", description="model store name[@version]; auto: prostate-gland-taps (trained on real patients, whole gland, seconds per window on CPU) when imported, else prostate-zones-reference (zones, fast), each only where its real-data figures are recorded and good (scanside.engines.tasks.gland.resolve_model): the zonal model, trained on phantoms, is not; a name is the operator's explicit choice")
    variant: Optional[str] = Field(None, description="model file variant (fp32, int8_u8s8, ...); default: the manifest's default")
    windows: Literal["center", "full"] = Field("center", description="center: one window at the centre of the field of view (~102 x 102 x 96 mm); full: sliding window over the whole series")
    coverage_min: float = Field(0.95, ge=0, le=1, description="coverage_report's threshold; the GLAND_NOT_COVERED deviation uses the protocol profile's [coverage] min_fraction")
    finding_margin_mm: float = Field(5.0, ge=0, le=30, description="a csPCa finding whose centre lies farther than this outside the gland mask is dropped (and counted); the exam probability comes from the findings kept")


class AnalysisConfig(_Section):
    """The image models, run after ingestion in their own thread; each is used only when it is in the model store."""

    image_label: bool = Field(True, description="label every completed series from its pixels with the sequence classifier")
    sequence_model: str = Field("sequence-classifier", description="model store name[@version]")
    mismatch_image_confidence: float = Field(0.8, ge=0, le=1, description="LABEL_MISMATCH needs the image model at least this sure")
    mismatch_header_confidence: float = Field(0.9, ge=0, le=1, description="... and the header rule at least this sure (Philips fat suppression, for one, is not)")
    mismatch_dwi_b_band: tuple[float, float] = Field((300.0, 900.0), description="no LABEL_MISMATCH between low- and high-b DWI when the header's b-values lie in this band (s/mm^2): pixels cannot place a b-value this near the 500 boundary, the header records it; outside the band (b50 that looks like b1400: a mis-decoded b-value) it still alerts")
    triage: bool = Field(True, description="run the csPCa model once axial T2W, ADC and high-b DWI are complete")
    cspca_model: str = Field("cspca-reference", description="model store name[@version]")
    triage_min_b: float = Field(1400.0, ge=0, description="high-b DWI needed to start triage during the exam; at exam end the highest b available is used")
    dce_advised_threshold: Optional[float] = Field(None, ge=0, le=1, description="csPCa probability at or above which DCE is advised; default: the model's decision threshold")

    @model_validator(mode="after")
    def _band_ordered(self) -> "AnalysisConfig":
        lo, hi = self.mismatch_dwi_b_band
        if not 0 <= lo <= hi:
            raise ValueError(f"mismatch_dwi_b_band must be [low, high] with 0 <= low <= high, not {list(self.mismatch_dwi_b_band)}")
        return self


class AdaptConfig(_Section):
    """Scheduled site adaptation of the sequence classifier (scanside.agent.analysis.adapt_schedule; `scanside models adapt`)."""

    enabled: bool = Field(False, description="run `scanside models adapt sequence-classifier --from-state` on a schedule; a new version is promoted only if it beats the current one on this site's held-out exams")
    interval_hours: float = Field(168.0, gt=0, description="time between runs")
    min_new_exams: int = Field(10, ge=1, description="exams seen since the last run needed to run again")
    user_dir: Optional[Path] = Field(None, description="user model store the new version is written to (default $SCANSIDE_USER_MODELS_DIR); the agent must search it")
    threads: int = Field(2, ge=1, description="CPU threads of the fine-tuning process (run at nice 10)")
    timeout_s: float = Field(6 * 3600.0, gt=0, description="a run taking longer is stopped")


class ShadowConfig(_Section):
    """Shadow mode (issue 18): an image model not yet validated on this site's own exams (an operator's
    `scanside models accept`, or a site adaptation's hold-out) has its outputs recorded in events and
    metrics but raises no technologist alert."""

    enabled: bool = Field(True, description="false: the site switches shadow mode off explicitly; every image model alerts")
    validations_file: Optional[Path] = Field(None, description="where site validations are recorded (default: <state.dir>/site_validations.jsonl)")
class FolderRetention(_Section):
    max_age_days: Optional[float] = Field(None, gt=0, description="delete files older than this (unset: no age limit)")
    max_bytes: Optional[int] = Field(None, gt=0, description="delete the oldest files while the folder holds more (unset: no size limit)")


class TableRetention(_Section):
    max_age_days: Optional[float] = Field(None, gt=0, description="delete rows older than this (unset: no age limit)")
    max_rows: Optional[int] = Field(None, gt=0, description="delete the oldest rows while the table holds more (unset: no row limit)")


class RetentionConfig(_Section):
    """Limits on what the agent keeps (scanside.agent.state.retention). Nothing an output has not delivered yet,
    and no image of a series or exam still open, is deleted, whatever the limits."""

    enabled: bool = Field(True, description="run a retention pass periodically")
    interval_s: float = Field(3600.0, gt=0, description="time between passes")
    received: FolderRetention = Field(default_factory=lambda: FolderRetention(max_age_days=30, max_bytes=20 * 1024**3),
                                      description="C-STORE received objects")
    outputs: FolderRetention = Field(default_factory=lambda: FolderRetention(max_age_days=90, max_bytes=5 * 1024**3),
                                     description="SR/SEG written to dicom_output.folder")
    maps: FolderRetention = Field(default_factory=lambda: FolderRetention(max_age_days=30, max_bytes=2 * 1024**3),
                                  description="csPCa likelihood maps (<state dir>/maps)")
    quarantine: FolderRetention = Field(default_factory=lambda: FolderRetention(max_age_days=90, max_bytes=2 * 1024**3),
                                        description="quarantined files and their reasons")
    events: TableRetention = Field(default_factory=lambda: TableRetention(max_age_days=365, max_rows=5_000_000),
                                   description="the event log table (events every output has delivered)")
    files: TableRetention = Field(default_factory=lambda: TableRetention(max_age_days=365, max_rows=5_000_000),
                                  description="the files and instances tables (a file's row goes once the file is gone)")
    exams: TableRetention = Field(default_factory=lambda: TableRetention(max_age_days=None, max_rows=200_000),
                                  description="the exam read model (the exam list, its series, alerts and findings): only exams "
                                              "whose events the log no longer holds, oldest first")

    @model_validator(mode="before")
    @classmethod
    def _partial_tables_keep_defaults(cls, data: Any) -> Any:
        """`[retention.received]` with one key set keeps the other limit's default: the defaults above
        are this section's, not FolderRetention's (whose own are "no limit")."""
        if isinstance(data, dict):
            data = dict(data)
            for name, field in cls.model_fields.items():
                given = data.get(name)
                if isinstance(given, dict) and field.default_factory is not None:
                    data[name] = {**field.default_factory().model_dump(), **given}  # type: ignore[call-arg]
        return data


class AgentConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SCANSIDE_", env_nested_delimiter="__", extra="forbid")

    watch: WatchConfig = Field(default_factory=WatchConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    series: SeriesConfig = Field(default_factory=SeriesConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    protocol: ProtocolConfig = Field(default_factory=ProtocolConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    readiness: ReadinessConfig = Field(default_factory=ReadinessConfig)
    cstore: CStoreConfig = Field(default_factory=CStoreConfig)
    webhook: WebhookConfig = Field(default_factory=WebhookConfig)
    dicom_output: DicomOutputConfig = Field(default_factory=DicomOutputConfig)
    engines: EnginesConfig = Field(default_factory=EnginesConfig)
    gland: GlandConfig = Field(default_factory=GlandConfig)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    adapt: AdaptConfig = Field(default_factory=AdaptConfig)
    shadow: ShadowConfig = Field(default_factory=ShadowConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        # command line (init: load_config's overrides) > environment > the model store's own environment
        # names > file (load_config's TOML) > defaults
        return (init_settings, env_settings, _StoreEnvSource(settings_cls), _FileSource(settings_cls))

    @property
    def db_path(self) -> Path:
        return self.state.dir / "state.sqlite"

    @property
    def quarantine_path(self) -> Path:
        return self.ingest.quarantine_dir or self.state.dir / "quarantine"

    @property
    def cstore_path(self) -> Path:
        return self.cstore.folder or self.state.dir / "received"

    @property
    def jsonl_path(self) -> Path:
        return self.output.jsonl or self.state.dir / "events.jsonl"


class ConfigError(Exception):
    pass


class ToolSettings(BaseSettings):
    """Environment settings of the command-line tools, not of the agent (no file): SCANSIDE_QUIET=1 is
    `scanside --quiet` (no progress meters on stderr)."""

    model_config = SettingsConfigDict(env_prefix="SCANSIDE_", extra="ignore")
    quiet: bool = Field(False, description="no progress meters on stderr")


_FILE_DATA: "ContextVar[dict[str, Any]]" = ContextVar("scanside_config_file", default={})


class _FileSource(PydanticBaseSettingsSource):
    """The TOML file's values, below the environment (load_config sets them for one construction)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return _FILE_DATA.get().get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_FILE_DATA.get())


class _StoreEnvSource(PydanticBaseSettingsSource):
    """The model store's environment names, older than its [engines] keys and still used by the tools
    without a configuration (scanside.engines.store's library defaults): read here for the agent, below the
    SCANSIDE_ENGINES__* names, so that the agent's store settings all come through its configuration."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        env, out = os.environ, {}
        paths = [p for p in env.get("SCANSIDE_MODELS_DIR", "").split(os.pathsep) if p]
        if paths:
            out["models_dirs"] = paths
        for name, key in (("SCANSIDE_USER_MODELS_DIR", "user_models_dir"), ("SCANSIDE_CACHE_DIR", "cache_dir")):
            if env.get(name):
                out[key] = env[name]
        order = [b.strip() for b in env.get("SCANSIDE_ENGINE_PREFERENCE", "").split(",") if b.strip()]
        if order:
            out["preference"] = order
        return {"engines": out} if out else {}


def load_config(path: Optional[os.PathLike[str] | str] = None, **overrides: Any) -> AgentConfig:
    """Load TOML (if given), apply SCANSIDE_* env, then explicit overrides (e.g. from the command line)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fp:
                data = tomllib.load(fp)
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    if not isinstance(data, dict):  # pragma: no cover - tomllib always gives a table
        raise ConfigError(f"config file {path} is not a TOML table")
    from scanside.agent.runtime.siteconfig import suggestion, unknown_env_names

    unknown = unknown_env_names()
    if unknown:
        raise ConfigError("invalid configuration:\n" + "\n".join(
            f"  environment {name}: no such configuration key{suggestion(name)}" for name in unknown))
    cli: dict[str, Any] = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        cli.setdefault(section, {})[key] = value
    token = _FILE_DATA.set(data)
    try:
        return AgentConfig(**cli)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {field}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from exc
    finally:
        _FILE_DATA.reset(token)
