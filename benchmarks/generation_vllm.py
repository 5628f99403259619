"""Rollout throughput of vLLM (generation.engine=vllm) against the in-process KV-cached megatron
engine, on the same random weights, prompts and sampling (top-p 0.9), in one process.

    .venv-vllm/bin/python benchmarks/generation_vllm.py [--cases tiny_h32 llama20m_64] [--repeats 3]
    .venv-vllm/bin/python benchmarks/generation_vllm.py --cases smollm2_64 smollm2_256 \
        --model runs/models/smollm2-135m-instruct     # the real model, as benchmarks/generation.py's cases

Needs vllm (make test-vllm builds .venv-vllm). vLLM's CPU attention has no head size 16, so the
cases use head size 32 or 64 (the built-in recipe's 4 heads of 16 do not run on vLLM on CPU).
Stops are switched off: every response has exactly max_new_tokens tokens. Also reported: one
refit (the policy's weights streamed into vLLM) and vLLM's start-up (export + engine start).
"""

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (config overrides, prompts, samples per prompt, new tokens)
CASES = {
    # The OPTune run's shape (optune_tiny with 2 heads of 32): one regeneration's 128 x 4 rows.
    "tiny_h32": (["model.num_attention_heads=2", "model.num_query_groups=1"], 128, 4, 10),
    "llama20m_64": (
        ["model.hidden_size=512", "model.num_layers=6", "model.num_attention_heads=8", "model.num_query_groups=4"],
        32,
        2,
        64,
    ),
    # SmolLM2-135M-Instruct (--model) on demo_real's prompts: generation.py's cases of the same name.
    **{f"smollm2_{new}": ([], 16, 2, new) for new in (64, 256)},
}


def run_case(name: str, repeats: int, model_dir: str | None = None) -> dict:
    import torch
    from generation import best_seconds, policy_case  # benchmarks/generation.py

    from nemo_optune.generation.base import SamplingParams
    from nemo_optune.generation.factory import build_engine, refit_engine
    from nemo_optune.generation.megatron_engine import MegatronInProcessEngine

    overrides, num_prompts, samples, new = CASES[name]
    with tempfile.TemporaryDirectory() as tmp:
        case_overrides = overrides + ["generation.micro_batch_size=512", "generation.engine=vllm"]
        cfg, trainer, model, prompts, seeds = policy_case(name, model_dir, case_overrides, num_prompts, new, tmp)
        tok = trainer.tokenizer
        params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=new)
        rows = num_prompts * samples
        result = {
            "case": name,
            "prompts": num_prompts,
            "samples": samples,
            "new_tokens": new,
            "hidden": model.spec.hidden_size,
            "layers": model.spec.num_layers,
            "heads": model.spec.num_attention_heads,
            "threads": torch.get_num_threads(),
        }

        megatron = MegatronInProcessEngine(model, tok.eos_ids, tok.pad_id, 512)
        megatron.stop_ids = torch.tensor([], dtype=torch.long)
        start = time.perf_counter()
        vllm = build_engine(cfg, model, tok)
        vllm.start()
        result["vllm_start_seconds"] = time.perf_counter() - start
        vllm.backend.stop_ids, vllm.backend.ignore_eos = [], True

        def generate_with(engine):
            def go():
                out = engine.generate(prompts, samples, params, seeds)
                assert int(out.response_lengths.min()) == new, out.response_lengths.min()

            return go

        timed = best_seconds({"megatron": generate_with(megatron), "vllm": generate_with(vllm)}, repeats)
        for label, seconds in timed.items():
            result[f"{label}_responses_per_s"] = rows / seconds
            result[f"{label}_tokens_per_s"] = rows * new / seconds
            result[f"{label}_ms_per_step"] = 1000 * seconds / new
        refits = [refit_engine(vllm, model) for _ in range(max(1, repeats))]
        result["vllm_refit_seconds"] = min(r["timing/refit_seconds"] for r in refits)
        result["vllm_refit_bytes"] = refits[0]["refit_bytes"]
        result["vllm_over_megatron"] = result["vllm_responses_per_s"] / result["megatron_responses_per_s"]
        vllm.shutdown()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cases", nargs="*", default=[c for c in CASES if not c.startswith("smollm2")], choices=list(CASES)
    )
    parser.add_argument("--model", help="HF directory of the smollm2_* cases (runs/models/smollm2-135m-instruct)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after a warm-up (best is kept)")
    args = parser.parse_args()
    if any(c.startswith("smollm2") for c in args.cases) and not (
        args.model and os.path.isfile(os.path.join(args.model, "config.json"))
    ):
        parser.error("--model: the smollm2_* cases need the HF directory of SmolLM2 (make demo-real)")
    sys.path.insert(0, ROOT)
    rows = []
    for name in args.cases:  # one process: megatron's parallel state is initialised once and reused
        rows.append(run_case(name, args.repeats, args.model))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'case':<14}{'megatron resp/s':>17}{'vllm resp/s':>13}{'ratio':>8}{'refit s':>9}{'vllm start s':>14}")
    for r in rows:
        print(
            f"{r['case']:<14}{r['megatron_responses_per_s']:>17.0f}{r['vllm_responses_per_s']:>13.0f}"
            f"{r['vllm_over_megatron']:>8.2f}{r['vllm_refit_seconds']:>9.3f}{r['vllm_start_seconds']:>14.1f}"
        )


if __name__ == "__main__":
    main()
