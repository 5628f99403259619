"""An external engine at world size > 1 against the in-process engine, under torchrun.

torchrun --nproc_per_node 2 tests/engine_dp_check.py --tp 1 --out result.json   (DP2: two engines)
torchrun --nproc_per_node 2 tests/engine_dp_check.py --tp 2 --out result.json   (TP2: one engine)

On the contract suite's tiny Llama (tests/test_engine_contract.py): every rank takes its DP
share of 12 prompts; greedy tokens and log-probs of generation.engine=<engine> vs the
in-process engine on the same policy, before and after the policy's weights move and the engine
is refitted (factory.refit_engine). Rank 0 writes every rank's figures to --out (JSON)."""

import argparse
import json
import time

import torch
import torch.distributed as dist
from test_engine_contract import GREEDY, PAD, STOP, _tiny_model, _Tokenizer

PROMPTS = [[3 + (i % 12), 4 + (i * 5) % 11, 5 + (i * 3) % 10, 2][: 2 + i % 3] + [2] for i in range(12)]


def _compare(engine, reference, prompts, seeds) -> dict:
    start = time.perf_counter()
    got = engine.generate(prompts, 1, GREEDY, seeds)
    seconds = time.perf_counter() - start
    ref = reference.generate(prompts, 1, GREEDY, seeds)
    return {
        "rows": len(prompts),
        "tokens_equal": bool(torch.equal(got.response_tokens, ref.response_tokens)),
        "lengths_equal": bool(torch.equal(got.response_lengths, ref.response_lengths)),
        "max_logprob_diff": float((got.logprobs - ref.logprobs).abs().max()) if len(prompts) else 0.0,
        "generate_seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--engine", default="vllm")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from nemo_optune.config import GenerationConfig, RootConfig
    from nemo_optune.generation.factory import build_engine, refit_engine
    from nemo_optune.generation.megatron_engine import MegatronInProcessEngine
    from nemo_optune.runtime import distributed

    model = _tiny_model(args.tp)
    layout = model.layout
    cfg = RootConfig(generation=GenerationConfig(engine=args.engine, micro_batch_size=64, refit_bucket_mb=1))
    engine = build_engine(cfg, model, _Tokenizer())
    reference = MegatronInProcessEngine(model, [STOP], PAD, micro_batch_size=64)
    mine = distributed.dp_share(torch.arange(len(PROMPTS)), layout)[0].tolist()
    prompts, seeds = [PROMPTS[i] for i in mine], [100 + i for i in mine]
    result = {"rank": layout.rank, "dp_rank": layout.dp_rank, "prompts": mine, "before": None, "after": None}
    result["before"] = _compare(engine, reference, prompts, seeds)
    with torch.no_grad():  # move every weight: pointwise, so TP shards and DP replicas stay one model
        for p in model.policy.parameters():
            p.add_(0.2 * torch.cos(37 * p))
    result["after_stale"] = _compare(engine, reference, prompts, seeds)  # not refitted yet: differs
    result["refit"] = {k: v for k, v in refit_engine(engine, model).items() if "refit" in k or "engine" in k}
    result["after"] = _compare(engine, reference, prompts, seeds)
    result["leads"] = engine.placement.leads
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, result)
    if layout.rank == 0:
        with open(args.out, "w") as f:
            json.dump(everyone, f, indent=1)
    engine.shutdown()
    distributed.shutdown()


if __name__ == "__main__":
    main()
