"""SFT warm start: next-token training on the task's imperfect demonstrations."""

import random
import time

import torch

from nemo_optune.config import RootConfig
from nemo_optune.data.micro_batch import MicroBatchLoss, SequenceMicroBatch
from nemo_optune.data.pool import build_sequences
from nemo_optune.data.sort_task import SortTask
from nemo_optune.data.task_data import TaskData
from nemo_optune.models.gpt_optune import MegatronGPTOPTuneModel
from nemo_optune.runtime.checkpoint import save_model
from nemo_optune.runtime.distributed import Layout
from nemo_optune.runtime.lost_ranks import note_phase
from nemo_optune.runtime.seeds import mix_seed
from nemo_optune.trainers.common import builtin_spec, check_layout, sequence_width


def demonstrations(cfg: RootConfig, data: TaskData) -> list[tuple[str, str]]:
    """(prompt, demonstration) pairs on prompts disjoint from the held-out set."""
    s, task = cfg.sft, data.task
    assert isinstance(task, SortTask)  # config.validate: the built-in model learns only the sort task
    prompts = task.prompts(s.num_demonstrations, seed=s.seed, exclude=frozenset(data.heldout_prompts))
    rng = random.Random(s.seed + 1)
    return [(p, task.demonstration(p, rng, s.demonstration_noise)) for p in prompts]


def token_nll_loss(total_tokens: float) -> MicroBatchLoss[SequenceMicroBatch]:
    """Mean next-token NLL over the global batch's response tokens, composable over
    micro-batches and DP ranks (each contributes its sum / the global token count)."""

    def loss_fn(micro_batch: SequenceMicroBatch, sequence_logps: torch.Tensor) -> tuple[torch.Tensor, dict]:
        loss = -sequence_logps.sum() / total_tokens
        return loss, {"loss": loss.detach()}

    return loss_fn


def run_sft(cfg: RootConfig, layout: Layout, data: TaskData, out_dir: str, log=print) -> dict:
    """Train the SFT policy and save it (dist_checkpointing) to `out_dir`."""
    note_phase("SFT warm start")
    start = time.perf_counter()
    tok, s, t = data.tokenizer, cfg.sft, cfg.trainer
    assert isinstance(data.task, SortTask)  # config.validate: the built-in model learns only the sort task
    spec = builtin_spec(cfg, data.task, tok)
    check_layout(spec, layout.tp, layout.pp, "the built-in model")
    model = MegatronGPTOPTuneModel(
        cfg.model,
        spec,
        layout,
        seed=t.seed,
        lr=s.lr,
        weight_decay=t.weight_decay,
        grad_clip=t.grad_clip,
        with_reference=False,
        tokenizer=tok,
    )
    demos = demonstrations(cfg, data)
    prompts = [tok.encode(p) for p, _ in demos]
    answers = [tok.encode(a) + [tok.eos_id] for _, a in demos]
    width = sequence_width(cfg, data.task)
    max_answer = max(len(a) for a in answers)
    responses = torch.zeros(len(answers), max_answer, dtype=torch.long)
    for i, a in enumerate(answers):
        responses[i, : len(a)] = torch.tensor(a)
    lengths = torch.tensor([len(a) for a in answers])
    tokens, loss_mask = build_sequences(prompts, responses, lengths, width, tok.pad_id)

    per_rank = s.batch_size // layout.dp
    micro = min(t.micro_batch_size * 2, per_rank)  # a DPO micro-batch holds 2 sequences per pair
    if s.batch_size % layout.dp or per_rank % micro:
        raise ValueError(
            f"config key sft.batch_size: {s.batch_size} does not split into DP={layout.dp} ranks of micro-batches of {micro}"
        )
    generator = torch.Generator().manual_seed(mix_seed(s.seed, 0))
    loss_value = float("nan")
    for step in range(s.steps):
        batch = torch.randint(0, len(demos), (s.batch_size,), generator=generator)
        total_tokens = float(loss_mask[batch].sum())
        mine = batch[layout.dp_rank * per_rank : (layout.dp_rank + 1) * per_rank]
        micro_batches = [
            SequenceMicroBatch(tokens=tokens[mine[i : i + micro]], loss_mask=loss_mask[mine[i : i + micro]])
            for i in range(0, per_rank, micro)
        ]
        metrics, _ = model.train_step(micro_batches, token_nll_loss(total_tokens))
        if (step + 1) % max(1, s.steps // 5) == 0 or step + 1 == s.steps:
            local = torch.stack([m["loss"] for m in metrics]).sum() if metrics else torch.zeros(())
            loss_value = float(model.global_metric_sums(local))
            log(f"[sft] step {step + 1}/{s.steps}  token NLL {loss_value:.4f}")
    save_model(out_dir, model)
    return {"sft_seconds": time.perf_counter() - start, "sft_steps": s.steps, "sft_final_loss": loss_value}
