# scanside: `make run` and `make test` set themselves up in a fresh virtual environment.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test bench clean setup

setup: $(STAMP)

# torch==2.13.0 is pinned in the train extra: a CPU build this machine kind keeps on local disk
# (an unpinned torch downloads several GB of CUDA wheels).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,train]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/scanside demo

# A real KServe v2 server for the Triton engine test: Seldon MLServer pins its own FastAPI, so it
# lives in a venv of its own.
MLSERVER := .venv-mlserver/bin/mlserver
$(MLSERVER):
	$(PYTHON) -m venv .venv-mlserver
	.venv-mlserver/bin/pip install --quiet mlserver onnxruntime numpy

test: $(STAMP) $(MLSERVER)
	$(PY) -m pytest -q

bench: $(STAMP)
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) var .pytest_cache
