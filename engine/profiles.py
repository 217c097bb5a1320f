"""Engine profiles: a typed schema for configs/engine/*.yaml, rendered into vLLM arguments and environment."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MODELS_DIR_PLACEHOLDER = "{models_dir}"


class ProfileError(ValueError):
    """A profile that cannot be used, named by file, field and reason."""


class SpeculativeConfig(BaseModel):
    """Speculative decoding; `method` follows vLLM's names (draft_model, ngram, eagle, eagle3, mtp, ...)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["draft_model", "ngram", "eagle", "eagle3", "mtp", "medusa", "mlp_speculator"] = "draft_model"
    model: str | None = Field(None, description="Draft model id or path; '{models_dir}' is replaced")
    num_speculative_tokens: int = Field(3, ge=1, le=16)
    draft_tensor_parallel_size: int | None = Field(None, ge=1)
    prompt_lookup_min: int | None = Field(None, ge=1)
    prompt_lookup_max: int | None = Field(None, ge=1)
    extra: dict[str, Any] = Field(default_factory=dict, description="Any other speculative_config key")
    # vLLM's per-request report (acceptance in each answer's final usage chunk), read by the gateway.
    per_request_metrics: Literal["none", "summary", "detailed"] = "summary"

    @model_validator(mode="after")
    def _needs_model(self) -> SpeculativeConfig:
        if self.method != "ngram" and not self.model:
            raise ValueError(f"speculative method '{self.method}' needs a 'model'")
        if self.method == "ngram" and self.prompt_lookup_max is None:
            raise ValueError("speculative method 'ngram' needs 'prompt_lookup_max'")
        return self

    def as_vllm_json(self, models_dir: Path) -> str:
        config: dict[str, Any] = {"num_speculative_tokens": self.num_speculative_tokens}
        if self.method != "draft_model" or self.model is None:
            config["method"] = self.method
        if self.model is not None:
            config["model"] = _expand(self.model, models_dir)
        for key in ("draft_tensor_parallel_size", "prompt_lookup_min", "prompt_lookup_max"):
            value = getattr(self, key)
            if value is not None:
                config[key] = value
        config.update(self.extra)
        return json.dumps(config, separators=(",", ":"), sort_keys=True)


class EngineProfile(BaseModel):
    """How one vLLM worker runs: model, PagedAttention, batching, parallelism, speculation."""

    model_config = ConfigDict(extra="forbid")

    name: str
    device: Literal["cpu", "gpu"]
    description: str = ""
    # Model
    model: str = Field(description="Hugging Face id or local path; '{models_dir}' is replaced")
    # One name, or several: the first is the public name, the others aliases the worker also answers to.
    served_model_name: str | list[str] | None = None
    revision: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = Field(None, ge=16)
    quantization: str | None = None
    # PagedAttention
    block_size: int | None = Field(None, ge=1)
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    kv_cache_space_gib: float | None = Field(None, gt=0, description="CPU only: GiB of KV cache")
    # vLLM V1 dropped KV swap space (preempted requests are recomputed); weight offload is what remains.
    cpu_offload_gib: float | None = Field(None, ge=0, description="GiB of weights offloaded to CPU memory")
    # Continuous batching
    max_num_seqs: int | None = Field(None, ge=1)
    max_num_batched_tokens: int | None = Field(None, ge=1)
    enable_chunked_prefill: bool | None = None
    enable_prefix_caching: bool | None = None
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    # Parallelism
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    distributed_executor_backend: Literal["mp", "ray"] | None = None
    cpu_threads_bind: str | None = Field(None, description="CPU only: VLLM_CPU_OMP_THREADS_BIND, e.g. '0|1'")
    # Speculative decoding
    speculative: SpeculativeConfig | None = None
    # Escape hatches
    extra_args: list[str] = Field(default_factory=list, description="Appended to vLLM's command line as given")
    env: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> EngineProfile:
        if self.device == "cpu" and self.gpu_memory_utilization is not None:
            raise ValueError("gpu_memory_utilization applies to device 'gpu'; use kv_cache_space_gib on cpu")
        if self.device == "gpu" and self.kv_cache_space_gib is not None:
            raise ValueError("kv_cache_space_gib applies to device 'cpu'; use gpu_memory_utilization on gpu")
        if self.device == "gpu" and self.cpu_threads_bind is not None:
            raise ValueError("cpu_threads_bind applies to device 'cpu'")
        if self.cpu_threads_bind is not None and self.tensor_parallel_size > 1:
            ranks = self.cpu_threads_bind.split("|")
            if len(ranks) != self.tensor_parallel_size:
                raise ValueError(
                    f"cpu_threads_bind needs one core list per tensor-parallel rank "
                    f"({self.tensor_parallel_size}), got {len(ranks)}"
                )
        return self

    @property
    def public_name(self) -> str:
        if isinstance(self.served_model_name, list):
            return self.served_model_name[0] if self.served_model_name else self.model
        return self.served_model_name or self.model


