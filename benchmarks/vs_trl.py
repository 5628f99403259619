"""Peer benchmark: TRL's OnlineDPOTrainer against our online DPO and OPTune, from one SFT checkpoint.

  make bench-trl ARGS="--seconds 50 --seeds 3"       # installs the `trl` extra first
  python benchmarks/vs_trl.py --out bench_out/vs_trl [--seconds 50] [--seeds 3]
                              [--ours NAME=recipe:override ...]   (pip install -e '.[trl]')
  python benchmarks/vs_trl.py --task real --out bench_out/vs_trl_real [--seconds 120] [--seeds 3]
                              [--model runs/models/smollm2-135m-instruct]

--task sort (the default) is described below. --task real runs the same protocol on a real
model: both frameworks start from the HF directory --model (SmolLM2-135M-Instruct, made by
make demo-real; no SFT step, no export check: tests/test_real_model.py checks our import of it
against transformers), on the demo_real recipe's instructions task (its prompts through the
chat template, its rule reward, its 32 held-out prompts x 2 samples); TRL steps on 16 prompts at
lr 5e-5 (demo_real's step), sampling as demo_real (32 new tokens, top-p 0.9); ours are demo_real
(OPTune, rho 0.5) and demo_real with online_dpo's switches (rho 1), evaluated after every
iteration; TRL snapshots every 40 s. Each table row also gives the training step's tokens/s
(policy forward + backward + optimizer, generation and reference excluded) and the training
process's peak RSS.

1. SFT warm start (`sft_tiny`, reused when OUT/sft has it), exported to OUT/sft_hf by
   `python -m nemo_optune.convert --to hf`; the transformers model's logits must equal ours at
   every position of a few prompt+answer sequences within --logit-tolerance (1e-4), and both
   tokenizers must encode the prompts alike, or the benchmark stops.
2. Per seed (frameworks interleaved, each run in a fresh process):
   - TRL `OnlineDPOTrainer` from OUT/sft_hf on the same 256 training prompts, our task reward
     called on the decoded completions (a `reward_funcs` callable), 2 samples per prompt (TRL's
     fixed K), 64 prompts per optimizer step, lr 3e-4 constant, beta 0.1, max_new_tokens =
     generation.max_new_tokens, temperature 1, top-p 1, top-k 0, fp32, gradient checkpointing
     off, no evaluation inside TRL. A callback keeps the training clock (from on_train_begin,
     minus its own saving time) and writes the policy weights at ~1, 2, 3, 5, 7, 10, 15, 20, 30,
     40, 50 s (then every 10 s) and when --seconds is reached, which stops training. The
     model's `generate` is wrapped to time generation and count responses.
   - each of our recipes (`online_dpo`, `optune` (as shipped: one optimizer step per 64 prompts), and `--ours` rows, e.g.
     `--ours "rho25=optune:model.optune.rho=0.25 model.optune.weighting=none"`; overrides are
     separated by spaces) from the SFT checkpoint, with trainer.iterations = --max-iterations
     as a cap: once the iterations' own seconds (from its per-iteration lines) reach --seconds,
     SIGTERM stops it at its next safe point; held-out reward vs cumulative iteration seconds
     is read from its summary (compare_methods.curve).
3. After all training: every TRL snapshot is imported into our megatron model (import_hf) and
   scored by the trainer's own `PreferenceTrainer.evaluate()` — the same held-out prompts,
   per-prompt seeds, eval_samples_per_prompt samples at temperature 1 and task reward as our
   runs. Evaluation time is excluded for both frameworks. The SFT checkpoint, evaluated the
   same way (directly and through the HF export), must give our runs' initial held-out reward.

Outputs: OUT/vs_trl.json (every curve, per seed; medians; load averages before and after),
OUT/vs_trl.md (seconds to held-out reward 0.75/0.80/0.85/0.90, real: 0.6/0.7/0.8/0.9 — median
over seeds, an unreached threshold counts as infinite, so "—" means a majority of seeds did not
reach it; held-out reward at 5/10/20/50 s, real: 30/60/90/120 s — the last evaluated point at or
before that time; generation responses/s; training tokens/s; peak RSS),
OUT/vs_trl.png (held-out reward vs training seconds: median over seeds bold, each seed faint).
Both frameworks run on whatever this machine gives them: a shared machine's load shows in the
times (see `loadavg_*` in the JSON).
"""

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compare_methods import curve, run, seconds_to  # noqa: E402

REAL_MODEL = os.path.join(ROOT, "runs", "models", "smollm2-135m-instruct")
TRL_NAME = "trl_online_dpo"
# TRL's side of the protocol (OnlineDPOConfig) common to both tasks; sampling (temperature,
# top-p, top-k, max_new_tokens) comes from our recipe's generation config.
TRL_SETTINGS = {
    "gradient_accumulation_steps": 1,
    "lr_scheduler_type": "constant",
    "warmup_steps": 0,
    "beta": 0.1,
    "gradient_checkpointing": False,
    "bf16": False,
    "fp16": False,
    "use_cpu": True,
    "eval_strategy": "no",
    "save_strategy": "no",
    "report_to": "none",
    "disable_tqdm": True,
    "dataloader_num_workers": 0,
}
# Our online DPO on top of a recipe that is not online_dpo.yaml: the same switches as that recipe.
ONLINE_DPO = ["method=online_dpo", "model.optune.rho=1.0", "model.optune.selection=all", "model.optune.weighting=none"]


