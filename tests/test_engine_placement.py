"""External rollout engines at world size > 1 (generation/placement.py, factory.ExternalEngine):
one engine per DP replica on its first rank, fed that replica's prompts, its rollouts broadcast
to the replica's other ranks, refitted from the replica's own stream.

Cheap: the placement is a pure function (any grid); the collective part runs 4 gloo processes
(TP2 x DP2, torch only: no megatron, no model) with a recording fake backend for vLLM and with
the TensorRT-LLM adapter on its signature-exact fake (tests/test_trtllm_adapter.py)."""

import os

import pytest
import torch
from parallel_harness import preloaded_context

from nemo_optune.generation.placement import place_engines
from nemo_optune.runtime.distributed import free_port

WORLD, TP = 4, 2  # two DP replicas of two TP ranks: groups [0, 1] and [2, 3]
STOP, PAD, NEW = 3, 0, 4
WEIGHTS = {"model.embed_tokens.weight": (8, 4), "model.norm.weight": (4,), "lm_head.weight": (8, 4)}


def test_one_engine_per_dp_replica_on_its_first_rank():
    # 8 ranks, TP2 x PP2 x DP2 in megatron's order (TP fastest, then DP, then PP): the
    # model-parallel groups are {0, 1, 4, 5} and {2, 3, 6, 7}; two nodes of 4 ranks.
    leaders = [0, 0, 2, 2, 0, 0, 2, 2]
    hosts = ["a"] * 4 + ["b"] * 4
    devices = ["0", "1", "2", "3", "0", "1", "2", "3"]
    placements = place_engines(leaders, hosts, devices)
    assert [p.leader for p in placements] == leaders
    assert [p.replica for p in placements] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert {p.engines for p in placements} == {2}
    # both engines run on node a (their leaders' node): they split its cores, slots 0 and 1
    assert [(p.slot, p.node_engines) for p in placements[:4]] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    # an engine's GPUs: its replica's devices on the leader's node (not the other stage's node)
    assert placements[0].devices == ("0", "1") and placements[2].devices == ("2", "3")
    # TP1 x DP4 on two nodes, CPU: every rank leads, two engines per node
    placements = place_engines([0, 1, 2, 3], ["a", "a", "b", "b"], [None] * 4)
    assert [(p.leader, p.replica, p.slot, p.node_engines, p.devices) for p in placements] == [
        (0, 0, 0, 2, ()),
        (1, 1, 1, 2, ()),
        (2, 2, 0, 2, ()),
        (3, 3, 1, 2, ()),
    ]


class FakeBackend:
    """A vLLM stand-in: answers prompt p's sample k with tokens [p[0] + k, p[0] + k + 1, STOP]
    and log-prob -(rank + 1) (so a rank's answer is recognisable); records what it was given."""

    made: list = []

    def __init__(self, hf_dir, stop_ids, pad_id, gen_cfg, placement=None):
        self.rank = int(os.environ["RANK"])
        self.placement, self.prompts, self.refits = placement, [], []
        self.last_timings: dict = {}
        FakeBackend.made.append(self)

    def generate(self, prompts, num_samples, params, seeds):
        from nemo_optune.generation.base import Rollouts

        self.prompts.append(prompts)
        if prompts and prompts[0][0] == 99:
            raise ValueError("the engine broke")
        out = Rollouts.empty(len(prompts) * num_samples, params.max_new_tokens, PAD)
        for p, prompt in enumerate(prompts):
            for k in range(num_samples):
                out.response_tokens[p * num_samples + k, :3] = torch.tensor([prompt[0] + k, prompt[0] + k + 1, STOP])
                out.response_lengths[p * num_samples + k] = 3
                out.logprobs[p * num_samples + k, :3] = -(self.rank + 1.0)
        return out

    def refit(self, weights):
        self.refits.append({name: float(t.sum()) for name, t in weights})
        self.last_timings = {"refit_tensors": len(self.refits[-1])}

    def release(self):
        pass

    def resume(self):
        pass


def _stream(group):
    """A model-parallel stream as models.hf_io.stream_hf_weights(model, group) makes: each tensor
    summed over the group's ranks only (rank r contributes r + 1)."""
    import torch.distributed as dist

    for name, shape in WEIGHTS.items():
        tensor = torch.full(shape, dist.get_rank() + 1.0)
        dist.all_reduce(tensor, group=group)
        yield name, tensor


def _install_fakes(rank: int) -> None:
    """vLLM: FakeBackend; TensorRT-LLM: the real adapter on the fake tensorrt_llm module."""
    import sys

    import test_trtllm_adapter as fake

    from nemo_optune.generation import factory, trtllm_engine

    sys.modules.update(fake._fake_module())
    trtllm_engine._ipc_handle = fake._ipc_handle

    def script(prompt, sp):  # every sample: prompt[0], prompt[0] + 1, STOP at log-prob -(rank + 1)
        tokens = [prompt[0], prompt[0] + 1, STOP]
        logprobs = [{t: fake.Logprob(-(rank + 1.0), 1)} for t in tokens]
        return [fake.CompletionOutput(index=k, token_ids=tokens, logprobs=logprobs) for k in range(sp.n)]

    fake.FakeAsyncLLM.script = script
    real = factory._backend_class
    factory._backend_class = lambda kind: FakeBackend if kind == "vllm" else real(kind)


