# The two commands a newcomer runs (see README):  make demo   and   make test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow install bench mutation clean

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

bench: $(STAMP)
	$(PY) benchmarks/compare_methods.py --out bench_out $(ARGS)

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