@dataclasses.dataclass(frozen=True)
class Task:
    recipe: str  # our recipe whose data, generation and held-out protocol both frameworks use
    ours: dict  # row name: (recipe, overrides)
    trl: dict  # OnlineDPOConfig settings of this task (batch, lr)
    thresholds: tuple
    at_seconds: tuple
    snapshot_seconds: tuple  # TRL snapshots at these training seconds, then every snapshot_every
    snapshot_every: float
    seconds: float  # default training budget per run
    describe: str  # the table's first sentence


TASKS = {
    # The embedded sort task from an SFT checkpoint of the 2-layer model (sft_tiny).
    "sort": Task(
        recipe="online_dpo",
        ours={"online_dpo": ("online_dpo", []), "optune": ("optune", [])},
        trl={"per_device_train_batch_size": 64, "learning_rate": 3e-4},
        thresholds=(0.75, 0.80, 0.85, 0.90),
        at_seconds=(5, 10, 20, 50),
        snapshot_seconds=(1, 2, 3, 5, 7, 10, 15, 20, 30, 40, 50),
        snapshot_every=10,
        seconds=50,
        describe="Embedded sort task, 512 held-out prompts x 2 samples. TRL: K=2, one step per 64 prompts; ours: the "
        "recipes as shipped (K=4, one step per 64 prompts; OPTune regenerates half of them), evaluated every 10 "
        "iterations (about 1 s of training).",
    ),
    # SmolLM2-135M-Instruct on the instructions task of demo_real (16 prompts per optimizer step,
    # lr 5e-5 constant, 32 new tokens at top-p 0.9); ours evaluated after every iteration.
    "real": Task(
        recipe="demo_real",
        ours={
            "online_dpo": ("demo_real", [*ONLINE_DPO, "trainer.eval_every=1"]),
            "optune": ("demo_real", ["trainer.eval_every=1"]),
        },
        trl={"per_device_train_batch_size": 16, "learning_rate": 5e-5},
        thresholds=(0.6, 0.7, 0.8, 0.9),
        at_seconds=(30, 60, 90, 120),
        snapshot_seconds=(40, 80),
        snapshot_every=40,
        seconds=120,
        describe="SmolLM2-135M-Instruct (fp32, 30 layers) on demo_real's instructions task (max_words, no_commas; "
        "32 training prompts, 32 held-out prompts x 2 samples, 32 new tokens at top-p 0.9). TRL: K=2, one step "
        "per 16 prompts; ours: demo_real (K=4, one step of 16 pairs per 16 prompts; online DPO: rho 1, OPTune: "
        "rho 0.5), evaluated after every iteration.",
    ),
}


def _worker(kind: str, *args: str) -> None:
    """One worker step in a fresh process; its stderr tail on failure."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return done.stdout


def _write_json(path: str, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


# ------------------------------------------------------------------ worker: export check
def check_export(sft_ckpt: str, hf_dir: str, tolerance: float, out_json: str) -> None:
    """Our model's logits (next_token_logits at every position) against transformers' on
    prompt+answer sequences, and our tokenizer against the exported one, on the held-out prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_optune.config import load_config
    from nemo_optune.data.task_data import build_task_data
    from nemo_optune.models import sources
    from nemo_optune.models.gpt_optune import inference_model
    from nemo_optune.runtime import distributed
    from nemo_optune.trainers.common import quiet_megatron_warnings

    quiet_megatron_warnings()
    task_data = build_task_data(load_config("online_dpo").data)
    prompts = task_data.heldout_prompts[:8]
    spec, tok = sources.model_and_tokenizer(sft_ckpt)
    model = inference_model(spec, distributed.initialize(1, 1, seed=0), tokenizer=tok)
    sources.load_weights(sft_ckpt, model, from_training=True)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    worst, token_mismatch = 0.0, []
    for p in prompts:
        ours_ids = tok.encode(p)
        if hf_tok(p, add_special_tokens=False)["input_ids"] != ours_ids:
            token_mismatch.append(p)
        seq = torch.tensor(ours_ids + tok.encode(task_data.task.target(p)))
        length = len(seq)
        ours = model.next_token_logits(seq.repeat(length, 1), torch.arange(length), micro_batch_size=64)
        with torch.no_grad():
            theirs = hf(seq[None]).logits[0, :, : ours.shape[1]].float()
        worst = max(worst, float((ours - theirs).abs().max()))
    ok = worst <= tolerance and not token_mismatch
    _write_json(
        out_json,
        {
            "max_abs_logit_diff": worst,
            "tolerance": tolerance,
            "sequences": len(prompts),
            "tokenizer_mismatches": token_mismatch,
            "ok": ok,
        },
    )
    print(
        f"[check] max |logit difference| ours vs transformers {worst:.2e} (tolerance {tolerance:g}); "
        f"tokenizer mismatches {len(token_mismatch)}",
        flush=True,
    )
    distributed.shutdown()


