"""Generation invariants on tiny fp32 models: speculative greedy == plain greedy (oracle, always-wrong and
random drafters; k = 1, 2, 3; published, chain and fitted trees), cached == uncached, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from falcon_core.draft import DraftPlan, DraftResult, SARDrafter
from falcon_core.drafter import Drafter, DrafterConfig
from falcon_core.generate import Engine
from falcon_core.metrics import GenerationStats
from falcon_core.sampling import SamplingParams
from falcon_core.target import TargetModel, load_target
from falcon_core.tree import Tree, build_tree, get_tree

TREES = ["chain-4", "kmask2_8layer_tree", "kmask2_8layer_tree_3", "fitted"]


def tiny_target(tmp_path, vocab: int = 512, layers: int = 2, seed: int = 0) -> TargetModel:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        eos_token_id=None,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # sharper logits than the default init, so greedy paths are not near-ties
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(tmp_path / "target")
    return load_target(tmp_path / "target", dtype="fp32")


def make_tree(name: str) -> Tree:
    if name == "fitted":
        return build_tree([[0.6, 0.2, 0.1], [0.5, 0.2], [0.4, 0.1], [0.3], [0.3]], budget=12)
    return get_tree(name)


class OracleProposer(SARDrafter):
    """Drafts from the target itself: every all-rank-0 path is the target's greedy continuation (right);
    with `wrong=True` every token differs from it (always wrong)."""

    def __init__(self, target: TargetModel, plan: DraftPlan, wrong: bool = False) -> None:
        self.target, self.plan, self.wrong = target, plan, wrong
        self.k = plan.k

    def propose(self, features, tokens, n, params, generator=None) -> DraftResult | None:
        D = self.plan.tree.max_depth
        seq = tokens[: n + 1].clone()
        for _ in range(D):  # the target's greedy continuation, uncached
            pos = torch.arange(seq.shape[0])[None]
            nxt = self.target(seq[None], pos).logits[0, -1].argmax()
            seq = torch.cat((seq, nxt[None]))
        greedy = seq[n + 1 :]  # (D,)
        V = self.target.config.vocab_size
        tree = self.plan.tree
        toks = []
        for i in range(tree.num_nodes):
            path = tree.path(i)
            g = int(greedy[len(path) - 1])
            right = not self.wrong and all(r == 0 for r in path)
            toks.append(g if right else (g + 1 + path[-1]) % V)
        return DraftResult(torch.tensor(toks), None, self.plan.child_row, 1, 0.0)


class OracleEngine(Engine):
    def __init__(self, *args, wrong: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.wrong = wrong

    def _make_proposer(self, rows: int) -> SARDrafter:
        return OracleProposer(self.target, self.plan, self.wrong)


def decode(engine: Engine, ids: list[int], max_new: int, speculative: bool = True, **sampling) -> tuple:
    stats = GenerationStats()
    params = SamplingParams(**sampling)
    out: list[int] = []
    for new in engine._decode(ids, max_new, params, speculative and engine.drafter is not None, stats):
        out.extend(new)
        if len(out) >= max_new:
            break
    return out[:max_new], stats


def speculative_equals_plain(
    target: TargetModel, drafter: Drafter, tree: Tree, prompts: list[list[int]], max_new: int
) -> list[GenerationStats]:
    """Decode each prompt plainly and with `drafter` over `tree`, assert the outputs are equal, and
    return the speculative runs' stats (one per prompt)."""
    engine, plain = Engine(target, None, drafter, tree), Engine(target, None)
    out = []
    for ids in prompts:
        want, _ = decode(plain, ids, max_new)
        got, stats = decode(engine, ids, max_new)
        assert got == want
        out.append(stats)
    return out


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> TargetModel:
    return tiny_target(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 512, (L,), generator=g).tolist() for L in (1, 5, 37)]


