"""Tree fitting: the fit picks the argmax of its own cost model, the probe tree counts ranks right (with
oracle drafters), costs are measured, and a fit stored in a drafter's card is what `--tree auto` builds."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from bench.cli import main as bench_main
from bench.methods import Models
from bench.tree_fit import CostMeter, ProbeEngine, fit_tree, measure_acceptance, probe_tree, store_fit
from falcon_core.checkpoint import load_drafter, read_drafter_config
from falcon_core.draft import DraftResult, SARDrafter
from falcon_core.generate import Engine, select_tree
from falcon_core.tree import Tree, build_tree, expected_accepted

ACC = [[0.55, 0.15, 0.08, 0.04], [0.5, 0.12, 0.05], [0.45, 0.1], [0.4, 0.08], [0.35], [0.3]]


def passes(tree: Tree, k: int = 2) -> int:
    return -(-tree.max_depth // k)


@pytest.mark.parametrize(
    ("verify", "draft"),
    [
        (lambda t: 0.020 + 0.0004 * t.num_nodes, lambda t: 0.002 * passes(t)),  # CPU-like: grows with N
        (lambda t: 0.020 + 0.00001 * t.num_nodes, lambda t: 0.001 * passes(t)),  # GPU-like: nearly flat
        (lambda t: 0.020 + 0.01 * t.num_nodes, lambda t: 0.0),  # steep: a single node wins
    ],
)
def test_fit_picks_the_argmax_of_its_cost_model(verify, draft):
    budgets = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48]
    fit = fit_tree(ACC, verify, draft, budgets)
    brute = {
        b: (expected_accepted(t, ACC) + 1) / (verify(t) + draft(t))
        for b in budgets
        for t in [build_tree(ACC, b)]
    }
    best = max(brute, key=brute.__getitem__)
    assert fit.best.budget == best
    assert fit.best.tokens_per_second == pytest.approx(brute[best])
    assert [s.budget for s in fit.budgets] == budgets
    assert all(s.tokens_per_second <= fit.best.tokens_per_second for s in [*fit.budgets, *fit.published])
    assert fit.plain.expected_tokens == 1.0 and fit.plain.draft_seconds == 0.0
    assert [s.name for s in fit.published] == ["kmask2_8layer_tree", "kmask2_8layer_tree_3"]


def test_fit_budget_follows_cost_slope():
    flat = fit_tree(ACC, lambda t: 0.02 + 1e-6 * t.num_nodes, lambda t: 0.0, [1, 4, 16, 48])
    steep = fit_tree(ACC, lambda t: 0.02 + 0.02 * t.num_nodes, lambda t: 0.0, [1, 4, 16, 48])
    assert flat.best.budget == 48 and steep.best.budget == 1
    with pytest.raises(ValueError, match="budgets"):
        fit_tree(ACC, lambda t: 1.0, lambda t: 0.0, [0, 2])


def test_probe_tree_shape():
    t = probe_tree(3, 4)
    assert t.num_nodes == 12 and t.max_depth == 3
    assert {t.path(i) for i in range(12)} == {(0,) * d + (r,) for d in range(3) for r in range(4)}


class RankOracle(SARDrafter):
    """Drafts the target's greedy token at rank `right[d]` of depth d+1 (-1: never), wrong tokens elsewhere."""

    def __init__(self, target, plan, right: list[int]) -> None:
        self.target, self.plan, self.k, self.right = target, plan, plan.k, right

    def propose(self, features, tokens, n, params, generator=None):
        tree = self.plan.tree
        seq = tokens[: n + 1].clone()
        toks = []
        for i in range(tree.num_nodes):
            path = tree.path(i)
            d = len(path) - 1
            if len(seq) <= n + 1 + d:  # extend the greedy continuation to depth d+1
                nxt = self.target(seq[None], torch.arange(seq.shape[0])[None]).logits[0, -1].argmax()
                seq = torch.cat((seq, nxt[None]))
            g = int(seq[n + 1 + d])
            toks.append(
                g if path[-1] == self.right[d] else (g + 7 + path[-1]) % self.target.config.vocab_size
            )
        return DraftResult(torch.tensor(toks), None, self.plan.child_row, 1, 0.0)