# ------------------------------------------------------------------ worker: TRL training
def snapshot_schedule(task: Task, budget: float) -> list[float]:
    points = [s for s in task.snapshot_seconds if s < budget]
    nxt = task.snapshot_seconds[-1] + task.snapshot_every
    while nxt < budget:
        points.append(nxt)
        nxt += task.snapshot_every
    return points + [budget]


def train_trl(task_name: str, hf_dir: str, seed: int, budget: float, out_dir: str) -> None:
    import torch
    from datasets import Dataset
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from nemo_optune.config import load_config
    from nemo_optune.data.task_data import build_task_data
    from nemo_optune.rewards.task_reward import TaskReward
    from nemo_optune.runtime.experiment import peak_rss_mb

    task = TASKS[task_name]
    cfg = load_config(task.recipe)
    task_data = build_task_data(cfg.data)
    scorer = TaskReward(task_data.task)

    first_batch = []  # a few (prompt, completion, reward) of the first step, kept in run.json

    def task_reward(prompts, completions, **_):
        if not isinstance(completions[0], str):  # chat prompts: TRL passes messages back
            prompts = [tuple(dict(m) for m in p) for p in prompts]
            completions = [c[-1]["content"] for c in completions]
        rewards = scorer.score(prompts, completions)
        if not first_batch:
            first_batch.extend(zip(prompts[:4], completions[:4], rewards[:4]))
        return rewards

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    gen = {"seconds": 0.0, "responses": 0, "calls": 0}
    generate = model.generate

    def timed_generate(*args, **kwargs):  # what TRL's _generate calls (unwrapped model: the same object)
        start = time.perf_counter()
        output = generate(*args, **kwargs)
        gen["seconds"] += time.perf_counter() - start
        gen["responses"] += int(output.shape[0])
        gen["calls"] += 1
        return output

    model.generate = timed_generate
    schedule = snapshot_schedule(task, budget)
    snap_root = os.path.join(out_dir, "snapshots")
    shutil.rmtree(snap_root, ignore_errors=True)
    os.makedirs(snap_root)

    class SecondsSnapshots(TrainerCallback):
        """Training seconds since on_train_begin minus this callback's saving time; saves the
        policy at the schedule's points and stops training at the last (the budget)."""

        def __init__(self):
            self.start, self.saving, self.next, self.snapshots = None, 0.0, 0, []
            self.step_start, self.step_seconds = 0.0, 0.0

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            self.step_start = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kw):
            self.step_seconds += time.perf_counter() - self.step_start
            seconds = time.perf_counter() - self.start - self.saving
            if seconds < schedule[self.next]:
                return
            save_start = time.perf_counter()
            while self.next < len(schedule) and seconds >= schedule[self.next]:
                self.next += 1
            path = os.path.join(snap_root, f"{len(self.snapshots):03d}")
            os.makedirs(path)
            save_file(
                {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()},
                os.path.join(path, "model.safetensors"),
                metadata={"format": "pt"},
            )
            for name in ("config.json", "generation_config.json"):  # the architecture: unchanged by training
                shutil.copy(os.path.join(hf_dir, name), path)
            self.snapshots.append(
                {
                    "dir": path,
                    "seconds": seconds,
                    "step": state.global_step,
                    "generation_seconds": gen["seconds"],
                    "responses": gen["responses"],
                }
            )
            if self.next >= len(schedule):
                control.should_training_stop = True
            self.saving += time.perf_counter() - save_start

    settings = {
        **TRL_SETTINGS,
        **task.trl,
        "temperature": cfg.generation.temperature,
        "top_p": cfg.generation.top_p,
        "top_k": cfg.generation.top_k,
        "max_new_tokens": cfg.generation.max_new_tokens,
    }
    args = OnlineDPOConfig(
        output_dir=os.path.join(out_dir, "trainer"), seed=seed, data_seed=seed, max_steps=1_000_000, **settings
    )
    callback = SecondsSnapshots()
    prompts = [p if isinstance(p, str) else [dict(m) for m in p] for p in task_data.train_prompts]
    trainer = OnlineDPOTrainer(
        model=model,
        reward_funcs=task_reward,
        args=args,
        processing_class=tokenizer,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        callbacks=[callback],
    )
    # The update's share of a step: its forward passes are timed (the reference's apart) and the
    # policy's non-padding tokens counted, as our training_tokens (prompt and response of each sample).
    update = {"reference_seconds": 0.0, "policy_tokens": 0}
    forward = trainer._forward

    def counted_forward(fwd_model, prompt_ids, prompt_mask, completion_ids, completion_mask, *rest):
        start = time.perf_counter()
        out = forward(fwd_model, prompt_ids, prompt_mask, completion_ids, completion_mask, *rest)
        if fwd_model is trainer.ref_model:
            update["reference_seconds"] += time.perf_counter() - start
        else:
            update["policy_tokens"] += int(prompt_mask.sum() + completion_mask.sum())
        return out

    trainer._forward = counted_forward
    wall = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - wall
    last = callback.snapshots[-1]
    # step time less generation and the reference's forward: policy forward, backward, optimizer (reward: ~0)
    update_seconds = callback.step_seconds - gen["seconds"] - update["reference_seconds"]
    _write_json(
        os.path.join(out_dir, "run.json"),
        {
            "seed": seed,
            "budget_seconds": budget,
            "train_seconds": last["seconds"],
            "steps": last["step"],
            "train_wall_seconds_incl_saving": wall,
            "saving_seconds": callback.saving,
            "generation_seconds": gen["seconds"],
            "responses_generated": gen["responses"],
            "generate_calls": gen["calls"],
            "reference_seconds": update["reference_seconds"],
            "update_seconds": update_seconds,
            "training_tokens": update["policy_tokens"],
            "training_tokens_per_s": update["policy_tokens"] / update_seconds,
            "peak_rss_mb": peak_rss_mb(),
            "first_step_samples": first_batch,
            "snapshots": callback.snapshots,
            "trl_args": {
                k: getattr(args, k)
                for k in (
                    *settings,
                    "max_length",
                    "max_grad_norm",
                    "weight_decay",
                    "optim",
                    "adam_beta1",
                    "adam_beta2",
                    "adam_epsilon",
                    "loss_type",
                    "missing_eos_penalty",
                    "disable_dropout",
                )
            },
            "log_history": trainer.state.log_history,
        },
    )
    print(
        f"[trl] seed {seed}: {last['step']} steps in {last['seconds']:.1f}s, {len(callback.snapshots)} snapshots",
        flush=True,
    )


