"""The gateway's settings: one GatewaySettings per process, from CLI > env (SPECGATE_*) > YAML > defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class GatewaySettings(BaseSettings):
    """Everything the gateway process can be told; built once and passed down."""

    model_config = SettingsConfigDict(env_prefix="SPECGATE_", extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Base URLs of vLLM workers, e.g. http://127.0.0.1:8100"
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Accepted bearer keys; empty means no authentication"
    )
    keys_file: Path | None = Field(
        None, description="YAML keys file: one entry per API key with its models, limits and priority (tenants/)"
    )
    routes_file: Path | None = Field(
        None, description="YAML routes: public model names to versions with weights, a shadow and fallbacks"
    )
    shadow_max_in_flight: int = Field(
        16, ge=0, description="Shadow copies running at once; beyond, a sampled request gets none (counted)"
    )
    redis_url: SecretStr | None = Field(
        None, description="Redis holding limits and usage shared by gateway replicas; unset: held in this process"
    )
    limits_fail_open: bool = Field(
        True, description="When the limit store cannot answer: admit without limits (true) or refuse limited keys "
        "with a 429 (false); either way it is logged and counted"
    )
    concurrency_lease_s: float = Field(
        900.0, gt=0, description="How long a replica that died holds its streams' concurrent-request slots"
    )
    high_priority_reserve: int = Field(
        0, ge=0, description="Admission slots only high-priority keys may take: room for them while lower "
        "classes fill the rest (set max_concurrency to what the workers run at once for it to matter)"
    )
    priority_ageing_s: float = Field(
        10.0, gt=0, description="Admission queue: each priority class below high waits as if it came this much later"
    )
    metrics_token: SecretStr | None = Field(
        None, description="Bearer token /metrics requires (Prometheus' scrape `authorization`); unset: open"
    )

    # Upstream timeouts. The read timeout is an idle timeout on streams, so long generations live on.
    connect_timeout_s: float = Field(3.0, gt=0)
    stream_idle_timeout_s: float = Field(60.0, gt=0, description="A stream whose worker sends nothing this long ends")
    request_timeout_s: float = Field(900.0, gt=0, description="Whole non-streaming upstream call")
    max_upstream_connections: int = Field(2048, ge=1)

    # Admission: how many requests run at once, and how many may wait and for how long.
    max_concurrency: int = Field(4096, ge=1)
    max_queue: int = Field(4096, ge=0)
    queue_timeout_s: float = Field(30.0, gt=0)
    retry_after_s: int = Field(1, ge=0)

    routing: str = Field(
        "least_loaded",
        description="round_robin | least_loaded | power_of_two | session_affinity | prefix_aware | spec_aware",
    )
    routing_per_model: dict[str, str] = Field(default_factory=dict, description="model name -> policy")
    max_attempts: int = Field(3, ge=1, description="Workers tried for one request before the first byte")
    max_migrations: int = Field(
        1, ge=0, description="Times a stream whose worker fails mid-stream goes on from another worker; 0: never"
    )
    retry_backoff_s: float = Field(0.05, ge=0)

    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    # The HTTP edge (gateway/edge.py): what a client may send before the app sees its request.
    max_header_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024,
                                  description="Largest request head (request line and headers); beyond: 431")
    max_headers: int = Field(100, ge=32, le=10_000, description="Most header fields in one request; beyond: 431")
    header_timeout_s: float = Field(10.0, gt=0, le=600,
                                    description="A request head not complete this long after the connection opened "
                                                "(or after its first byte, on a kept-alive connection) gets 408")
    body_timeout_s: float = Field(30.0, gt=0, le=3600,
                                  description="A request body sending nothing this long ends the request")
    client_write_buffer_bytes: int = Field(
        4 * 1024, ge=1024, description="Bytes queued in the gateway for one client before its stream waits for it"
    )
    # orjson writes at most 254 levels; the worker's body is written again by the gateway.
    max_json_depth: int = Field(64, ge=2, le=200, description="Deepest nesting a request body may have")
    sse_ping_interval_s: float = Field(15.0, gt=0)
    sse_send_timeout_s: float = Field(60.0, gt=0, description="A reader that takes no bytes this long is cut")
    client_send_buffer_bytes: int = Field(
        128 * 1024, ge=0,
        description="Kernel send buffer per client connection (0: the kernel's autotuning, up to megabytes): what "
        "a client that stops reading can hold queued before the send timeout starts counting",
    )

    first_token_timeout_s: float = Field(
        120.0, gt=0, description="The longest wait for a worker's first event before the stream is tried elsewhere"
    )
    # Below that cap the wait scales: base + per KiB of request body + per request waiting on the worker.
    first_token_base_s: float = Field(30.0, gt=0)
    first_token_per_prompt_kib_s: float = Field(0.5, ge=0)
    first_token_per_waiting_s: float = Field(2.0, ge=0)
    shutdown_grace_s: float = Field(30.0, ge=0, description="On SIGTERM, how long open streams may still run")
    shutdown_notice_s: float = Field(
        0.0, ge=0, description="On SIGTERM, answer /ready with 503 at least this long before exiting (load balancers)"
    )

    health_interval_s: float = Field(2.0, gt=0)
    health_timeout_s: float = Field(5.0, gt=0)
    scrape_interval_s: float = Field(0.25, gt=0, description="How often worker /metrics are read for load")
    discovery_interval_s: float = Field(10.0, gt=0, description="How often dns+http:// worker names are resolved")
    eject_after_failures: int = Field(3, ge=1)
    warmup_timeout_s: float = Field(
        120.0, ge=0, description="A worker coming up answers one small request per model before it is routed to, "
        "within this long (else it is tried again at the next health check); 0: no warm-up"
    )
    session_header: str = "x-session-id"

    log_level: str = "info"
    request_log: bool = True

    @field_validator("workers", "api_keys", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("metrics_token", "redis_url", "keys_file", "routes_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # Compose passes an unset variable as "": that means no token, not an empty one.
        return None if value == "" else value

    @field_validator("workers")
    @classmethod
    def _strip_trailing_slash(cls, value: list[str]) -> list[str]:
        return [url.rstrip("/") for url in value]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # YAML reads model_config["yaml_file"], set per call by load_settings; absent, it adds nothing.
        return init_settings, env_settings, YamlConfigSettingsSource(settings_cls)


def load_settings(config_file: Path | None = None, **overrides: Any) -> GatewaySettings:
    """Build the settings; CLI flags arrive as overrides and win over env, YAML and defaults."""
    clean = {key: value for key, value in overrides.items() if value is not None}
    if config_file is None:
        return GatewaySettings(**clean)
    if not config_file.is_file():
        raise FileNotFoundError(f"gateway config file not found: {config_file}")
    with_file = type(
        "GatewaySettingsFromFile",
        (GatewaySettings,),
        {"model_config": SettingsConfigDict(**{**GatewaySettings.model_config, "yaml_file": config_file})},
    )
    settings: GatewaySettings = with_file(**clean)
    return settings
