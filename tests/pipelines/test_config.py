"""DistillConfig: YAML sections, profiles, per-field command-line overrides, validation messages."""

from __future__ import annotations

import dataclasses

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
