"""The serve config: the shipped YAML passes Serve's own schema and ours; bad configs fail early."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deploy.cli import import_builder, load_config
from deploy.config import PROJECT_ROOT, AutoscalingConfig, ModelConfig, ServerConfig
from deploy.engine import deployment_options

SERVE_CONFIG = PROJECT_ROOT / "deploy" / "serve_config.yaml"


def test_shipped_config_is_a_serve_config_with_our_args() -> None:
    schema = load_config(SERVE_CONFIG)
    (app,) = schema.applications
    assert app.import_path == "deploy.router:build_app"
    assert schema.http_options.host == "127.0.0.1"
    config = ServerConfig.from_dict(app.args)
    (model,) = config.models
    assert model.name == "smollm2-135m-instruct"
    assert model.autoscaling.min_replicas <= model.autoscaling.max_replicas
    assert callable(import_builder(app.import_path))


def test_builder_binds_router_and_one_engine_per_model() -> None:
    raw = yaml.safe_load(SERVE_CONFIG.read_text())
    args = raw["applications"][0]["args"]
    args["models"].append({**args["models"][0], "name": "second"})
    app = import_builder("deploy.router:build_app")(args)
    assert type(app).__name__ == "Application"


def test_deployment_options_carry_autoscaling_and_gpus() -> None:
    m = ModelConfig(
        name="m",
        device="cuda",
        max_ongoing_requests=3,
        autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=1),
    )
    opts = deployment_options(m)
    assert opts["ray_actor_options"]["num_gpus"] == 1.0
    assert opts["max_ongoing_requests"] == 3
    assert opts["autoscaling_config"]["max_replicas"] == 4
    assert "initial_replicas" not in opts["autoscaling_config"]
    assert deployment_options(ModelConfig(name="c"))["ray_actor_options"]["num_gpus"] == 0.0


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"models": []}, "at least one model"),
        ({"models": [{"name": "a"}, {"name": "a"}]}, "unique"),
        ({"models": [{"name": "a", "dtpye": "bf16"}]}, "unknown keys"),
        ({"models": [{"name": "../etc"}]}, "model name"),
        ({"models": [{"name": "a", "autoscaling": {"min_replicas": 3, "max_replicas": 2}}]}, "max_replicas"),
        ({"models": [{"name": "a", "max_tokens_limit": 8, "default_max_tokens": 16}]}, "default_max_tokens"),
        ({"models": [{"name": "a"}], "api_key": "secret"}, "unknown keys"),
        ({"models": "a"}, "list"),
    ],
)
def test_bad_args_are_rejected(args: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ServerConfig.from_dict(args)


def test_relative_drafter_is_under_project_root_and_aliases_stay() -> None:
    m = ModelConfig(name="m", drafter="models/some-drafter")
    assert m.drafter_path() == str(PROJECT_ROOT / "models" / "some-drafter")
    assert ModelConfig(name="m", drafter="none").drafter_path() is None
    assert ModelConfig(name="m").target_spec() == "smollm2-135m-instruct"
    assert ModelConfig(name="m", model="org/hub-model").target_spec() == "org/hub-model"


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "nope.yaml")


def test_cli_reports_a_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deploy.cli import main

    bad = tmp_path / "serve.yaml"
    bad.write_text(
        "applications:\n- name: x\n  import_path: deploy.router:build_app\n  args: {models: [{name: a, foo: 1}]}\n"
    )
    assert main(["--config", str(bad)]) == 2
    assert "unknown keys" in capsys.readouterr().err
