"""`python -m pipelines.draft_vocab`: a drafter gets the n most frequent answer tokens of a real cache
(the training records only) as its draft vocabulary, keeping its weights and dtype."""

from __future__ import annotations

import json

import pytest
import torch

from falcon_core.checkpoint import TargetIdentity, load_drafter, save_drafter, stored_dtype
from falcon_core.drafter import Drafter, DrafterConfig
from falcon_core.target import TargetConfig
from pipelines import draft_vocab
from pipelines.hidden_cache import HiddenCacheReader
from pipelines.train import read_records
from tests.pipelines.test_train import MAX_SEQ_LEN, RECORDS, make_small_cache

HELDOUT, SIZE = 4, 300
pytestmark = pytest.mark.slow  # builds a small real cache (~20 s quiet, 90 s under load)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, smollm2_path, smollm2_tokenizer) -> str:
    return make_small_cache(tmp_path_factory.mktemp("dv-cache"), smollm2_path, smollm2_tokenizer)


@pytest.fixture(scope="module")
def bf16_drafter(tmp_path_factory, smollm2_path, smollm2_tokenizer):
    config = TargetConfig.from_file(smollm2_path)
    torch.manual_seed(0)
    drafter = Drafter(DrafterConfig.from_target(config, block_size=2)).bfloat16()
    identity = TargetIdentity.of("smollm2-135m-instruct", config, smollm2_tokenizer)
    path = tmp_path_factory.mktemp("dv-drafter") / "d"
    return save_drafter(path, drafter, drafter.config, identity, {"steps": 7})


def test_adds_the_most_frequent_training_answer_tokens(cache, bf16_drafter, tmp_path, smollm2_path, capsys):
    out = tmp_path / "with-vocab"
    argv = ["--drafter", str(bf16_drafter), "--cache", cache, "--size", str(SIZE), "--model", str(smollm2_path),
            "--heldout-records", str(HELDOUT), "--max-len", str(MAX_SEQ_LEN), "--out", str(out)]  # fmt: skip
    assert draft_vocab.main(argv) == 0
    assert "draft vocabulary of 300 ids" in capsys.readouterr().out

    before, after = load_drafter(bf16_drafter, dtype="bf16"), load_drafter(out, dtype="bf16")
    assert after.config.draft_vocab_size == SIZE
    ids = after.drafter.draft_vocab
    assert ids.numel() == SIZE and torch.equal(ids, ids.sort().values)
    for key, value in before.drafter.state_dict().items():  # weights unchanged
        assert torch.equal(value, after.drafter.state_dict()[key]), key
    assert after.card["steps"] == 7 and after.card["draft_vocab"]["training_records"] == RECORDS - HELDOUT
    meta = json.loads((out / "config.json").read_text())
    assert meta["drafter"]["draft_vocab_size"] == SIZE
    assert stored_dtype(out) == "bf16"

    # Independent count over the training records (the held-out ones excluded): every id in the
    # vocabulary is at least as frequent as every id outside it, and EOS is in.
    reader = HiddenCacheReader(cache)
    counts = torch.zeros(after.config.vocab_size, dtype=torch.long)
    for r in read_records(reader, range(0, RECORDS - HELDOUT), MAX_SEQ_LEN):
        for t in r.input_ids[r.loss_mask.bool()].tolist():
            counts[t] += 1
    eos = TargetConfig.from_file(smollm2_path).eos_token_ids
    assert all(e in ids.tolist() for e in eos)
    inside = torch.zeros_like(counts, dtype=torch.bool)
    inside[ids] = True
    inside_counts = counts[inside & ~torch.isin(torch.arange(counts.numel()), torch.tensor(eos))]
    assert int(inside_counts.min()) >= int(counts[~inside].max())
    assert after.card["draft_vocab"]["answer_tokens"] == int(counts.sum())


def test_bad_size_and_missing_cache_are_clear_errors(cache, bf16_drafter, tmp_path, smollm2_path, capsys):
    base = ["--drafter", str(bf16_drafter), "--model", str(smollm2_path), "--out", str(tmp_path / "x")]
    assert draft_vocab.main([*base, "--cache", cache, "--size", "0"]) == 2
    assert "--size must be in (0, 49152]" in capsys.readouterr().err
    assert draft_vocab.main([*base, "--cache", str(tmp_path / "nothing"), "--size", "10"]) == 2
    assert "nothing" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
