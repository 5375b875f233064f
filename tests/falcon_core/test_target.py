"""TargetModel vs transformers (fp32, same weights): prompts, tree steps, cache, commit, loader errors."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from falcon_core.masks import causal_mask, with_prefix
from falcon_core.target import TargetConfig, TargetModel, load_target

TOL = 1e-4
VOCAB = 320
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
FAMILIES = {
    "llama-tied-gqa": (LlamaForCausalLM, LlamaConfig, {"tie_word_embeddings": True}),
    "llama-untied-mha": (LlamaForCausalLM, LlamaConfig, {"num_key_value_heads": 4}),
    "llama-bias": (LlamaForCausalLM, LlamaConfig, {"attention_bias": True}),
    "llama3-rope": (LlamaForCausalLM, LlamaConfig, {"rope_theta": 500000.0, "rope_scaling": LLAMA3}),
    "linear-rope": (LlamaForCausalLM, LlamaConfig, {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "qwen2-qkv-bias": (Qwen2ForCausalLM, Qwen2Config, {}),
    "mistral": (MistralForCausalLM, MistralConfig, {"sliding_window": None}),
}


def make_pair(tmp_path, family, seed=0):
    """A tiny random HF model (init std 0.1, so RoPE/bias mistakes show) and our load of its folder."""
    model_cls, config_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    kw = {"num_key_value_heads": 2, **extra}
    cfg = config_cls(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        initializer_range=0.1,
        **kw,
    )
    hf = model_cls(cfg).eval()
    if family in ("llama-bias", "qwen2-qkv-bias"):
        for name, p in hf.named_parameters():  # HF zero-inits biases; make them matter
            if name.endswith("bias"):
                torch.nn.init.normal_(p, std=0.1)
    hf.save_pretrained(tmp_path / family)
    return hf, load_target(tmp_path / family, dtype="fp32")


@torch.no_grad()
def hf_logits(hf, ids):
    return hf(torch.tensor([ids])).logits[0]  # (T, V)


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_prompt_logits_and_hidden_equal_transformers(tmp_path, family):
    hf, ours = make_pair(tmp_path, family)
    assert (ours.lm_head.weight is ours.embed.weight) == ours.config.tie_word_embeddings
    ids = torch.randint(0, VOCAB, (1, 200))
    ref = hf(ids, output_hidden_states=True)
    out = ours(ids, torch.arange(200)[None])
    assert out.logits.shape == (1, 200, VOCAB) and out.hidden.shape == (1, 200, 64)
    assert (out.logits - ref.logits).abs().max() <= TOL
    assert (out.hidden - ref.hidden_states[-1]).abs().max() <= TOL
    # the same prompt through a cache, in one prefill
    cache = ours.new_cache(256)
    cached = ours(ids, torch.arange(200)[None], cache, 0, causal_mask(200))
    assert (cached.logits - ref.logits).abs().max() <= TOL


def test_config_fields_from_hf(tmp_path):
    _, ours = make_pair(tmp_path, "llama3-rope")
    c = ours.config
    assert (c.model_type, c.num_kv_heads, c.head_dim, c.rope_theta) == ("llama", 2, 16, 500000.0)
    assert c.rope_scaling.kind == "llama3" and c.rope_scaling.original_max_position_embeddings == 64
    _, qwen = make_pair(tmp_path, "qwen2-qkv-bias")
    assert qwen.config.attention_bias and not qwen.config.attention_out_bias
    assert qwen.layers[0].self_attn.q_proj.bias is not None and qwen.layers[0].self_attn.o_proj.bias is None


@torch.no_grad()
def test_logits_index_selects_rows(tmp_path):
    _, ours = make_pair(tmp_path, "llama-tied-gqa")
    ids = torch.randint(0, VOCAB, (2, 10))
    pos = torch.arange(10).expand(2, 10)
    full = ours(ids, pos)
    some = ours(ids, pos, logits_index=torch.tensor([9, 3]))
    none = ours(ids, pos, logits_index=torch.tensor([], dtype=torch.long))
    assert torch.equal(some.logits, full.logits[:, [9, 3]])
    assert none.logits.shape == (2, 0, VOCAB) and torch.equal(none.hidden, full.hidden)


# A tree of 7 nodes under the root (= the bonus token): parents in BFS order, -1 = child of the root.
PARENTS = [-1, -1, -1, 0, 0, 1, 3, 3]


def tree_mask_and_depth(parents):
    """Row 0 is the root; a node's row is its parent's row plus itself."""
    n = len(parents) + 1
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[0, 0] = True
    for i, p in enumerate(parents, start=1):
        mask[i] = mask[p + 1]
        mask[i, i] = True
    return mask, mask.sum(1) - 1  # (N+1, N+1), depth (N+1,)


def root_to_leaf_paths(parents):
    """Each leaf's path as indices into [root] + nodes, root first."""
    n = len(parents)
    leaves = [i for i in range(n) if i not in parents]
    paths = []
    for leaf in leaves:
        path, node = [], leaf
        while node != -1:
            path.append(node + 1)
            node = parents[node]
        paths.append([0, *reversed(path)])
    return paths


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_tree_step_equals_each_branch_in_transformers(tmp_path, family):
    hf, ours = make_pair(tmp_path, family)
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, VOCAB, (150,), generator=g).tolist()
    tree_tokens = torch.randint(0, VOCAB, (len(PARENTS) + 1,), generator=g)  # [root] + nodes
    cache = ours.new_cache(256)
    ours(torch.tensor([prefix]), torch.arange(150)[None], cache, 0)
    cache.commit(torch.arange(150), 0)
    mask, depth = tree_mask_and_depth(PARENTS)
    out = ours(tree_tokens[None], (150 + depth)[None], cache, 150, with_prefix(mask, 150))  # (1, N+1, V)
    for path in root_to_leaf_paths(PARENTS):
        ref = hf_logits(hf, prefix + tree_tokens[path].tolist())[150:]  # (len(path), V)
        assert (out.logits[0, path] - ref).abs().max() <= TOL, path