def _worker(rank, port, root, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    groups = [dist.new_group(list(range(g * TP, (g + 1) * TP))) for g in range(WORLD // TP)]
    group, dp_rank = groups[rank // TP], rank // TP
    from safetensors.torch import save_file

    from nemo_optune.config import GenerationConfig
    from nemo_optune.generation import factory
    from nemo_optune.generation.base import SamplingParams

    exported: list = []

    def export(self, hf_dir):  # the leader writes its replica's checkpoint (TRT-LLM reads its names)
        if hf_dir is not None:
            os.makedirs(hf_dir)
            save_file({name: torch.zeros(shape) for name, shape in WEIGHTS.items()}, f"{hf_dir}/model.safetensors")
        exported.append(hf_dir)

    factory.ExternalEngine._export = export
    _install_fakes(rank)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=NEW)
    records = {}
    for kind in ("vllm", "trtllm"):
        exported.clear()
        cfg = GenerationConfig()
        cfg.refit_bucket_mb = 1
        engine = factory.ExternalEngine(kind, None, [STOP], PAD, cfg, engine_dir=f"{root}/{kind}", group=group)
        # The replica's share of the prompts (dp_share): the same on both of its ranks.
        prompts = [[10 + 20 * dp_rank, 5], [11 + 20 * dp_rank, 6, 7]]
        got = engine.generate(prompts, 2, greedy, [1, 2])
        engine.refit(_stream(group))
        backend = engine.backend
        record = {
            "leads": engine.placement.leads,
            "replica": engine.placement.replica,
            "slot": (engine.placement.slot, engine.placement.node_engines),
            "exported": list(exported),
            "tokens": got.response_tokens.tolist(),
            "lengths": got.response_lengths.tolist(),
            "logprobs": got.logprobs.tolist(),
            "timings": dict(engine.last_timings),
            "has_backend": backend is not None,
        }
        if kind == "trtllm":
            record["loaded"] = backend and {n: float(t.sum()) for n, t in backend.llm.loaded.items()}
        else:
            record["prompts"] = backend and backend.prompts
            record["loaded"] = backend and backend.refits[0]
            # A failing leader: every rank of its replica raises, naming it; the other replica goes on.
            try:
                engine.generate([[99, 1]] if dp_rank == 0 else prompts, 1, greedy, [1])
                record["failure"] = None
            except Exception as err:
                record["failure"] = f"{type(err).__name__}: {err}"
        records[kind] = record
    out.put((rank, records))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[list[dict], str]:
    """Each rank's records ({kind: ...}) of one 4-process run (spawning is most of the cost)."""
    root = str(tmp_path_factory.mktemp("engines"))
    ctx = preloaded_context()
    out = ctx.Queue()
    port = free_port()
    processes = [ctx.Process(target=_worker, args=(r, port, root, out)) for r in range(WORLD)]
    for p in processes:
        p.start()
    try:
        records = dict(out.get(timeout=300) for _ in processes)
    finally:
        for p in processes:
            p.join(timeout=60)
            if p.exitcode is None:
                p.kill()
    assert [p.exitcode for p in processes] == [0] * WORLD
    return [records[r] for r in range(WORLD)], root


@pytest.mark.parametrize("kind", ["vllm", "trtllm"])
def test_each_dp_replica_has_one_engine_on_its_first_rank(kind, ranks):
    records, root = ranks
    records = [r[kind] for r in records]
    assert [r["leads"] for r in records] == [True, False, True, False]
    assert [r["has_backend"] for r in records] == [True, False, True, False]  # the engine runs on leaders only
    assert [r["replica"] for r in records] == [0, 0, 1, 1]
    assert [r["slot"] for r in records] == [(0, 2), (0, 2), (1, 2), (1, 2)]  # one node, two engines
    # each leader exports its own copy, under engine_dir/dp<replica>; the others export nothing
    assert [r["exported"] for r in records] == [[f"{root}/{kind}/dp0"], [None], [f"{root}/{kind}/dp1"], [None]]
    for rank, r in enumerate(records):
        leader = 2 * (rank // 2)
        a = 10 + 20 * (rank // 2)  # the replica's prompts start with a and a + 1
        # vLLM's fake: sample k of prompt p starts at p[0] + k; TRT-LLM greedy: one sample, copied
        starts = [a, a + 1, a + 1, a + 2] if kind == "vllm" else [a, a, a + 1, a + 1]
        # every rank of a replica gets its leader's rollouts (log-prob -(leader + 1))
        assert r["tokens"] == [[s, s + 1, STOP, PAD] for s in starts] and r["lengths"] == [3] * 4
        assert r["logprobs"] == [[-(leader + 1.0)] * 3 + [0.0]] * 4
        if rank == leader:
            assert r["timings"]  # the leader reports the refit
            # its refit is its own replica's sum: ranks 0 + 1 -> 1 + 2, ranks 2 + 3 -> 3 + 4
            group_sum = (leader + 1.0) + (leader + 2.0)
            assert r["loaded"] == {name: torch.zeros(shape).numel() * group_sum for name, shape in WEIGHTS.items()}
            if kind == "vllm":
                assert r["prompts"][0] == [[a, 5], [a + 1, 6, 7]]


def test_a_failing_engine_fails_its_whole_replica(ranks):
    records = [r["vllm"] for r in ranks[0]]
    assert "the engine broke" in records[0]["failure"]  # the leader's own error
    assert records[1]["failure"] == "RuntimeError: the rollout engine on rank 0 failed: ValueError: the engine broke"
    assert [r["failure"] for r in records[2:]] == [None, None]  # the other replica is unaffected