# ------------------------------------------------------------------ worker: our held-out protocol
def evaluate_snapshots(task_name: str, sft_ckpt: str, jobs_json: str, out_json: str) -> None:
    """Held-out (reward, KL) of the starting checkpoint and of each HF directory in jobs_json, by
    PreferenceTrainer.evaluate() of a trainer of the task's recipe restored from that checkpoint."""
    import tempfile

    from nemo_optune.config import load_config
    from nemo_optune.data.task_data import build_task_data
    from nemo_optune.models.hf_io import import_hf
    from nemo_optune.runtime import distributed
    from nemo_optune.runtime.experiment import ExperimentLog
    from nemo_optune.trainers.common import setup
    from nemo_optune.trainers.preference import PreferenceTrainer

    dirs = _read_json(jobs_json)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            TASKS[task_name].recipe,
            [
                f"model.restore_from_path={sft_ckpt}",
                f"exp_manager.exp_dir={tmp}",
                "trainer.progress_bar=false",
                "exp_manager.tensorboard=false",
            ],
        )
        layout = setup(cfg)
        trainer = PreferenceTrainer(
            cfg, layout, build_task_data(cfg.data), ExperimentLog(tmp, enabled=False, tensorboard=False)
        )
        trainer.model.load_policy(sft_ckpt)  # as run.py: policy and reference = the SFT checkpoint
        trainer.model.sync_reference_to_policy()
        results = {"sft_checkpoint": trainer.evaluate()}
        for i, path in enumerate(dirs):
            start = time.perf_counter()
            import_hf(path, trainer.model)
            results[path] = trainer.evaluate()
            print(
                f"[eval] {i + 1}/{len(dirs)} {path}: reward {results[path][0]:.4f} kl {results[path][1]:.3f} "
                f"({time.perf_counter() - start:.1f}s)",
                flush=True,
            )
    _write_json(out_json, results)
    distributed.shutdown()


# ------------------------------------------------------------------ orchestration
def parse_ours(task: Task, specs: list[str], recipes_as_shipped: bool = True) -> dict:
    rows = dict(task.ours) if recipes_as_shipped else {}
    for spec in specs:
        name, _, rest = spec.partition("=")
        recipe, _, overrides = rest.partition(":")
        if not name or not recipe:
            raise SystemExit(f"error: --ours {spec!r}: expected NAME=recipe[:override override ...]")
        rows[name] = (recipe, overrides.split())
    return rows


