"""Typed configuration of the serving application: what `args:` holds in a Ray Serve config file.

`deploy/serve_config.yaml` is a standard Ray Serve config (`applications:` with `import_path` and
`args`), the same document a KubeRay RayService embeds as `serveConfigV2`. Serve calls the builder named
by `import_path` (`deploy.router:build_app`) with `args`, which `ServerConfig.from_dict` parses:

```yaml
args:
  api_key_env: FALCON_API_KEY        # optional: name of the environment variable holding the key
  max_body_bytes: 1048576
  models:
    - name: smollm2-135m-instruct    # the name clients send as "model"
      model: smollm2-135m-instruct   # spec handed to Engine.from_pretrained (alias or folder)
      drafter: null                  # a drafter checkpoint folder; null = plain decoding
      autoscaling: {min_replicas: 1, max_replicas: 2, target_ongoing_requests: 1}
```

Clients choose a model only among the configured `name`s: a request's "model" is looked up in that table
and never reaches `resolve_model`, so it cannot name a path or a hub id. Relative `model` / `drafter`
folders are resolved against the project root (the folder holding the `deploy` package), which is also
the `working_dir` of a RayService.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from falcon_core.resolve import DEFAULT_MODEL

PROJECT_ROOT = Path(__file__).resolve().parents[1]
"""Relative model and drafter folders in a config are taken from here."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def _check_keys(cls: type, d: dict[str, Any], where: str) -> None:
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a mapping, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known keys: {sorted(known)}")


@dataclass(frozen=True)
class AutoscalingConfig:
    """Ray Serve `autoscaling_config` of one engine deployment (replicas = engines of one model)."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 1.0
    """Requests per replica the autoscaler aims for; an engine runs one request at a time, so 1."""
    initial_replicas: int | None = None
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 60.0
    look_back_period_s: float = 30.0
    """Window the autoscaler averages the ongoing-request counts over."""

    def __post_init__(self) -> None:
        if self.min_replicas < 0:
            raise ValueError(f"min_replicas must be >= 0, got {self.min_replicas}")
        if self.max_replicas < max(1, self.min_replicas):
            raise ValueError(
                f"max_replicas ({self.max_replicas}) must be >= 1 and >= min_replicas ({self.min_replicas})"
            )
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError(f"initial_replicas ({self.initial_replicas}) must lie in [min, max]")
        if self.target_ongoing_requests <= 0:
            raise ValueError(f"target_ongoing_requests must be > 0, got {self.target_ongoing_requests}")
        for name in ("upscale_delay_s", "downscale_delay_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.look_back_period_s <= 0:
            raise ValueError(f"look_back_period_s must be > 0, got {self.look_back_period_s}")

    def to_serve(self) -> dict[str, Any]:
        """The dict Ray Serve's `autoscaling_config` option takes."""
        d = dataclasses.asdict(self)
        if d["initial_replicas"] is None:
            del d["initial_replicas"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AutoscalingConfig:
        _check_keys(cls, d, "autoscaling")
        return cls(**d)


@dataclass(frozen=True)
class ModelConfig:
    """One served model: a target, an optional drafter, and the engine deployment's Serve options."""

    name: str
    """The name clients send as "model" (letters, digits, `._:-`); it is never resolved as a path."""
    model: str = DEFAULT_MODEL
    """Target spec for `Engine.from_pretrained` (alias, local folder, .gguf); set by the operator only."""
    drafter: str | None = None
    """Drafter checkpoint folder; None = plain decoding (speculation is then a no-op)."""
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    device: Literal["cpu", "cuda"] = "cpu"
    tree: str = "auto"
    max_tokens_limit: int = 2048
    """Largest `max_tokens` a request may ask for (400 above it)."""
    default_max_tokens: int = 256
    """`max_tokens` of a chat request that sets none (completions default to 16, as in OpenAI's API)."""
    torch_threads: int | None = None
    """`torch.set_num_threads` in each replica; None leaves torch's default."""
    num_cpus: float = 1.0
    num_gpus: float | None = None
    """GPUs per replica; None = 1 on `device: cuda`, else 0."""
    max_ongoing_requests: int = 4
    """Requests Serve sends one replica at once; the engine runs one and queues the rest."""
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(
                f"model name {self.name!r} must be 1-128 letters, digits or '._:-', starting with a letter or digit"
            )
        if self.dtype not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"dtype must be bf16, fp16 or fp32, got {self.dtype!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        for name in ("max_tokens_limit", "default_max_tokens", "max_ongoing_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{self.name}: {name} must be >= 1, got {getattr(self, name)}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"{self.name}: default_max_tokens exceeds max_tokens_limit")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"{self.name}: torch_threads must be >= 1, got {self.torch_threads}")
        if self.num_cpus < 0 or (self.num_gpus is not None and self.num_gpus < 0):
            raise ValueError(f"{self.name}: num_cpus and num_gpus must be >= 0")

    @property
    def deployment_name(self) -> str:
        return "engine-" + re.sub(r"[^A-Za-z0-9_-]", "_", self.name)

    @property
    def gpus(self) -> float:
        if self.num_gpus is not None:
            return self.num_gpus
        return 1.0 if self.device == "cuda" else 0.0

    def target_spec(self) -> str:
        """`model`, made absolute when it names a folder or file under the project root."""
        path = Path(self.model).expanduser()
        if not path.is_absolute() and (PROJECT_ROOT / path).exists():
            return str(PROJECT_ROOT / path)
        return str(path) if path.is_absolute() else self.model

    def drafter_path(self) -> str | None:
        """The drafter folder (relative ones under the project root), or None for plain decoding."""
        if self.drafter is None or self.drafter == "none":
            return None
        path = Path(self.drafter).expanduser()
        return str(path if path.is_absolute() else PROJECT_ROOT / path)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        _check_keys(cls, d, f"model {d.get('name')!r}" if isinstance(d, dict) else "model")
        d = dict(d)
        if "autoscaling" in d:
            d["autoscaling"] = AutoscalingConfig.from_dict(d["autoscaling"] or {})
        return cls(**d)


@dataclass(frozen=True)
class ServerConfig:
    """The whole application: served models and the HTTP ingress's own settings."""

    models: tuple[ModelConfig, ...]
    api_key_env: str | None = None
    """Name of an environment variable; when it is set and non-empty, `/v1/*` needs
    `Authorization: Bearer <its value>`. The key itself never appears in a config file."""
    max_body_bytes: int = 1 << 20
    """Request bodies above this get 413."""
    router_num_cpus: float = 0.1
    router_max_ongoing_requests: int = 256

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("a server config needs at least one model")
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {dupes}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.router_max_ongoing_requests < 1:
            raise ValueError("router_max_ongoing_requests must be >= 1")

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ServerConfig:
        """Parse the `args` of a Serve application (unknown keys are errors, to catch typos)."""
        _check_keys(cls, d, "args")
        d = dict(d)
        models = d.pop("models", None)
        if not isinstance(models, list):
            raise ValueError("args.models must be a list of model entries")
        return cls(models=tuple(ModelConfig.from_dict(m) for m in models), **d)
