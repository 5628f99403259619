"""Rollout throughput: the recompute engine, the KV-cached engine (megatron's
models/kv_cache.py) and, from the same weights, Hugging Face `generate` with its KV cache.

    .venv/bin/python benchmarks/generation.py            # the random-weight cases, one JSON line each + a table
    .venv/bin/python benchmarks/generation.py --cases tiny --no-hf
    .venv/bin/python benchmarks/generation.py --cases smollm2_64 smollm2_256 --no-recompute \
        --model runs/models/smollm2-135m-instruct [--profile]      # the real model (make demo-real)

Random weights, or (smollm2_*) SmolLM2-135M-Instruct on demo_real's instruction prompts; stops
are switched off so that every response has exactly max_new_tokens tokens (a random model would
otherwise stop at once). --profile adds a torch.profiler table of one KV-cached call per case. Each case runs in its own process
(megatron's parallel state is per process); the engines of a case run in the same process on
the same prompts, their timed calls interleaved (best of --repeats rounds), so their ratios
are measured under the same load.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LLAMA_20M = ["model.hidden_size=512", "model.num_layers=6", "model.num_attention_heads=8", "model.num_query_groups=4"]
# name: (config overrides, prompts, samples per prompt, new tokens, micro-batch size)
CASES = {
    "tiny": ([], 256, 4, 10, 256),
    "wide_64": (
        ["model.hidden_size=128", "model.num_layers=4", "model.num_attention_heads=8", "model.num_query_groups=4"],
        32,
        2,
        64,
        64,
    ),
    "wide_256": (
        ["model.hidden_size=128", "model.num_layers=4", "model.num_attention_heads=8", "model.num_query_groups=4"],
        8,
        2,
        256,
        16,
    ),
    # The issue-14 yardstick: a Llama-shaped model of ~20M parameters (hidden 512, 6 layers, GQA).
    **{f"llama20m_{new}": (LLAMA_20M, 32, 2, new, 64) for new in (16, 64, 256)},
    # The real model (30 layers, hidden 576, vocabulary 49,152): 16 prompts x 2 samples in one micro-batch.
    **{f"smollm2_{new}": ([], 16, 2, new, 32) for new in (64, 256)},
}
REAL_CASES = ("smollm2_64", "smollm2_256")


def best_seconds(fns: dict, repeats: int) -> dict:
    """{name: best of `repeats` timed calls of fns[name]} after one warm-up call each. The calls
    are interleaved (a round calls every fn once), so a slow spell of a shared machine hits
    every engine alike."""
    for fn in fns.values():
        fn()  # warm-up
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def recipe_trainer(recipe: str, overrides: list[str], new: int | None, tmp: str):
    """(cfg, its PreferenceTrainer) of `recipe` with `overrides`, quiet, its experiment directory
    under `tmp`, generating `new` tokens (None: the recipe's)."""
    from nemo_optune.config import load_config
    from nemo_optune.data.task_data import build_task_data
    from nemo_optune.runtime.experiment import ExperimentLog
    from nemo_optune.trainers.common import setup
    from nemo_optune.trainers.preference import PreferenceTrainer

    cfg = load_config(
        recipe,
        overrides
        + [
            f"exp_manager.exp_dir={tmp}/exp",
            "exp_manager.tensorboard=false",
            "exp_manager.report=false",
        ]
        + ([f"generation.max_new_tokens={new}"] if new is not None else []),
    )
    return cfg, PreferenceTrainer(
        cfg, setup(cfg), build_task_data(cfg.data), ExperimentLog("", enabled=False, tensorboard=False)
    )


def random_policy_case(overrides: list[str], num_prompts: int, new: int, tmp: str):
    """(cfg, its trainer, a policy with random weights, prompts, per-prompt seeds) of a case: the
    optune_tiny recipe with `overrides`, its training prompts cycled to num_prompts. (The
    trainer's own policy is built empty, for an SFT checkpoint to fill.)"""
    from nemo_optune.models.gpt_optune import MegatronGPTOPTuneModel

    cfg, trainer = recipe_trainer("optune_tiny", overrides, new, tmp)
    # Random weights (the trainer's policy is built empty, for the SFT checkpoint to fill).
    model = MegatronGPTOPTuneModel(
        cfg.model,
        trainer.model.spec,
        trainer.model.layout,
        seed=0,
        with_reference=False,
        tokenizer=trainer.tokenizer,
    )
    ids = trainer.pool.prompt_ids
    return cfg, trainer, model, [ids[i % len(ids)] for i in range(num_prompts)], list(range(num_prompts))


def real_policy_case(model_dir: str, overrides: list[str], num_prompts: int, new: int, tmp: str):
    """As random_policy_case, with the weights of the HF directory model_dir and the demo_real
    recipe's instruction prompts (chat template applied)."""
    cfg, trainer = recipe_trainer("demo_real", overrides + [f"model.restore_from_path={model_dir}"], new, tmp)
    trainer.model.load_policy(model_dir)
    ids = trainer.pool.prompt_ids
    return cfg, trainer, trainer.model, [ids[i % len(ids)] for i in range(num_prompts)], list(range(num_prompts))


def profile_table(fn, rows: int = 25) -> str:
    """torch.profiler's operator table (self CPU time) of one call of fn."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def policy_case(name: str, model_dir: str | None, overrides: list[str], num_prompts: int, new: int, tmp: str):
    """The case's policy and prompts: SmolLM2 from model_dir (REAL_CASES) or random weights."""
    if name in REAL_CASES:
        return real_policy_case(model_dir, overrides, num_prompts, new, tmp)
    return random_policy_case(overrides, num_prompts, new, tmp)


def run_case(name: str, engines: list[str], repeats: int, model_dir: str | None = None, profile: bool = False) -> dict:
    import torch

    from nemo_optune.generation.base import SamplingParams
    from nemo_optune.generation.megatron_engine import MegatronInProcessEngine, MegatronRecomputeEngine

    overrides, num_prompts, samples, new, mbs = CASES[name]
    with tempfile.TemporaryDirectory() as tmp:
        case_overrides = overrides + [f"generation.micro_batch_size={mbs}"]
        cfg, trainer, model, prompts, seeds = policy_case(name, model_dir, case_overrides, num_prompts, new, tmp)
        tok = trainer.tokenizer
        params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=new)
        rows = num_prompts * samples
        result = {
            "case": name,
            "prompts": num_prompts,
            "samples": samples,
            "new_tokens": new,
            "micro_batch": mbs,
            "hidden": model.spec.hidden_size,
            "layers": model.spec.num_layers,
            "vocab": model.vocab_size,
            "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts),
            "threads": torch.get_num_threads(),
        }
        timed = {}
        for engine_name in engines:
            if engine_name == "hf":
                timed["hf"] = _hf_generate(model, tok.pad_id, prompts, samples, new, mbs, tmp)
                continue
            cls = MegatronRecomputeEngine if engine_name == "recompute" else MegatronInProcessEngine
            engine = cls(model, tok.eos_ids, tok.pad_id, mbs)
            engine.stop_ids = torch.tensor([], dtype=torch.long)  # fixed-length responses

            def go(engine=engine):
                out = engine.generate(prompts, samples, params, seeds)
                assert int(out.response_lengths.min()) == new

            timed[engine_name] = go
        for engine_name, seconds in best_seconds(timed, repeats).items():
            result[f"{engine_name}_responses_per_s"] = rows / seconds
            result[f"{engine_name}_tokens_per_s"] = rows * new / seconds
            result[f"{engine_name}_ms_per_step"] = 1000 * seconds / new  # one decoding step of all rows
        if profile and "cached" in timed:
            print(f"[profile] {name}: one KV-cached call\n{profile_table(timed['cached'])}", file=sys.stderr)
    if "recompute_responses_per_s" in result and "cached_responses_per_s" in result:
        result["cached_over_recompute"] = result["cached_responses_per_s"] / result["recompute_responses_per_s"]
    if "hf_responses_per_s" in result and "cached_responses_per_s" in result:
        result["cached_over_hf"] = result["cached_responses_per_s"] / result["hf_responses_per_s"]
    return result