@pytest.mark.parametrize("family", ["llama-tied-gqa", "mistral"])
@torch.no_grad()
def test_cached_token_by_token_equals_uncached(tmp_path, family):
    _, ours = make_pair(tmp_path, family)
    ids = torch.randint(0, VOCAB, (1, 60))
    full = ours(ids, torch.arange(60)[None]).logits  # (1, 60, V)
    cache = ours.new_cache(64)
    steps = [ours(ids[:, :40], torch.arange(40)[None], cache, 0).logits]
    cache.commit(torch.arange(40), 0)
    for t in range(40, 60):
        steps.append(ours(ids[:, t : t + 1], torch.tensor([[t]]), cache, cache.length).logits)
        cache.commit(torch.tensor([t]), t)
    assert cache.length == 60
    assert (torch.cat(steps, 1) - full).abs().max() <= TOL


@torch.no_grad()
def test_commit_accepted_path_then_continue_equals_plain_run(tmp_path):
    """Verify a tree, keep one root-to-leaf path by compaction, decode on: == the plain sequence."""
    _, ours = make_pair(tmp_path, "qwen2-qkv-bias")
    g = torch.Generator().manual_seed(2)
    prefix = torch.randint(0, VOCAB, (1, 30), generator=g)
    tree_tokens = torch.randint(0, VOCAB, (1, len(PARENTS) + 1), generator=g)
    tail = torch.randint(0, VOCAB, (1, 5), generator=g)
    cache = ours.new_cache(64)
    ours(prefix, torch.arange(30)[None], cache, 0)
    cache.commit(torch.arange(30), 0)
    mask, depth = tree_mask_and_depth(PARENTS)
    ours(tree_tokens, (30 + depth)[None], cache, 30, with_prefix(mask, 30))
    accepted = torch.tensor([0, 1, 4, 7])  # root -> node 0 -> node 3 -> node 6
    assert accepted.tolist() in root_to_leaf_paths(PARENTS)
    cache.commit(30 + accepted, 30)
    assert cache.length == 34
    cont = ours(tail, torch.arange(34, 39)[None], cache, 34).logits
    plain = ours(torch.cat((prefix, tree_tokens[:, accepted], tail), 1), torch.arange(39)[None]).logits
    assert (cont - plain[:, 34:]).abs().max() <= TOL


@torch.no_grad()
def test_batched_right_padding_without_cache(tmp_path):
    """Hidden-state caching: B=2 right-padded under a (B, T, T) mask == each sequence alone."""
    _, ours = make_pair(tmp_path, "llama-tied-gqa")
    a, b = torch.randint(0, VOCAB, (1, 12)), torch.randint(0, VOCAB, (1, 7))
    ids = torch.cat((a, torch.cat((b, torch.zeros(1, 5, dtype=torch.long)), 1)))  # (2, 12)
    mask = causal_mask(12).expand(2, 12, 12).clone()
    mask[1, :, 7:] = False  # padded keys hidden
    mask[1, 7:, 7:] = torch.eye(5, dtype=torch.bool)  # padded queries see themselves only (no NaN rows)
    out = ours(
        ids, torch.arange(12).expand(2, 12), mask=mask, logits_index=torch.tensor([], dtype=torch.long)
    )
    assert torch.allclose(out.hidden[0], ours(a, torch.arange(12)[None]).hidden[0], atol=TOL)
    assert torch.allclose(out.hidden[1, :7], ours(b, torch.arange(7)[None]).hidden[0], atol=TOL)


def test_bf16_and_fp16_load(tmp_path):
    make_pair(tmp_path, "llama-tied-gqa")
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        m = load_target(tmp_path / "llama-tied-gqa", dtype=dtype)
        assert m.embed.weight.dtype == torch_dtype and m.new_cache(8).k.dtype == torch_dtype
        out = m(torch.tensor([[1, 2, 3]]), torch.arange(3)[None])
        assert out.logits.dtype == torch_dtype and torch.isfinite(out.logits).all()


