"""`falcon bench trajectory-tau`: replaying decoding on the known greedy continuation gives exactly the
engine's fp32 steps, tokens and acceptance per depth; the command writes a paired report."""

from __future__ import annotations

import json

import pytest
import torch

from bench import cli
from bench.trajectory_tau import bootstrap_ci, replay
from falcon_core.draft import DraftPlan, SARDrafter
from falcon_core.drafter import Drafter, DrafterConfig
from falcon_core.generate import Engine
from tests.falcon_core.test_generate import OracleEngine, OracleProposer, decode, make_tree, tiny_target


class PartlyRightProposer(OracleProposer):
    """The target's own greedy tree (right along rank 0), with nodes spoiled by a rule on (n, node):
    acceptances of every length occur, and the engine and the replay see the same drafts."""

    def propose(self, features, tokens, n, params, generator=None):
        draft = super().propose(features, tokens, n, params, generator)
        V = self.target.config.vocab_size
        for i in range(draft.tokens.numel()):
            if (n * 7 + i * 3) % 5 == 0:
                draft.tokens[i] = (draft.tokens[i] + 1) % V
        return draft


class PartlyRightEngine(OracleEngine):
    def _make_proposer(self, rows: int):
        return PartlyRightProposer(self.target, self.plan)


@pytest.fixture(scope="module")
def small_vocab_target(tmp_path_factory):
    """V = 32: a small vocabulary, but more than any tree's candidates per node."""
    return tiny_target(tmp_path_factory.mktemp("tt"), vocab=32, seed=5)


@pytest.mark.parametrize(
    ("k", "tree"), [(1, "chain-4"), (2, "chain-4"), (2, "kmask2_8layer_tree"), (3, "fitted")]
)
@pytest.mark.parametrize("proposer", ["random", "partly-right"])
def test_replay_equals_the_engine(small_vocab_target, k, tree, proposer):
    target = small_vocab_target
    torch.manual_seed(k)
    drafter = Drafter(DrafterConfig.from_target(target.config, block_size=k)).eval()
    t = make_tree(tree)
    plan = DraftPlan.build(t, k)
    if proposer == "random":
        engine = Engine(target, None, drafter, t)
    else:
        engine = PartlyRightEngine(target, None, drafter, t)
    plain = Engine(target, None)
    g = torch.Generator().manual_seed(k)
    accepted = 0
    for L in (4, 19):
        ids = torch.randint(0, 32, (L,), generator=g).tolist()
        want, _ = decode(plain, ids, 48 + t.max_depth)  # the last step may accept past 48
        got, stats = decode(engine, ids, 48)
        assert got == want[:48]
        seq = torch.tensor(ids + want)
        with torch.inference_mode():
            feats = target(seq[None, :-1], torch.arange(seq.numel() - 1)[None]).hidden[0]
            rows = seq.numel() + plan.scratch_rows
            if proposer == "random":
                sar = SARDrafter(drafter, target, plan, rows)
            else:
                sar = PartlyRightProposer(target, plan)
            r = replay(sar, t, feats, seq, L, 48)
        assert r["steps"] == stats.target_forwards
        assert r["decoded"] == stats.decode_tokens
        depth = len(r["accepted_per_depth"])
        assert r["accepted_per_depth"] == (stats.accepted_per_depth + [0] * depth)[:depth]
        accepted += sum(r["accepted_per_depth"])
    if proposer == "partly-right":  # the comparison covered accepted drafts, not only rejections
        assert accepted > 0


def test_bootstrap_interval():
    lo, hi = bootstrap_ci([0.1] * 30)
    assert lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    lo, hi = bootstrap_ci([-1.0, 1.0] * 20)
    assert lo < 0 < hi


def test_command_writes_a_paired_report(tiny_folder, drafter_dirs, tmp_path, make_drafter):
    other = make_drafter(tiny_folder, tmp_path / "k2-b", k=2, seed=9)
    out = tmp_path / "out"
    argv = ["trajectory-tau", "--model", str(tiny_folder), "--drafter", str(drafter_dirs["falcon"]),
            "--drafter", str(other), "--label", "a", "--label", "b", "--prompts", "gsm8k",
            "--num-prompts", "3", "--max-new-tokens", "12", "--batch-size", "2", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    data = json.loads((out / "trajectory_tau.json").read_text())
    assert len(data["prompts"]) == 3 and set(data["prompts"][0]["drafters"]) == {"a", "b"}
    entry = data["summary"]["all"]
    assert entry["prompts"] == 3 and entry["a"]["tau"] >= 1.0
    assert len(entry["b"]["paired_diff_vs_a"]["ci95"]) == 2
    assert "| gsm8k | 3 |" in (out / "trajectory_tau.md").read_text()