def _hf_generate(model, pad_id, prompts, samples, new, mbs, tmp):
    """A call of transformers' `generate` (sampling, top-p 0.9, KV cache) on the exported weights,
    over the same rows in chunks of the micro-batch size."""
    import torch
    import transformers

    from nemo_optune.models.hf_io import export_hf

    export_hf(model, f"{tmp}/hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(f"{tmp}/hf", dtype=torch.float32).eval()
    rows = [p for p in prompts for _ in range(samples)]

    def go():
        for start in range(0, len(rows), mbs):
            chunk = rows[start : start + mbs]
            width = max(map(len, chunk))
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk])  # left padding
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            with torch.no_grad():
                out = hf.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=True,
                    top_p=0.9,
                    top_k=0,
                    temperature=1.0,
                    max_new_tokens=new,
                    min_new_tokens=new,
                    pad_token_id=pad_id,
                    eos_token_id=None,
                )
            assert out.shape[1] == width + new

    return go


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=[c for c in CASES if c not in REAL_CASES], choices=list(CASES))
    parser.add_argument("--model", help="HF directory of the smollm2_* cases (runs/models/smollm2-135m-instruct)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of the KV-cached engine")
    parser.add_argument("--no-hf", action="store_true", help="leave out transformers' generate")
    parser.add_argument("--no-recompute", action="store_true", help="leave out the recompute engine")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after a warm-up (best is kept)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a case, in this process
    parser.add_argument("--engines", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if any(c in REAL_CASES for c in args.cases) and not (
        args.model and os.path.isfile(os.path.join(args.model, "config.json"))
    ):
        parser.error(f"--model: cases {', '.join(REAL_CASES)} need the HF directory of SmolLM2 (make demo-real)")
    if args.one:
        sys.path.insert(0, ROOT)
        from nemo_optune.runtime import distributed

        try:
            result = run_case(args.one, args.engines.split(","), args.repeats, args.model, args.profile)
            print(json.dumps(result), flush=True)
        finally:
            distributed.shutdown()
        return
    engines = [
        e
        for e in ("recompute", "cached", "hf")
        if not (e == "hf" and args.no_hf) and not (e == "recompute" and args.no_recompute)
    ]
    results = []
    for case in args.cases:
        done = subprocess.run(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--one",
                case,
                "--engines",
                ",".join(engines),
                "--repeats",
                str(args.repeats),
                *(["--model", args.model] if args.model else []),
                *(["--profile"] if args.profile else []),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if done.returncode != 0:
            sys.exit(f"{case} failed:\n{done.stderr[-3000:]}")
        if args.profile:
            print(done.stderr[done.stderr.find("[profile]") :], flush=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    print(
        f"\n{'case':<10}{'rows':>6}{'new':>5}{'recompute/s':>13}{'cached/s':>10}{'hf/s':>9}{'cached/rec':>12}{'cached/hf':>11}"
    )
    for r in results:

        def cell(key, fmt, r=r):
            return format(r[key], fmt) if key in r else "-"

        print(
            f"{r['case']:<10}{r['prompts'] * r['samples']:>6}{r['new_tokens']:>5}"
            f"{cell('recompute_responses_per_s', '.1f'):>13}{cell('cached_responses_per_s', '.1f'):>10}"
            f"{cell('hf_responses_per_s', '.1f'):>9}{cell('cached_over_recompute', '.2f'):>12}{cell('cached_over_hf', '.2f'):>11}"
        )


if __name__ == "__main__":
    main()
