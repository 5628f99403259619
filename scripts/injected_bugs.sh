#!/usr/bin/env bash
# The review's injected bugs, applied one at a time: each must fail at least one test.
# Usage: scripts/injected_bugs.sh   (needs a clean tree: each file is restored with git checkout)
cd "$(dirname "$0")/.."
if ! git diff --quiet; then echo "injected_bugs.sh: the tree has uncommitted changes; it reverts files to HEAD, so commit first" >&2; exit 2; fi
try() {
  local name="$1" file="$2" old="$3" new="$4"; shift 4
  python3 - "$file" "$old" "$new" <<'PY'
import sys
p, old, new = sys.argv[1:]
s = open(p).read()
assert s.count(old) == 1, (p, old)
open(p, "w").write(s.replace(old, new))
PY
  local out; out=$(timeout 900 .venv/bin/python -m pytest -q -p no:cacheprovider "$@" 2>&1 | grep -E "^FAILED|passed|failed" | sed 's/ - .*//' | tr '\n' ';')
  git checkout -q -- "$file"  # run only on a clean tree: this reverts the file to HEAD
  echo "$name => $out"
}
try "(a) weights normalised per micro-batch" nemo_optune/trainers/preference_loss.py \
  '            "weight_total": weight_total,' \
  '            "weight_total": float((weights[s:s + micro_batch_size] * valid[s:s + micro_batch_size]).sum()),' \
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