def test_forward_contract_errors(tmp_path):
    _, ours = make_pair(tmp_path, "llama-tied-gqa")
    ids, pos = torch.tensor([[1, 2, 3]]), torch.arange(3)[None]
    with pytest.raises(ValueError, match="input_ids must be a"):
        ours(ids.int(), pos)
    with pytest.raises(ValueError, match="positions must be a long tensor of shape"):
        ours(ids, pos[:, :2])
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        ours(ids, pos, mask=torch.ones(3, 3))
    with pytest.raises(ValueError, match=r"mask must have shape \(T, S\) = \(3, 5\)"):
        ours(ids, pos, ours.new_cache(8), 2, torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="do not fit the cache"):
        ours(ids, pos, ours.new_cache(4), 2)
    with pytest.raises(ValueError, match="allocated for batch 2"):
        ours(ids, pos, ours.new_cache(8, batch=2), 0)
    with pytest.raises(ValueError, match="without a cache"):
        ours(ids, pos, None, 2)


def test_loader_errors(tmp_path):
    hf, _ = make_pair(tmp_path, "llama-tied-gqa")
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_target(tmp_path / "llama-tied-gqa", dtype="int8")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_target(tmp_path / "nope")
    pickle_dir = tmp_path / "pickle"
    pickle_dir.mkdir()
    (pickle_dir / "config.json").write_text((tmp_path / "llama-tied-gqa" / "config.json").read_text())
    torch.save(hf.state_dict(), pickle_dir / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"only pickle checkpoints.*pytorch_model\.bin.*safetensors"):
        load_target(pickle_dir)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((tmp_path / "llama-tied-gqa" / "config.json").read_text())
    sd = {k: v.clone() for k, v in hf.state_dict().items() if "layers.1." not in k and k != "lm_head.weight"}
    save_file(sd, partial / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \['layers.1.input_layernorm.weight'"):
        load_target(partial)
    cfg = json.loads((tmp_path / "llama-tied-gqa" / "config.json").read_text())
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        TargetConfig.from_hf({**cfg, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="hidden_act"):
        TargetConfig.from_hf({**cfg, "hidden_act": "gelu"})


def test_sharded_safetensors_index(tmp_path):
    hf, ours = make_pair(tmp_path, "llama-untied-mha")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    sharded = load_target(tmp_path / "sharded")
    ids = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        assert torch.equal(
            sharded(ids, torch.arange(20)[None]).logits, ours(ids, torch.arange(20)[None]).logits
        )


def test_sliding_window_is_enforced(tmp_path):
    cfg = TargetConfig(
        model_type="mistral", vocab_size=10, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
        num_kv_heads=1, head_dim=4, rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=64,
        sliding_window=4,
    )  # fmt: skip
    m = TargetModel(cfg)
    m(torch.tensor([[1, 2, 3, 4]]), torch.arange(4)[None])
    with pytest.raises(ValueError, match="sliding window"):
        m(torch.tensor([[1, 2, 3, 4, 5]]), torch.arange(5)[None])


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_135m_logits_equal_transformers():
    """The real SmolLM2-135M-Instruct in fp32: our logits vs transformers' on a 200-token prompt, and on
    a tree step after it (the engine's own `TreeBuffers`: mask, positions, root-to-leaf paths) against
    each branch run alone by transformers."""
    from transformers import AutoModelForCausalLM

    from falcon_core.resolve import resolve_model
    from falcon_core.tree import Tree, TreeBuffers

    folder = resolve_model("smollm2-135m-instruct")
    ours = load_target(folder, dtype="fp32")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ours.config.vocab_size, (1, 200), generator=g)
    cache = ours.new_cache(256)
    diff = (ours(ids, torch.arange(200)[None], cache, 0).logits - hf(ids).logits).abs().max().item()
    assert diff <= TOL, diff
    cache.commit(torch.arange(200), 0)
    b = TreeBuffers.from_tree(
        Tree.from_spec("t", {1: "root:0-2", 2: "0:0-1 1:0", 3: "00:0-1 10:0", 4: "000:0"})
    )
    tree_tokens = torch.randint(0, ours.config.vocab_size, (b.num_nodes + 1,), generator=g)  # [root] + nodes
    out = ours(tree_tokens[None], (200 + b.position_offsets)[None], cache, 200, with_prefix(b.mask, 200))
    assert b.paths.shape[0] == 5  # leaves (rank paths): 2, 01, 001, 100, 0000
    for path in b.paths:
        path = path[path >= 0]
        ref = hf(torch.cat((ids[0], tree_tokens[path]))[None]).logits[0, 200:]  # (len(path), V)
        diff = (out.logits[0, path] - ref).abs().max().item()
        assert diff <= TOL, (path.tolist(), diff)