def drafter_for(target: TargetModel, k: int, seed: int = 0) -> Drafter:
    torch.manual_seed(seed)
    return Drafter(DrafterConfig.from_target(target.config, block_size=k)).eval()


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("tree", TREES)
def test_oracle_drafter_is_lossless_and_fully_accepted(target, prompts, k, tree):
    t = make_tree(tree)
    engine = OracleEngine(target, None, drafter_for(target, k), t)
    plain = Engine(target, None)
    for ids in prompts:
        want, _ = decode(plain, ids, 40)
        got, stats = decode(engine, ids, 40)
        assert got == want
        spec = stats.speculative_steps
        assert spec > 0 and stats.accepted_per_depth[t.max_depth - 1] == spec, stats
        assert stats.tau > 0.9 * (t.max_depth + 1) * spec / stats.target_forwards


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("tree", ["chain-4", "kmask2_8layer_tree"])
def test_always_wrong_drafter_is_lossless_with_tau_one(target, prompts, k, tree):
    engine = OracleEngine(target, None, drafter_for(target, k), make_tree(tree), wrong=True)
    plain = Engine(target, None)
    for ids in prompts:
        want, _ = decode(plain, ids, 30)
        got, stats = decode(engine, ids, 30)
        assert got == want
        assert stats.tau == 1.0 and sum(stats.accepted_per_depth) == 0


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("tree", TREES)
def test_random_drafter_is_lossless(target, prompts, k, tree):
    runs = speculative_equals_plain(target, drafter_for(target, k, seed=k), make_tree(tree), prompts, 40)
    for ids, stats in zip(prompts, runs, strict=True):
        if len(ids) >= k:
            assert stats.speculative_steps > 0


def test_cached_equals_uncached(target, prompts):
    plain = Engine(target, None)
    for ids in prompts:
        got, _ = decode(plain, ids, 24)
        seq = torch.tensor(ids)
        want = []
        for _ in range(24):
            nxt = target(seq[None], torch.arange(seq.shape[0])[None]).logits[0, -1].argmax()
            want.append(int(nxt))
            seq = torch.cat((seq, nxt[None]))
        assert got == want


def test_speculative_sampling_is_reproducible_with_seed(target, prompts):
    engine = Engine(target, None, drafter_for(target, 2), get_tree("kmask2_8layer_tree"))
    a, _ = decode(engine, prompts[2], 30, temperature=0.9, top_p=0.95, top_k=50, seed=7)
    b, _ = decode(engine, prompts[2], 30, temperature=0.9, top_p=0.95, top_k=50, seed=7)
    c, _ = decode(engine, prompts[2], 30, temperature=0.9, top_p=0.95, top_k=50, seed=8)
    assert a == b and a != c


def test_drafter_plan_passes_cover_the_tree():
    tree = get_tree("kmask2_8layer_tree")
    for k in (1, 2, 3):
        plan = DraftPlan.build(tree, k)
        covered = torch.cat(plan.pass_nodes).sort().values
        assert covered.tolist() == list(range(tree.num_nodes))
        assert len(plan.pass_nodes) == -(-tree.max_depth // k)
        assert plan.num_rows == k + plan.scratch_rows


class TestBadInput:
    def test_errors(self, target, smollm2_tokenizer, tmp_path):
        engine = Engine(target, smollm2_tokenizer, None)
        with pytest.raises(ValueError, match="empty"):
            engine.generate(input_ids=[])
        with pytest.raises(ValueError, match="empty"):
            engine.generate(prompt="")
        with pytest.raises(ValueError, match="context limit"):
            engine.generate(input_ids=[1] * 600)
        with pytest.raises(ValueError, match="max_new_tokens"):
            engine.generate(input_ids=[1, 2], max_new_tokens=0)
        with pytest.raises(ValueError, match="temperature"):
            engine.generate(input_ids=[1, 2], temperature=-1.0)
        with pytest.raises(ValueError, match="exactly one"):
            engine.generate(prompt="hi", input_ids=[1])
        with pytest.raises(ValueError, match="vocabulary"):
            engine.generate(input_ids=[10**6])

    def test_drafter_for_another_target_is_refused(self, smollm2_path, tmp_path):
        from falcon_core.checkpoint import TargetIdentity, save_drafter

        other = tiny_target(tmp_path, vocab=512)
        cfg = DrafterConfig.from_target(other.config, block_size=2)
        ident = TargetIdentity(name="tiny", hidden_size=64, vocab_size=512, tokenizer_hash="0" * 64)
        save_drafter(tmp_path / "d", Drafter(cfg), cfg, ident)
        with pytest.raises(ValueError, match="trained for"):
            Engine.from_pretrained(str(smollm2_path), drafter=tmp_path / "d", dtype="fp32")
        meta = json.loads((tmp_path / "d" / "config.json").read_text())
        assert meta["target"]["name"] == "tiny"
