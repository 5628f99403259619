"""Memory and wall time of importing a ~1B-parameter Llama-shaped HF checkpoint at TP2.

  python benchmarks/import_hf_1b.py --work /tmp/hf1b [--keep] [--layers 20] [--dtype bfloat16]

A measurement, not a test. It
1. writes a random Llama checkpoint (config.json + sharded safetensors + index) to
   WORK/hf, shard file by shard file: only one shard file's tensors (<= --shard-gb) are ever
   in memory (default 1 GiB: two files for bf16); every tensor comes from its own seeded
   torch.Generator (N(0, 0.02) for matrices,
   ones for the norms), drawn in fp32 and stored in --dtype;
2. runs `torchrun --standalone --nproc_per_node 2 -m nemo_optune.convert --to megatron
   --hf WORK/hf --out WORK/ckpt --tp 2` (OMP_NUM_THREADS=1) and samples every process of the
   tree (torchrun, its workers = the ranks, and their children: dist-checkpointing's forked
   writers) from /proc every --interval seconds: VmRSS, RssAnon, RssFile, and VmHWM (the
   kernel's per-process peak RSS, anon + file-backed mapped pages). Each rank's samples are
   split into phases afterwards: `build` (start-up and the model's random init, until the rank
   first maps a safetensors file), `import` (until the last sample that saw one mapped:
   import_hf's reader opens the files it needs for each megatron tensor and closes them after
   it, so the maps come and go) and `save` (dist_checkpointing.save + manifest hashing);
3. prints JSON and a Markdown table next to the sizes the claim "no rank holds more than its
   shard plus the slices of one tensor" is to be judged against, and where each rank's peak
   RSS came from: the phase of its highest sample, anon vs file-backed (mapped safetensors
   pages), and how much of it the model's build (random init) had already allocated.

By default WORK/hf and WORK/ckpt are deleted at the end (--keep keeps them).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1 << 20


# ------------------------------------------------------------------ the checkpoint
def hf_config(a) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": a.hidden,
        "intermediate_size": a.ffn,
        "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "head_dim": a.hidden // a.heads,
        "vocab_size": a.vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": a.dtype,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
    }


def hf_tensors(a) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, in HF order."""
    h, kv = a.hidden, a.kv_heads * (a.hidden // a.heads)
    out = [("model.embed_tokens.weight", (a.vocab, h))]
    for i in range(a.layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (a.ffn, h)),
            (p + "mlp.up_proj.weight", (a.ffn, h)),
            (p + "mlp.down_proj.weight", (h, a.ffn)),
        ]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (a.vocab, h))]


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def write_checkpoint(a, hf_dir: str) -> dict:
    """Shard file by shard file; returns what was written (and this process's peak RSS)."""
    import torch
    from safetensors.torch import save_file

    dtype, elsize = getattr(torch, a.dtype), torch.finfo(getattr(torch, a.dtype)).bits // 8
    limit = int(a.shard_gb * (1 << 30))
    tensors = hf_tensors(a)
    files, current, size = [], [], 0  # plan the files first: their names say how many there are
    for index, (name, shape) in enumerate(tensors):
        nbytes = numel(shape) * elsize
        if current and size + nbytes > limit:
            files.append(current)
            current, size = [], 0
        current.append((index, name, shape))
        size += nbytes
    files.append(current)
    os.makedirs(hf_dir)
    weight_map, total = {}, 0
    for k, members in enumerate(files):
        file = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
        shard = {}
        for index, name, shape in members:
            if len(shape) == 1:  # RMSNorm weights
                shard[name] = torch.ones(shape, dtype=dtype)
            else:
                gen = torch.Generator().manual_seed(a.seed * 1_000_003 + index)
                shard[name] = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(0.02).to(dtype)
            weight_map[name] = file
            total += shard[name].numel() * elsize
        save_file(shard, os.path.join(hf_dir, file), metadata={"format": "pt"})
        del shard
        print(f"  wrote {file} ({len(members)} tensors)", flush=True)
    with open(os.path.join(hf_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(hf_config(a), f, indent=2)
    return {
        "files": len(files),
        "largest_file_bytes": max(os.path.getsize(os.path.join(hf_dir, f)) for f in set(weight_map.values())),
        "this_process_peak_rss_mb_vmhwm": round(_status(os.getpid()).get("VmHWM", 0) / 1024),
    }


# ------------------------------------------------------------------ sampling /proc
def _status(pid: int) -> dict:
    """kB fields of /proc/PID/status ({} once the process is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    return out


def _maps_safetensors(pid: int, hf_dir: str) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any(hf_dir in line and ".safetensors" in line for line in f)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False


def _rank(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        return int(env[b"RANK"]) if b"RANK" in env else None
    except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError):
        return None


class Sampler(threading.Thread):
    """Samples the process tree under `root_pid` until stop() is called."""

    def __init__(self, root_pid: int, hf_dir: str, interval: float):
        super().__init__(daemon=True)
        self.root, self.hf_dir, self.interval = root_pid, os.path.realpath(hf_dir), interval
        self.t0 = time.monotonic()
        self.ranks = {}  # pid -> {"rank", "samples": [(t, mapped, VmRSS, RssAnon, RssFile, VmHWM) in kB]}
        self.children = {}  # pid (descendant of a rank) -> {"rank", "t", "vmhwm", "max_rss", "max_anon"}
        self.agent = {"vmhwm": 0}
        self.min_available, self.available0 = None, psutil.virtual_memory().available
        self._halt = threading.Event()

    def stop(self):
        self._halt.set()
        self.join()

    def run(self):
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def sample(self):
        now = time.monotonic() - self.t0
        avail = psutil.virtual_memory().available
        self.min_available = avail if self.min_available is None else min(self.min_available, avail)
        self.agent["vmhwm"] = max(self.agent["vmhwm"], _status(self.root).get("VmHWM", 0))
        try:
            workers = psutil.Process(self.root).children()
        except psutil.NoSuchProcess:
            return
        for w in workers:
            if w.pid not in self.ranks:
                rank = _rank(w.pid)
                if rank is None:
                    continue
                self.ranks[w.pid] = {"rank": rank, "samples": []}
            r = self.ranks[w.pid]
            st = _status(w.pid)
            if not st:
                continue
            mapped = _maps_safetensors(w.pid, self.hf_dir)
            r["samples"].append((now, mapped, st["VmRSS"], st["RssAnon"], st["RssFile"], st.get("VmHWM", 0)))
            try:
                descendants = w.children(recursive=True)
            except psutil.NoSuchProcess:
                descendants = []
            for c in descendants:
                cst = _status(c.pid)
                if not cst:
                    continue
                cr = self.children.setdefault(
                    c.pid, {"rank": r["rank"], "t": now, "vmhwm": 0, "max_rss": 0, "max_anon": 0}
                )
                cr["vmhwm"] = max(cr["vmhwm"], cst.get("VmHWM", 0))
                cr["max_rss"] = max(cr["max_rss"], cst["VmRSS"])
                cr["max_anon"] = max(cr["max_anon"], cst["RssAnon"])


# ------------------------------------------------------------------ phases
def rank_row(r: dict, kids: list[dict]) -> dict:
    """One rank's figures (MB, s) from its samples, split into build | import | save."""
    samples = r["samples"]
    mapped = [i for i, s in enumerate(samples) if s[1]]
    i_import = mapped[0] if mapped else len(samples)
    i_save = mapped[-1] + 1 if mapped else len(samples)
    bounds = {"build": (0, i_import), "import": (i_import, i_save), "save": (i_save, len(samples))}
    phase_of = lambda i: next(p for p, (lo, hi) in bounds.items() if lo <= i < hi)  # noqa: E731
    r["timeline"] = [(s[0], phase_of(i), s[3], s[4]) for i, s in enumerate(samples)]
    row = {"rank": r["rank"], "peak_rss_mb_vmhwm": round(max((s[5] for s in samples), default=0) / 1024)}
    end = samples[-1][0] if samples else 0.0
    for phase, (lo, hi) in bounds.items():
        if lo < hi:
            part = samples[lo:hi]
            row[phase] = {
                "peak_rss_mb": round(max(s[2] for s in part) / 1024),
                "peak_anon_mb": round(max(s[3] for s in part) / 1024),
                "peak_file_mb": round(max(s[4] for s in part) / 1024),
                "seconds": round((samples[hi][0] if hi < len(samples) else end) - part[0][0], 1),
            }
    if 0 < i_import < len(samples):
        row["rss_anon_at_import_start_mb"] = round(samples[i_import - 1][3] / 1024)  # the build's result
        row["import_anon_increase_mb"] = row["import"]["peak_anon_mb"] - row["rss_anon_at_import_start_mb"]
    if mapped and i_save < len(samples):
        row["rss_anon_at_save_start_mb"] = round(samples[i_save][3] / 1024)
        row["vmhwm_at_save_start_mb"] = round(samples[i_save][5] / 1024)  # exact peak of build + import
        row["save_anon_increase_mb"] = row["save"]["peak_anon_mb"] - row["rss_anon_at_save_start_mb"]
    if samples:  # the highest sample: where the peak RSS comes from
        i = max(range(len(samples)), key=lambda i: samples[i][2])
        row["highest_sample"] = {
            "phase": phase_of(i),
            "t": round(samples[i][0], 1),
            "rss_mb": round(samples[i][2] / 1024),
            "anon_mb": round(samples[i][3] / 1024),
            "file_mb": round(samples[i][4] / 1024),
        }
    if kids:
        row["children"] = {
            "count": len(kids),
            "phases": sorted(
                {phase_of(min(range(len(samples)), key=lambda i: abs(samples[i][0] - c["t"]))) for c in kids}
            ),
            "max_peak_rss_mb_vmhwm": round(max(c["vmhwm"] for c in kids) / 1024),
            "max_peak_anon_mb": round(max(c["max_anon"] for c in kids) / 1024),
        }
    return row


# ------------------------------------------------------------------ main
def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, n)) for r, _, names in os.walk(path) for n in names)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="directory for the HF checkpoint (WORK/hf) and the result (WORK/ckpt)")
    p.add_argument("--keep", action="store_true", help="keep WORK/hf and WORK/ckpt")
    p.add_argument("--reuse", action="store_true", help="reuse an existing WORK/hf (written by an earlier --keep run)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--shard-gb", type=float, default=1.0, help="safetensors file size limit (GiB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--interval", type=float, default=0.05, help="sampling period in seconds")
    p.add_argument("--timeout", type=float, default=1200, help="kill the conversion after this many seconds")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()

    hf_dir, ckpt = os.path.join(a.work, "hf"), os.path.join(a.work, "ckpt")
    tensors = hf_tensors(a)
    elsize = {"bfloat16": 2, "float16": 2, "float32": 4}[a.dtype]
    n_params = sum(numel(s) for _, s in tensors)
    replicated = sum(numel(s) for _, s in tensors if len(s) == 1)  # norms: every TP rank holds them whole
    rank_params = (n_params - replicated) // a.tp + replicated  # vocab 32000 is a multiple of 128: no padding
    largest_name, largest_shape = max(tensors, key=lambda t: numel(t[1]))
    print(f"{n_params / 1e9:.3f}B parameters, {a.dtype}; rank shard {rank_params / 1e6:.0f}M parameters", flush=True)

    result = {
        "params": n_params,
        "hf_dtype": a.dtype,
        "tp": a.tp,
        "shape": {k: getattr(a, k) for k in ("hidden", "layers", "heads", "kv_heads", "ffn", "vocab")},
    }
    if a.reuse and os.path.exists(os.path.join(hf_dir, "config.json")):
        print(f"reusing {hf_dir}", flush=True)
    else:
        shutil.rmtree(hf_dir, ignore_errors=True)
        t = time.monotonic()
        result["hf_write"] = write_checkpoint(a, hf_dir)
        result["hf_write"]["seconds"] = time.monotonic() - t
    shutil.rmtree(ckpt, ignore_errors=True)
    result["hf_checkpoint_bytes"] = dir_bytes(hf_dir)

    cmd = [
        os.path.join(os.path.dirname(sys.executable), "torchrun"),
        "--standalone",
        f"--nproc_per_node={a.tp}",
        "-m",
        "nemo_optune.convert",
        "--to",
        "megatron",
        "--hf",
        hf_dir,
        "--out",
        ckpt,
        "--tp",
        str(a.tp),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print("running:", "OMP_NUM_THREADS=1", " ".join(cmd), flush=True)
    t = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    sampler = Sampler(proc.pid, hf_dir, a.interval)
    sampler.start()
    try:
        out, _ = proc.communicate(timeout=a.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the session started above: torchrun and its workers only
        out, _ = proc.communicate()
        out += f"\n[killed after {a.timeout} s]"
    wall = time.monotonic() - t
    sampler.stop()
    result["convert"] = {
        "returncode": proc.returncode,
        "wall_seconds": round(wall, 1),
        "output_tail": out.strip().splitlines()[-15:],
    }
    if proc.returncode == 0:
        result["megatron_checkpoint_bytes"] = dir_bytes(ckpt)

    ranks = [
        rank_row(r, [c for c in sampler.children.values() if c["rank"] == r["rank"]])
        for r in sorted(sampler.ranks.values(), key=lambda r: r["rank"])
    ]
    timelines = {
        r["rank"]: [(round(t, 2), phase, anon // 1024, file // 1024) for t, phase, anon, file in r["timeline"]]
        for r in sampler.ranks.values()
    }
    result["ranks"] = ranks
    result["torchrun_agent_peak_rss_mb"] = round(sampler.agent["vmhwm"] / 1024)
    result["machine_available_drop_mb"] = round(
        (sampler.available0 - (sampler.min_available or sampler.available0)) / MB
    )
    result["reference_sizes_mb"] = {
        "rank_shard_params": rank_params,
        "rank_shard_fp32_mb (the model the CLI builds is fp32)": round(rank_params * 4 / MB),
        f"rank_shard_{a.dtype}_mb": round(rank_params * elsize / MB),
        f"largest_hf_tensor_mb ({largest_name} {list(largest_shape)}, {a.dtype})": round(
            numel(largest_shape) * elsize / MB
        ),
        "largest_hf_tensor_as_fp32_mb": round(numel(largest_shape) * 4 / MB),
        "whole_model_fp32_mb": round(n_params * 4 / MB),
        "fc1_shards_of_all_layers_fp32_mb (cloned by dist-checkpointing's save: views)": round(
            a.layers * 2 * a.ffn * a.hidden // a.tp * 4 / MB
        ),
    }
    result["notes"] = [
        "convert builds the policy only (with_reference=False); on CPU its optimizer is torch AdamW, whose state "
        "is allocated lazily at the first step, so it holds no memory here (on GPU: megatron DDP grad buffers).",
        "RssFile counts the pages of the mmap'd safetensors files a rank has touched; they are page cache, "
        "reclaimable, but VmHWM includes them.",
    ]

    print(json.dumps(result, indent=2))
    ref = result["reference_sizes_mb"]
    print(
        f"\n{n_params / 1e9:.3f}B params, HF checkpoint {result['hf_checkpoint_bytes'] / 1e9:.2f} GB ({a.dtype}), "
        f"convert wall {wall:.0f} s, rc {proc.returncode}"
    )
    print(
        "| rank | VmHWM MB | VmHWM at save start | highest sample: phase, anon + file | build peak anon | "
        "anon at import start | import peak anon (file) | import +anon | save peak anon | save +anon | "
        "writer children VmHWM | build/import/save s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in ranks:
        g = lambda ph, k, r=r: r.get(ph, {}).get(k, "")  # noqa: E731
        hs = r.get("highest_sample", {})
        print(
            f"| {r['rank']} | {r['peak_rss_mb_vmhwm']} | {r.get('vmhwm_at_save_start_mb', '')} | "
            f"{hs.get('phase', '')}, {hs.get('anon_mb', '')} + {hs.get('file_mb', '')} | {g('build', 'peak_anon_mb')} | "
            f"{r.get('rss_anon_at_import_start_mb', '')} | "
            f"{g('import', 'peak_anon_mb')} ({g('import', 'peak_file_mb')}) | {r.get('import_anon_increase_mb', '')} | "
            f"{g('save', 'peak_anon_mb')} | {r.get('save_anon_increase_mb', '')} | "
            f"{r.get('children', {}).get('max_peak_rss_mb_vmhwm', '')} | "
            f"{g('build', 'seconds')}/{g('import', 'seconds')}/{g('save', 'seconds')} |"
        )
    shard = ref["rank_shard_fp32_mb (the model the CLI builds is fp32)"]
    for r in ranks:  # how much of the peak the model's build (random init) had already allocated
        if r.get("rss_anon_at_import_start_mb") and r.get("vmhwm_at_save_start_mb"):
            built, peak = r["rss_anon_at_import_start_mb"], r["vmhwm_at_save_start_mb"]
            print(
                f"rank {r['rank']}: peak RSS of build + import {peak} MB; the build (start-up + megatron's random "
                f"init) left {built} MB anon = {100 * built / peak:.0f}% of it ({shard} MB of it the fp32 shard); "
                f"build-phase peak anon {r['build']['peak_anon_mb']} MB"
            )
    print("\nfor comparison (MB): " + "; ".join(f"{k} = {v}" for k, v in ref.items() if k != "rank_shard_params"))
    if a.json:  # with every rank's samples: (seconds, phase, RssAnon MB, RssFile MB)
        with open(a.json, "w") as f:
            json.dump({**result, "timeline": timelines}, f, indent=1)
    if not a.keep:
        shutil.rmtree(hf_dir, ignore_errors=True)
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(ckpt + ".tmp", ignore_errors=True)
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