def sft_and_export(args) -> tuple[str, str, dict]:
    sft_dir = os.path.join(args.out, "sft")
    ckpt = os.path.join(sft_dir, "sft_checkpoint")
    summary_path = os.path.join(sft_dir, "summary.json")
    if os.path.isfile(summary_path) and os.path.isdir(os.path.join(ckpt, "tokenizer")):
        print(f"[sft] reusing {ckpt}", flush=True)
        sft = _read_json(summary_path)
    else:
        sft = run(
            "sft_tiny",
            ["exp_manager.overwrite=true", "exp_manager.resume_if_exists=false", "exp_manager.tensorboard=false"],
            sft_dir,
        )
        print(f"[sft] {sft['sft_steps']} steps in {sft['sft_seconds']:.1f}s", flush=True)
    hf_dir = os.path.join(args.out, "sft_hf")
    stamp = os.path.join(hf_dir, ".from_checkpoint")
    if not (os.path.isfile(stamp) and open(stamp).read() == str(os.path.getmtime(os.path.join(ckpt, "manifest.json")))):
        shutil.rmtree(hf_dir, ignore_errors=True)
        cmd = [sys.executable, "-m", "nemo_optune.convert", "--to", "hf", "--checkpoint", ckpt, "--out", hf_dir]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        with open(stamp, "w") as f:
            f.write(str(os.path.getmtime(os.path.join(ckpt, "manifest.json"))))
    check_path = os.path.join(args.out, "export_check.json")
    print(_worker("check", ckpt, hf_dir, str(args.logit_tolerance), check_path), end="", flush=True)
    check = _read_json(check_path)
    if not check["ok"]:
        raise SystemExit(
            f"error: the HF export of {ckpt} does not match our model (max |logit difference| "
            f"{check['max_abs_logit_diff']:.2e} > {args.logit_tolerance:g}, or tokenizer mismatches "
            f"{check['tokenizer_mismatches']}): stopping before any comparison"
        )
    return (
        ckpt,
        hf_dir,
        {"sft": {k: sft.get(k) for k in ("sft_seconds", "sft_steps", "sft_final_loss")}, "export_check": check},
    )


ITERATION_LINE = re.compile(r"^\[iter (\d+)/\d+\].* total ([0-9.]+)s eval")


def run_ours(
    recipe: str, extra: list[str], seed: int, ckpt: str, budget: float, exp_dir: str, max_iterations: int
) -> dict:
    """Our recipe (a fresh process, as compare_methods.run) until its iterations' own seconds
    reach the budget: their per-iteration lines are summed as they come, and then SIGTERM asks
    the trainer to stop at its next safe point (after the iteration under way, with a
    checkpoint; exit status 3); summary.json holds every iteration done."""
    launcher = os.path.join(ROOT, "examples", "train_optune.py")
    cmd = [
        sys.executable,
        launcher,
        "--config-name",
        recipe,
        f"exp_manager.exp_dir={exp_dir}",
        *extra,
        f"trainer.seed={seed}",
        f"trainer.iterations={max_iterations}",
        f"model.restore_from_path={ckpt}",
        "exp_manager.overwrite=true",
        "exp_manager.resume_if_exists=false",
        "exp_manager.tensorboard=false",
        "exp_manager.report=false",
        "exp_manager.checkpoint_every=0",
        "exp_manager.keep_last=1",
        "trainer.progress_bar=false",
    ]
    os.makedirs(exp_dir, exist_ok=True)
    seconds, signalled = 0.0, False
    with open(os.path.join(exp_dir, "stderr.txt"), "w") as err, open(os.path.join(exp_dir, "stdout.txt"), "w") as out:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
        for line in proc.stdout:
            out.write(line)
            m = ITERATION_LINE.match(line)
            if m:
                seconds += float(m.group(2))
                if seconds >= budget and not signalled:
                    proc.send_signal(signal.SIGTERM)
                    signalled = True
        code = proc.wait()
    if code not in (0, 3):
        with open(os.path.join(exp_dir, "stderr.txt")) as f:
            raise RuntimeError(f"{' '.join(cmd)} failed ({code}):\n{f.read()[-3000:]}")
    return _read_json(os.path.join(exp_dir, "summary.json"))


def clip(points: list, budget: float) -> list:
    """Points up to and including the first at or past the budget (both frameworks stop there)."""
    out = []
    for t, r in points:
        out.append((t, r))
        if t >= budget:
            break
    return out


def value_at(points: list, t: float):
    """Step-wise: the reward of the last evaluated point at or before t."""
    before = [r for s, r in points if s <= t]
    return before[-1] if before else None


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(task: Task, name: str, framework: str, seeds: list[dict], budget: float) -> dict:
    """seeds: [{seed, curve, kl, generation_seconds, responses, train_seconds, training_tokens_per_s, peak_rss_mb}]."""
    to = {}
    for th in task.thresholds:
        per = [seconds_to(s["curve"], th) for s in seeds]
        m = statistics.median([math.inf if t is None else t for t in per])  # unreached = infinite
        to[f"{th:.2f}"] = {
            "median": None if math.isinf(m) else m,
            "per_seed": per,
            "seeds_reaching": sum(t is not None for t in per),
        }
    at = {}
    for t in task.at_seconds:
        per = [value_at(s["curve"], t) if t <= budget else None for s in seeds]
        at[str(t)] = {"median": med(per) if t <= budget else None, "per_seed": per}
    rates = [s["responses"] / s["generation_seconds"] if s["generation_seconds"] else None for s in seeds]
    return {
        "name": name,
        "framework": framework,
        "seconds_to": to,
        "reward_at": at,
        "final_reward": med(s["curve"][-1][1] for s in seeds),
        "final_kl": med(s.get("kl_final") for s in seeds),
        "train_seconds": med(s["train_seconds"] for s in seeds),
        "responses_per_generation_second": med(rates),
        "responses_generated": med(s["responses"] for s in seeds),
        "generation_seconds": med(s["generation_seconds"] for s in seeds),
        "training_tokens_per_s": med(s["training_tokens_per_s"] for s in seeds),
        "peak_rss_mb": med(s["peak_rss_mb"] for s in seeds),
        "per_seed": seeds,
    }


