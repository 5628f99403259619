"""Shared by the stand-in `srun` and `scontrol`: Slurm hostlist syntax and the state directory.

Nothing here talks to a Slurm daemon: see README.md in this directory for what the stand-in
does and does not model.
"""

import json
import os
import re
import time


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside [...]."""
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p for p in parts if p]


def _expand_one(name: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", name)
    if not match:
        return [name]
    head, tail = name[: match.start()], name[match.end() :]
    values = []
    for item in match.group(1).split(","):
        if "-" in item:
            lo, hi = item.split("-", 1)
            width = len(lo)  # zero padding: node[07-10] -> node07 ... node10
            values += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        else:
            values.append(item)
    return [expanded for v in values for expanded in _expand_one(head + v + tail)]


def expand_hostlist(text: str) -> list[str]:
    """Slurm's compressed hostlist to names, in order: 'node[1-2],gpu[07-08]' ->
    ['node1', 'node2', 'gpu07', 'gpu08'] (what `scontrol show hostnames` prints)."""
    return [host for part in _split_top(text.strip()) for host in _expand_one(part)]


def tasks_per_node_string(counts: list[int]) -> str:
    """[2, 2, 1] -> '2(x2),1', Slurm's SLURM_TASKS_PER_NODE format."""
    out, i = [], 0
    while i < len(counts):
        j = i
        while j < len(counts) and counts[j] == counts[i]:
            j += 1
        out.append(f"{counts[i]}(x{j - i})" if j - i > 1 else str(counts[i]))
        i = j
    return ",".join(out)


def state_dir() -> str | None:
    """$SLURM_STANDIN_DIR: where the stand-in records what it was asked to do (JSON lines)."""
    path = os.environ.get("SLURM_STANDIN_DIR")
    if path:
        os.makedirs(path, exist_ok=True)
    return path


def record(name: str, entry: dict) -> None:
    """Append one JSON line to $SLURM_STANDIN_DIR/<name> (nothing if the variable is unset)."""
    path = state_dir()
    if path:
        with open(os.path.join(path, name), "a") as f:
            f.write(json.dumps({"time": time.time(), **entry}) + "\n")


def host_address(host: str) -> str:
    """The address the stand-in prints for `host`: $SLURM_STANDIN_HOST_ADDRS maps names that do
    not resolve on this machine ('node1=127.0.0.1,node2=127.0.0.1'); unmapped names print as
    themselves, which is what Slurm prints."""
    mapping = dict(
        item.split("=", 1) for item in os.environ.get("SLURM_STANDIN_HOST_ADDRS", "").split(",") if "=" in item
    )
    return mapping.get(host, host)
