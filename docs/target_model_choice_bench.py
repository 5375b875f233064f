"""Measure a target forward over T new tokens under a tree mask with a 200-row cache: native vs HF.

Run: .venv/bin/python docs/target_model_choice_bench.py  (SmolLM2-135M-Instruct, 2 threads).
Native: TargetModel with a preallocated KVCache (cache_pos=200, no commit).
HF: transformers' LlamaForCausalLM with a DynamicCache prefilled to 200 rows, a custom 4D bool mask
(1, 1, T, 200+T) and explicit position_ids, cropped back to 200 rows after each step (the rollback a
verifier needs; timed with the forward).
Each point: 2 warm-up runs, then the median (and min) of REPEATS timed runs, interleaving native and HF so a
busy neighbour on the shared CPU hits both alike.
"""

import os
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from falcon_core.masks import with_prefix
from falcon_core.resolve import resolve_model
from falcon_core.target import DTYPES, load_target

CTX, SIZES, REPEATS = 200, (1, 8, 16, 32, 64), int(os.environ.get("REPEATS", "15"))


def tree(T, g):
    """Random parents -> (T, T) tree mask (node sees itself and its ancestors) and depths."""
    mask = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        p = int(torch.randint(-1, i, (1,), generator=g)) if i else -1
        if p >= 0:
            mask[i] = mask[p]
        mask[i, i] = True
    return mask, mask.sum(1) - 1


def time_point(ours, hf, cache, hf_cache, T, g):
    """Median and min ms of one native and one HF tree step of T tokens, and their max logit difference."""
    tree_mask, depth = tree(T, g)
    ids = torch.randint(0, ours.config.vocab_size, (1, T), generator=g)
    pos = (CTX + depth)[None]  # (1, T)
    mask = with_prefix(tree_mask, CTX)  # (T, CTX + T)

    def native():
        return ours(ids, pos, cache, CTX, mask).logits

    def hf_step():
        out = hf(
            ids, attention_mask=mask[None, None], position_ids=pos, cache=hf_cache, use_cache=True
        ).logits
        hf_cache.crop(-T)
        return out

    times = {"native": [], "hf": []}
    with torch.no_grad():
        diff = (native().float() - hf_step().float()).abs().max().item()
        for _ in range(2):
            native(), hf_step()
        for _ in range(REPEATS):
            for name, fn in (("native", native), ("hf", hf_step)):
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}, diff


def main(dtype):
    torch.set_num_threads(2)
    folder = resolve_model("smollm2-135m-instruct")
    ours = load_target(folder, dtype=dtype)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype], attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, ours.config.vocab_size, (1, CTX), generator=g)
    cache = ours.new_cache(CTX + max(SIZES))
    hf_cache = DynamicCache(config=hf.config)
    with torch.no_grad():
        ours(prompt, torch.arange(CTX)[None], cache, 0)
        cache.commit(torch.arange(CTX), 0)
        hf(prompt, cache=hf_cache, use_cache=True)
    print(f"dtype={dtype} threads={torch.get_num_threads()} ctx={CTX} repeats={REPEATS} (ms)", flush=True)
    for T in SIZES:
        t, diff = time_point(ours, hf, cache, hf_cache, T, g)
        (n, n_min), (h, h_min) = t["native"], t["hf"]
        print(
            f"T={T:3d} median native {n:7.1f} hf {h:7.1f} hf/native {h / n:4.2f} | "
            f"min native {n_min:6.1f} hf {h_min:6.1f} hf/native {h_min / n_min:4.2f} | max|dlogits| {diff:.1e}",
            flush=True,
        )


if __name__ == "__main__":
    for dt in sys.argv[1:] or ["bf16", "fp32"]:
        main(dt)
