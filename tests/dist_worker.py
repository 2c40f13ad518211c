"""One rank of a data-parallel pass, for tests/test_distributed.py (run under torchrun; not a test module).

    torchrun --nproc-per-node 2 tests/dist_worker.py CASE OUT_DIR

Every rank transforms the same tiny model on its own shard (:func:`shards`) and writes ``OUT_DIR/rank{r}.pt``
(the plan as JSON, the logits on fixed tokens) or, when the pass raised, ``OUT_DIR/rank{r}.err`` (the exception's
type and message) and exits with status 3.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings

import torch

import sketchpass as sp

CASES = {
    # case: (batches of rank 0, of rank 1, options)
    "even": (8, 8, {"method": "auto", "blocks": "on"}),  # holdout 8: each rank holds out its 8th batch
    "uneven": (8, 3, {"method": "svd", "holdout": 0, "rounds": 0}),
    "bad-shard": (8, 8, {"method": "svd", "blocks": "on"}),  # rank 1's third batch holds a NaN
    "oom": (8, 8, {"method": "svd"}),  # rank 1 runs out of memory in the refit
    "candidates": (8, 8, {"method": "svd", "blocks": "on"}),  # rank 1 fails on the second block's candidates
    "moe": (6, 4, {"method": "svd", "holdout": 0}),  # a mixture-of-experts decoder, its fused experts taken apart
}


def model(case: str = "even"):
    import transformers

    if case == "moe":
        cfg = transformers.Qwen3MoeConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=48,
                                          moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2, head_dim=8,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=96, pad_token_id=0,
                                          bos_token_id=1, eos_token_id=2, use_cache=False)
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            moe = transformers.Qwen3MoeForCausalLM(cfg).eval()
        with torch.no_grad():  # its expert weights are initialised to zero
            for p in moe.parameters():
                p.normal_(0, 0.1)
        return moe
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64, vocab_size=96, pad_token_id=0,
                                   bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM(cfg).eval()


def shards(case: str) -> list[list[dict]]:
    """The batches of each rank (rank 0's first: their concatenation is the single-process data)."""
    n0, n1, _ = CASES[case]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (2 * (n0 + n1), 12), generator=g)
    batches = [{"input_ids": ids[i:i + 2]} for i in range(0, len(ids), 2)]
    return [batches[:n0], batches[n0:]]


def options(case: str) -> dict:
    return {"progress": False, **CASES[case][2]}


def probe() -> torch.Tensor:
    return torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(7))


def main() -> int:
    case, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    d = sp.distributed.init(backend="gloo", timeout_s=60)
    rank = d.rank
    data = shards(case)[rank]
    if case == "bad-shard" and rank == 1:
        data[2] = {"input_ids": data[2]["input_ids"], "attention_mask": torch.full((2, 12), float("nan"))}
    if case == "oom" and rank == 1:  # fault injection: the third refit input this rank reads fails
        from sketchpass.fx.frontend import TorchFrontend

        real, calls = TorchFrontend.site_inputs, [0]

        def failing(self, env, site, **kw):
            calls[0] += 1
            if calls[0] == 3:
                raise MemoryError("simulated: out of memory")
            return real(self, env, site, **kw)

        TorchFrontend.site_inputs = failing
    if case == "candidates" and rank == 1:
        import sketchpass.pipeline as pipeline

        real_candidates, seen = pipeline.candidates, [0]

        def failing_candidates(*a, **k):
            seen[0] += 1
            if seen[0] == 3:  # the layers outside the blocks, block 0, then block 1
                raise MemoryError("simulated: out of memory in an eigendecomposition")
            return real_candidates(*a, **k)

        pipeline.candidates = failing_candidates
    try:
        small = sp.transform(model(case), sp.Budget(params=0.7), calib=data, **options(case))
    except Exception as exc:  # noqa: BLE001 - written for the test to read
        with open(os.path.join(out, f"rank{rank}.err"), "w") as f:
            f.write(f"{type(exc).__name__}: {exc}\n")
        traceback.print_exc()
        return 3
    with torch.no_grad():
        logits = small(input_ids=probe()).logits
    torch.save({"plan": small.sketchpass_plan.to_json(), "logits": logits}, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
