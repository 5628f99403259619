#!/usr/bin/env bash
# The review's injected bugs (make injected-bugs), applied one at a time: each must make at least one
# of the tests named with it fail. They complement `make mutation`, which mutates single tokens of
# the pure loss math only: these are behaviour bugs across the batch assembly, the pool, the
# evaluation and the checkpoint. A pattern that does not occur exactly once in its file (the code
# moved) is an error, never a silent pass. Each file is restored afterwards, also on interrupt.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
backup=$(mktemp -d)
current=""  # the file holding an injected bug right now
trap '[ -n "$current" ] && cp "$backup/original" "$current"; rm -rf "$backup"' EXIT
trap 'exit 130' INT TERM
survived=0

try() {
  local name="$1" file="$2" old="$3" new="$4"
  shift 4
  cp "$file" "$backup/original"
  current="$file"
  if ! "$PY" - "$file" "$old" "$new" <<'PY'; then
import sys

path, old, new = sys.argv[1:]
text = open(path).read()
if text.count(old) != 1:
    sys.exit(f"the pattern occurs {text.count(old)} times in {path}, not once:\n{old}")
open(path, "w").write(text.replace(old, new))
PY
    echo "injected_bugs.sh: case $name: update its pattern" >&2
    exit 2
  fi
  local out rc
  out=$(timeout 900 "$PY" -m pytest -q -x -p no:cacheprovider "$@" 2>&1)
  rc=$?
  cp "$backup/original" "$file"
  current=""
  case $rc in
    0) echo "$name => SURVIVED (every test passed)"; survived=$((survived + 1)) ;;
    1) echo "$name => caught: $(grep -E '^FAILED' <<<"$out" | sed 's/ - .*//' | tr '\n' ' ')" ;;
    *) echo "$name => pytest exit $rc, not a test failure:"; tail -20 <<<"$out"; exit 2 ;;
  esac
}

try "(a) weights normalised per micro-batch" nemo_optune/trainers/preference_loss.py \
  '                "weight_total": weight_total,' \
  '                "weight_total": float((weights[group] * valid[group]).sum()),' \
  tests/test_preference_loss.py tests/test_trainer_behaviour.py
try "(b) chosen and rejected swapped in pair assembly" nemo_optune/trainers/preference_loss.py \
  '    return torch.cat([c_tok, r_tok]), torch.cat([c_mask, r_mask])' \
  '    return torch.cat([r_tok, c_tok]), torch.cat([r_mask, c_mask])' \
  tests/test_preference_loss.py tests/test_trainer_behaviour.py
try "(c) HyPO KL sign flipped" nemo_optune/trainers/preference_loss.py \
  '            loss = loss + kl_weight * kl_loss' \
  '            loss = loss - kl_weight * kl_loss' \
  tests/test_preference_loss.py tests/test_trainer_behaviour.py
try "(d) checkpoint published although a rank's write failed" nemo_optune/runtime/checkpoint.py \
  '        error = err
    error = _first_error(error)
    if not error:' \
  '        error = err
    error = _first_error(None)
    if not error:' \
  tests/test_checkpoint_integrity.py -k published
try "(e) evaluation noise seeded from the iteration" nemo_optune/trainers/preference.py \
  '[mix_seed(self.cfg.data.seed, HELD_OUT_SEED, i) for i in mine]' \
  '[mix_seed(self.cfg.data.seed, HELD_OUT_SEED, len(self.history), i) for i in mine]' \
  tests/test_trainer_behaviour.py
try "(b') chosen and rejected swapped when the pool is refreshed" nemo_optune/trainers/preference_pool.py \
  '            "chosen_tokens": rollouts.response_tokens[rows + chosen],' \
  '            "chosen_tokens": rollouts.response_tokens[rows + rejected],' \
  tests/test_spine.py
# Issue 27's GPU-path crash patterns, caught on CPU by tests/device_discipline.py (docs/gpu.md).
try "(g) CPU tensors in NCCL collectives" nemo_optune/runtime/distributed.py \
  '    summed = values.to(comm_device(), copy=True)' \
  '    summed = values.clone()' \
  tests/test_gpu_path.py -k on_the_gpu_path
try "(h) the DPO loss mixes the log-probs' device with the pool's CPU values" nemo_optune/trainers/preference_loss.py \
  '            mb[key].to(device)' \
  '            mb[key]' \
  tests/test_gpu_path.py -k on_the_gpu_path

if [ "$survived" -gt 0 ]; then
  echo "injected_bugs.sh: $survived injected bug(s) passed every test" >&2
  exit 1
fi
echo "injected_bugs.sh: every injected bug was caught"