@dataclass(frozen=True)
class WorkerCommand:
    """A rendered worker: the argv to exec and the environment to add."""

    argv: list[str]
    env: dict[str, str]


def _expand(value: str, models_dir: Path) -> str:
    return value.replace(MODELS_DIR_PLACEHOLDER, str(models_dir))


def render(
    profile: EngineProfile,
    *,
    host: str,
    port: int,
    models_dir: Path,
    python: str = sys.executable,
    cpu_bind: str | None = None,
    cpu_threads: int | None = None,
) -> WorkerCommand:
    """The one place a profile becomes vLLM's command line and environment."""
    argv = [python, "-m", "vllm.entrypoints.openai.api_server"]
    argv += ["--model", _expand(profile.model, models_dir), "--host", host, "--port", str(port)]
    names = profile.served_model_name
    if names:
        argv += ["--served-model-name", *([names] if isinstance(names, str) else names)]
    flags: list[tuple[str, Any]] = [
        ("--revision", profile.revision),
        ("--tokenizer", _expand(profile.tokenizer, models_dir) if profile.tokenizer else None),
        ("--dtype", profile.dtype),
        ("--max-model-len", profile.max_model_len),
        ("--quantization", profile.quantization),
        ("--block-size", profile.block_size),
        ("--gpu-memory-utilization", profile.gpu_memory_utilization),
        ("--cpu-offload-gb", profile.cpu_offload_gib),
        ("--max-num-seqs", profile.max_num_seqs),
        ("--max-num-batched-tokens", profile.max_num_batched_tokens),
        ("--scheduling-policy", profile.scheduling_policy),
        ("--tensor-parallel-size", profile.tensor_parallel_size),
        ("--pipeline-parallel-size", profile.pipeline_parallel_size),
        ("--distributed-executor-backend", profile.distributed_executor_backend),
    ]
    for flag, value in flags:
        if value is not None:
            argv += [flag, str(value)]
    for flag, enabled in (
        ("chunked-prefill", profile.enable_chunked_prefill),
        ("prefix-caching", profile.enable_prefix_caching),
    ):
        if enabled is not None:
            argv.append(f"--enable-{flag}" if enabled else f"--no-enable-{flag}")
    if profile.speculative is not None:
        argv += ["--speculative-config", profile.speculative.as_vllm_json(models_dir)]
        if profile.speculative.per_request_metrics != "none":
            argv += ["--per-request-spec-decode-metrics", profile.speculative.per_request_metrics]
    argv += [_expand(arg, models_dir) for arg in profile.extra_args]

    env = {"HF_HUB_OFFLINE": "1"} if profile.device == "cpu" else {}
    if profile.device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = _gib(profile.kv_cache_space_gib or 1)
        bind = cpu_bind if cpu_bind is not None else profile.cpu_threads_bind
        if bind is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = bind
        if cpu_threads is not None:
            env["OMP_NUM_THREADS"] = str(cpu_threads)
    env.update(profile.env)
    return WorkerCommand(argv, env)


def _gib(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def load_profile(path: Path) -> EngineProfile:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ProfileError(f"{path}: no such engine profile") from None
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: an engine profile is a YAML mapping")
    data.setdefault("name", path.stem)
    try:
        return EngineProfile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"field '{'.'.join(str(p) for p in err['loc']) or '(profile)'}': {err['msg']}" for err in exc.errors()
        )
        raise ProfileError(f"{path}: {problems}") from None


def profiles_dir() -> Path:
    """configs/engine beside the package (a checkout), or SPECGATE_PROFILES_DIR."""
    import os

    configured = os.environ.get("SPECGATE_PROFILES_DIR")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parent.parent / "configs" / "engine"


def find_profile(name_or_path: str) -> EngineProfile:
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        return load_profile(candidate)
    return load_profile(profiles_dir() / f"{name_or_path}.yaml")