def fmt(v, spec=".3f"):
    return "—" if v is None else format(v, spec)


def markdown(task: Task, rows: list[dict], result: dict) -> str:
    a = result["args"]
    head = (
        ["framework / method"]
        + [f"s to {t:.2f}" for t in task.thresholds]
        + [f"reward @{t}s" for t in task.at_seconds]
        + ["final (s)", "gen resp/s", "train tok/s", "peak RSS GB"]
    )
    lines = [
        f"{task.describe} {a['seconds']:g} s of training per run, medians of {a['seeds']} seeds, one starting "
        f"checkpoint (held-out reward {fmt(result['sft_heldout_reward'], '.4f')}). Held-out reward by our protocol for "
        "both frameworks (fixed per-prompt seeds, temperature 1), evaluation time excluded. "
        '"s to X": training seconds until the held-out reward first reaches X (— : not reached by a majority of '
        'seeds); "reward @t": the last evaluated point at or before t. TRL is evaluated at its snapshots '
        f"(~{', '.join(f'{x:g}' for x in snapshot_schedule(task, a['seconds']))} s), so its "
        '"s to X" is an upper bound at that resolution. "train tok/s": the update\'s tokens (prompt + response of '
        "each trained sample) per second of policy forward, backward and optimizer step (generation and the "
        'reference pass excluded); "peak RSS": of the whole training process.',
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [f"{r['name']} ({r['framework']})"]
        cells += [
            f"{fmt(r['seconds_to'][f'{t:.2f}']['median'], '.1f')} ({r['seconds_to'][f'{t:.2f}']['seeds_reaching']}/"
            f"{len(r['per_seed'])})"
            for t in task.thresholds
        ]
        cells += [fmt(r["reward_at"][str(t)]["median"], ".3f") for t in task.at_seconds]
        cells += [
            f"{fmt(r['final_reward'], '.3f')} ({fmt(r['train_seconds'], '.1f')})",
            fmt(r["responses_per_generation_second"], ".1f"),
            fmt(r["training_tokens_per_s"], ".0f"),
            fmt(r["peak_rss_mb"] and r["peak_rss_mb"] / 1024, ".2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    load = result["loadavg_before"], result["loadavg_after"]
    lines += [""]
    if result["optune_to_online_dpo_final"]:
        v = result["optune_to_online_dpo_final"]
        lines.append(
            f"OPTune reaches online DPO's final held-out reward ({v['target']:.3f}) in "
            f"{fmt(v['optune_seconds'], '.1f')} s vs online DPO's {v['online_dpo_seconds']:.1f} s "
            f"(speed-up {fmt(v['speedup'], '.2f')}x; medians)."
        )
    lines += [
        f"Load average (1/5/15 min) before {tuple(round(x, 2) for x in load[0])}, after "
        f"{tuple(round(x, 2) for x in load[1])}, on {os.cpu_count()} CPUs.",
    ]
    return "\n".join(lines) + "\n"


def median_curve(curves: list[list]) -> list:
    """Step-wise median over seeds at every time any seed has a point (up to the shortest run)."""
    end = min(c[-1][0] for c in curves)
    times = sorted({t for c in curves for t, _ in c if t <= end})
    return [(t, statistics.median(value_at(c, t) for c in curves)) for t in times]


def plot(task: Task, rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, r in enumerate(rows):
        color = f"C{i % 10}"
        curves = [s["curve"] for s in r["per_seed"]]
        for c in curves:
            xs, ys = zip(*c)
            ax.step(xs, ys, where="post", color=color, alpha=0.25, lw=0.8)
        xs, ys = zip(*median_curve(curves))
        ax.step(xs, ys, where="post", color=color, lw=2, marker=".", label=f"{r['name']} ({r['framework']})")
    for th in task.thresholds:
        ax.axhline(th, color="grey", ls=":", lw=0.7)
    ax.set_xlabel("training seconds (held-out evaluation excluded)")
    ax.set_ylabel("held-out mean reward (our protocol)")
    ax.set_title("held-out reward vs training seconds: median over seeds (bold), seeds (faint)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main_bench(args) -> None:
    os.makedirs(args.out, exist_ok=True)
    start, load_before = time.perf_counter(), os.getloadavg()
    task = TASKS[args.task]
    ours = parse_ours(task, args.ours, not args.only_extra_rows)
    if args.task == "sort":
        ckpt, hf_dir, setup_info = sft_and_export(args)
    else:  # a pretrained HF directory: both frameworks start from it as it is
        ckpt = hf_dir = args.model
        setup_info = {"model": args.model}
    ours_runs = {name: [] for name in ours}
    trl_runs, run_loads = [], []  # the machine's load average around each training run
    for seed in range(1, args.seeds + 1):  # frameworks interleaved: machine drift hits all alike
        if not args.skip_trl:
            out_dir = os.path.join(args.out, "trl", f"seed{seed}")
            os.makedirs(out_dir, exist_ok=True)
            t = time.perf_counter()
            run_loads.append(
                reused_or_run(
                    out_dir,
                    "run.json",
                    args.reuse,
                    lambda out_dir=out_dir, seed=seed: _worker(
                        "trl", args.task, hf_dir, str(seed), str(args.seconds), out_dir
                    ),
                )
                | {"run": TRL_NAME, "seed": seed}
            )
            trl_runs.append(_read_json(os.path.join(out_dir, "run.json")))
            print(
                f"[bench] seed {seed} {TRL_NAME:16s} {trl_runs[-1]['steps']} steps, "
                f"{trl_runs[-1]['train_seconds']:.1f}s training, {time.perf_counter() - t:.1f}s wall",
                flush=True,
            )
        for name, (recipe, extra) in ours.items():
            t, exp_dir = time.perf_counter(), os.path.join(args.out, "ours", name, f"seed{seed}")
            run_loads.append(
                reused_or_run(
                    exp_dir,
                    "summary.json",
                    args.reuse,
                    lambda recipe=recipe, extra=extra, seed=seed, exp_dir=exp_dir: run_ours(
                        recipe, extra, seed, ckpt, args.seconds, exp_dir, args.max_iterations
                    ),
                )
                | {"run": name, "seed": seed}
            )
            s = _read_json(os.path.join(exp_dir, "summary.json"))
            ours_runs[name].append(s)
            print(
                f"[bench] seed {seed} {name:16s} {len(s['iterations'])} iterations, "
                f"{sum(i['seconds']['total'] for i in s['iterations']):.1f}s training, final held-out "
                f"{s['heldout_reward_final']:.4f}, {time.perf_counter() - t:.1f}s wall",
                flush=True,
            )

    # Held-out evaluation of every TRL snapshot (and the HF export of the SFT checkpoint), after training.
    jobs = [hf_dir] + [snap["dir"] for r in trl_runs for snap in r["snapshots"]]
    jobs_path, evals_path = os.path.join(args.out, "eval_jobs.json"), os.path.join(args.out, "trl_heldout.json")
    t = time.perf_counter()
    if not (args.reuse and os.path.isfile(evals_path) and set(jobs) <= set(_read_json(evals_path))):
        _write_json(jobs_path, jobs)
        _worker("eval", args.task, ckpt, jobs_path, evals_path)
    evals = _read_json(evals_path)
    print(f"[bench] {len(jobs)} held-out evaluations in {time.perf_counter() - t:.1f}s", flush=True)
    sft_reward = evals["sft_checkpoint"][0]
    initial = {name: [s["heldout_reward_initial"] for s in runs] for name, runs in ours_runs.items()}
    protocol = {
        "sft_by_eval_worker": evals["sft_checkpoint"],
        "sft_hf_export_by_eval_worker": evals[hf_dir],
        "ours_initial_heldout_reward": initial,
        "identical": all(abs(v - sft_reward) < 1e-9 for vs in initial.values() for v in vs)
        and abs(evals[hf_dir][0] - sft_reward) < 1e-9,
    }
    if not protocol["identical"]:
        print(f"[bench] WARNING: the SFT held-out reward differs between evaluations: {protocol}", flush=True)

    rows = []
    if trl_runs:
        seeds = []
        for r in trl_runs:
            points = [(0.0, sft_reward)] + [(s["seconds"], evals[s["dir"]][0]) for s in r["snapshots"]]
            seeds.append(
                {
                    "seed": r["seed"],
                    "curve": clip(points, args.seconds),
                    "kl_final": evals[r["snapshots"][-1]["dir"]][1],
                    "kl": [evals[s["dir"]][1] for s in r["snapshots"]],
                    "steps": r["steps"],
                    "train_seconds": r["train_seconds"],
                    "generation_seconds": r["generation_seconds"],
                    "responses": r["responses_generated"],
                    "training_tokens_per_s": r["training_tokens_per_s"],
                    "peak_rss_mb": r["peak_rss_mb"],
                }
            )
        rows.append(summarise(task, TRL_NAME, "trl", seeds, args.seconds))
    for name, runs in ours_runs.items():
        seeds = []
        for s in runs:
            points = clip(curve(s), args.seconds)
            its = s["iterations"][: len(points) - 1]
            seeds.append(
                {
                    "seed": s["config"]["trainer"]["seed"],
                    "curve": points,
                    "kl_final": its[-1]["heldout_kl"],
                    "kl": [i["heldout_kl"] for i in its],
                    "iterations": len(its),
                    "train_seconds": points[-1][0],
                    # rate over the whole run (the responses counter is per run, not per iteration)
                    "generation_seconds": sum(i["seconds"]["generation"] for i in s["iterations"]),
                    "responses": s["responses_generated"],
                    "training_tokens_per_s": sum(i["training_tokens"] for i in s["iterations"])
                    / sum(i["seconds"]["training"] for i in s["iterations"]),
                    "peak_rss_mb": s["peak_rss_mb"],
                }
            )
        rows.append(summarise(task, name, "nemo_optune", seeds, args.seconds))

    result = {
        "args": vars(args),
        "sft_heldout_reward": sft_reward,
        **setup_info,
        "protocol_check": protocol,
        "revision": _revision(),
        "trl_version": _version("trl"),
        "transformers_version": _version("transformers"),
        "torch_version": _version("torch"),
        "trl_settings": {**TRL_SETTINGS, **task.trl},
        "optune_to_online_dpo_final": speedup_to_final(rows),
        "ours": {n: {"recipe": r, "overrides": o} for n, (r, o) in ours.items()},
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "loadavg_per_run": run_loads,
        "benchmark_seconds": time.perf_counter() - start,
        "rows": rows,
    }
    _write_json(os.path.join(args.out, "vs_trl.json"), result)
    table = markdown(task, rows, result)
    with open(os.path.join(args.out, "vs_trl.md"), "w") as f:
        f.write(table)
    plot(task, rows, os.path.join(args.out, "vs_trl.png"))
    print(table, flush=True)


def reused_or_run(run_dir: str, result_file: str, reuse: bool, go) -> dict:
    """Load averages before and after go() (a training run writing run_dir/result_file), kept in
    run_dir/loadavg.json; with `reuse`, a run whose result file and loads are there is not redone."""
    loads = os.path.join(run_dir, "loadavg.json")
    if not (reuse and os.path.isfile(os.path.join(run_dir, result_file)) and os.path.isfile(loads)):
        before = os.getloadavg()
        go()
        _write_json(loads, {"before": before, "after": os.getloadavg()})
    return _read_json(loads)


def speedup_to_final(rows: list[dict]) -> dict | None:
    """Training seconds OPTune needs to reach online DPO's final held-out reward (medians over
    seeds) against online DPO's own training seconds."""
    by = {r["name"]: r for r in rows}
    if "optune" not in by or "online_dpo" not in by:
        return None
    target, dpo_seconds = by["online_dpo"]["final_reward"], by["online_dpo"]["train_seconds"]
    per = [seconds_to(s["curve"], target) for s in by["optune"]["per_seed"]]
    m = statistics.median([math.inf if t is None else t for t in per])
    seconds = None if math.isinf(m) else m
    return {
        "target": target,
        "online_dpo_seconds": dpo_seconds,
        "optune_seconds": seconds,
        "optune_seconds_per_seed": per,
        "speedup": dpo_seconds / seconds if seconds else None,
    }


def _revision() -> dict:
    """The repository's commit and whether the working tree differs from it (read-only git)."""

    def git(*a):
        done = subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT)
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def _version(package: str):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "check":
            check_export(rest[0], rest[1], float(rest[2]), rest[3])
        elif kind == "trl":
            train_trl(rest[0], rest[1], int(rest[2]), float(rest[3]), rest[4])
        elif kind == "eval":
            evaluate_snapshots(*rest)
        else:
            raise SystemExit(f"unknown worker {kind}")
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_out/vs_trl")
    parser.add_argument(
        "--task",
        choices=list(TASKS),
        default="sort",
        help="sort: the 2-layer model from an SFT checkpoint; real: SmolLM2-135M-Instruct on demo_real's task",
    )
    parser.add_argument("--model", default=REAL_MODEL, help="--task real: the HF directory both frameworks start from")
    parser.add_argument(
        "--seconds", type=float, help="training seconds per run (both frameworks; default: sort 50, real 120)"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--ours",
        action="append",
        default=[],
        metavar="NAME=recipe:overrides",
        help="an extra row of ours: recipe and space-separated overrides (repeatable)",
    )
    parser.add_argument(
        "--max-iterations",
        type=int,
        default=2000,
        help="trainer.iterations of our runs: a cap (they stop when --seconds is reached)",
    )
    parser.add_argument("--logit-tolerance", type=float, default=1e-4)
    parser.add_argument(
        "--reuse", action="store_true", help="keep the training runs already finished in --out (after an interruption)"
    )
    parser.add_argument("--skip-trl", action="store_true", help="our rows only (no TRL installed)")
    parser.add_argument(
        "--only-extra-rows", action="store_true", help="of ours, only the --ours rows (not the recipes as shipped)"
    )
    args = parser.parse_args()
    if args.seconds is None:
        args.seconds = TASKS[args.task].seconds
    if args.task == "real" and not os.path.isfile(os.path.join(args.model, "config.json")):
        parser.error(f"--model {args.model}: not a Hugging Face directory (no config.json); make demo-real makes it")
    try:
        import trl  # noqa: F401
    except ImportError:
        if not args.skip_trl:
            raise SystemExit("error: trl is not installed: pip install -e '.[trl]' (or make bench-trl)") from None
    main_bench(args)


if __name__ == "__main__":
    main()
