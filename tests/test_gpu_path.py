"""The GPU path checked on CPU (issue 27): the package's import graph, device discipline of
scoring, the pool exchange, the loss and the metrics (tests/device_discipline.py), and the GPU
smoke script's CPU-only part."""

import ast
import os

import torch

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