class OracleProbe(ProbeEngine):
    def __init__(self, *args, right: list[int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.right = right

    def _make_proposer(self, rows):
        return RankOracle(self.target, self.plan, self.right)


@pytest.fixture(scope="module")
def models(tiny_folder) -> Models:
    return Models(tiny_folder, dtype="fp32", name="tiny-llama")


@pytest.fixture(scope="module")
def drafter(models, drafter_dirs):
    return load_drafter(drafter_dirs["falcon"]).drafter.eval()


def test_probe_counts_ranks_with_oracles(models, drafter):
    ids = models.tokenizer("one two three four five six", add_special_tokens=False)["input_ids"]
    # depth 1: rank 0 right; depth 2: rank 2 right (a leaf, so depth 3 is never reached under the chain)
    engine = OracleProbe(models.target, models.tokenizer, drafter, depth=3, ranks=3, right=[0, 2, 0])
    res = engine.generate(input_ids=ids, max_new_tokens=12)
    steps = res.stats.speculative_steps
    assert steps > 0
    assert engine.events == [steps, steps, 0]
    assert engine.hits == [[steps, 0, 0], [0, 0, steps], [0, 0, 0]]
    assert res.token_ids == models.plain_engine.generate(input_ids=ids, max_new_tokens=12).token_ids
    # depth 1 never right: every step stops there
    engine = OracleProbe(models.target, models.tokenizer, drafter, depth=3, ranks=3, right=[-1, 0, 0])
    res = engine.generate(input_ids=ids, max_new_tokens=6)
    assert engine.events == [res.stats.speculative_steps, 0, 0] and engine.hits[0] == [0, 0, 0]


def test_measure_acceptance_on_random_drafter(models, drafter):
    ids = models.tokenizer("a b c d e f g", add_special_tokens=False)["input_ids"]
    table = measure_acceptance(models.target, models.tokenizer, drafter, [ids], 10, depth=3, ranks=4)
    assert table.steps > 0 and table.events[0] == table.steps
    assert all(sum(h) <= e for h, e in zip(table.hits, table.events, strict=True))
    assert all(0.0 <= a <= 1.0 for row in table.acceptance for a in row)


def test_cost_meter_measures(models, drafter):
    meter = CostMeter(models.target, drafter, context=32, repeats=2)
    chain = Tree.chain(4)
    assert meter.verify(chain) > 0 and meter.draft(chain) > 0
    assert meter.draft(Tree.chain(0)) == 0.0
    assert CostMeter(models.target, None, context=16, repeats=1).draft(chain) == 0.0


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_stored_fit_is_what_auto_builds(tiny_folder, make_drafter, tmp_path, dtype):
    path = make_drafter(tiny_folder, tmp_path / "d", k=2, dtype=dtype)
    before = load_file(str(path / "model.safetensors"))
    fit = fit_tree(ACC, lambda t: 0.02 + 0.0004 * t.num_nodes, lambda t: 0.002 * passes(t), [2, 6, 10, 20])
    card = store_fit(path, fit, {"machine": "test"})
    _, _, stored = read_drafter_config(path)
    assert stored == card and stored["note"] == "random, for tests"  # the rest of the card is kept
    assert stored["tree_budget"] == fit.best.budget and stored["acceptance"] == fit.acceptance
    assert stored["tree_fit"]["machine"] == "test"
    after = load_file(str(path / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == before[k].dtype for k in before)
    want = build_tree(ACC, fit.best.budget)
    assert select_tree("auto", stored).parents == want.parents
    engine = Engine.from_pretrained(str(tiny_folder), drafter=path, dtype="fp32", tree="auto")
    assert engine.tree.parents == want.parents and engine.tree.ranks == want.ranks
    refit = fit_tree([[0.9], [0.8]], lambda t: 0.02, lambda t: 0.0, [1, 2])
    assert store_fit(path, refit)["tree_fit"]["replaced_acceptance"] == fit.acceptance
    again = fit_tree([[0.9], [0.8]], lambda t: 0.03, lambda t: 0.0, [1, 2])  # same table, new costs
    assert store_fit(path, again)["tree_fit"]["replaced_acceptance"] == fit.acceptance  # history kept


def test_tree_fit_command(tiny_folder, make_drafter, tmp_path, capsys):
    path = make_drafter(tiny_folder, tmp_path / "d", k=2)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "one two three"}) + "\n")
    args = ["tree-fit", "--drafter", str(path), "--model", str(tiny_folder), "--prompts", str(prompts)]
    args += ["--max-new-tokens", "6", "--probe-depth", "2", "--probe-ranks", "2", "--budgets", "1,2,3"]
    args += ["--repeats", "1", "--context", "24", "--dtype", "fp32", "--out", str(tmp_path), "--write-card"]
    assert bench_main(args) == 0
    record = json.loads((tmp_path / "tree_fit.json").read_text())
    assert record["best"]["budget"] in (1, 2, 3) and len(record["published"]) == 2
    assert record["acceptance_measurement"]["events"][0] > 0
    assert "fitted" in capsys.readouterr().out
    _, _, card = read_drafter_config(path)
    assert card["tree_budget"] == record["best"]["budget"] and card["acceptance"] == record["acceptance"]
