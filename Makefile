# The two commands a newcomer runs (see README):  make demo   and   make test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

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

bench: $(STAMP)
	$(PY) benchmarks/compare_methods.py --out bench_out $(ARGS)

clean:
	rm -rf runs bench_out
