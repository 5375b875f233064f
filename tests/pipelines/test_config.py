"""DistillConfig: YAML sections, profiles, per-field command-line overrides, validation messages."""

from __future__ import annotations

import dataclasses
import functools
import json
import typing

import pytest

from pipelines.config import PROFILES, DistillConfig, field_paths, parse_config


def test_layering_defaults_profile_file_then_fields(tmp_path):
    cfg_file = tmp_path / "x.yaml"
    cfg_file.write_text(
        "name: from-file\ntrain:\n  lr: 3e-4\n  betas: [0.8, 0.99]\neval:\n  tau_prompts: 5\n"
    )
    c = parse_config(["--profile", "tiny", "--config", str(cfg_file), "--eval.tau_prompts", "7", "--no-csgd"])
    assert c.name == "from-file"  # file over profile
    assert c.train.lr == 3e-4 and c.train.betas == (0.8, 0.99)  # YAML 1.1 `3e-4` read as a number
    assert c.eval.tau_prompts == 7  # field over file
    assert c.objective.csgd is False
    assert c.train.epochs == parse_config(["--profile", "tiny"]).train.epochs  # untouched profile value
    assert c.data.max_records == 48 and DistillConfig().data.max_records == 2000


def test_every_field_round_trips_and_is_a_command_line_option():
    c = DistillConfig()
    assert DistillConfig.from_dict(c.to_dict()) == c
    paths = field_paths()
    assert "train.lr" in paths and "objective.vocab_subset" in paths and "ray.num_workers" in paths
    assert parse_config(["--data.max_records", "null"]).data.max_records is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.train.lr = 1.0


@pytest.mark.parametrize("profile", PROFILES)
def test_profiles_load(profile):
    c = parse_config(["--profile", profile])
    assert c.drafter.block_size == 2 and c.name


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--train.precision", "fp16"], "train.precision must be one of"),
        (["--train.lr", "fast"], "train.lr must be a number"),
        (["--train.batch_size", "0"], "train.batch_size must be positive"),
        (["--train.deepspeed", "true"], "DeepSpeed clips the gradient norm only"),
        (["--objective.lambda_schedule", "cosine"], "objective.lambda_schedule must be one of"),
        (["--data.topk", "1.5"], "data.topk must be an integer"),
        (["--name", "a/b"], "without '/'"),
    ],
)
def test_bad_values_name_the_field(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_config(argv)


def test_unknown_yaml_keys_are_refused(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown config keys \['train.learning_rate'\]"):
        parse_config(["--config", str(f)])


def _another_value(tp, default):
    """A valid value of annotation `tp` other than `default`, as plain (JSON / YAML) data."""
    choices = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Literal:
        return next(c for c in choices if c != default)
    if typing.get_origin(tp) is tuple:
        return [x / 2 for x in default]
    base = next((a for a in choices if a is not type(None)), tp)  # `X | None` -> X
    if base is bool:
        return not default
    if base is int:
        return 1 if default is None else default + 1
    if base is float:
        return default + 0.25
    return "elsewhere"


def test_every_field_is_overridden_by_its_own_command_line_option():
    defaults = DistillConfig().to_dict()
    paths = field_paths()
    assert {p.split(".")[0] for p in paths} >= {"target", "data", "drafter", "objective", "train", "ray",
                                                "eval", "output"}  # fmt: skip
    for path, tp in paths.items():
        *sections, leaf = path.split(".")
        default = functools.reduce(dict.__getitem__, sections, defaults)[leaf]
        value = _another_value(tp, default)
        argv = [f"--{path}", json.dumps(value)]
        if path == "train.deepspeed":  # DeepSpeed clips by norm only (a cross-field check)
            argv += ["--train.grad_clip_mode", "norm"]
        got = functools.reduce(dict.__getitem__, sections, parse_config(argv).to_dict())[leaf]
        assert got == value != default, (path, got)
