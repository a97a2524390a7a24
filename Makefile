# scanside: `make run` and `make test` set themselves up in a fresh virtual environment.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test bench bench-cpu soak clean setup system-deps browser-deps

setup: $(STAMP)

# torch==2.13.0 is pinned in the train extra: a CPU build this machine kind keeps on local disk
# (an unpinned torch downloads several GB of CUDA wheels).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,train]'
	touch $(STAMP)

run: $(STAMP)
	-$(VENV)/bin/scanside models import-taps  # the gland model trained on real patients; skipped offline
	$(VENV)/bin/scanside demo

# A real KServe v2 server for the Triton engine test: Seldon MLServer pins its own FastAPI, so it
# lives in a venv of its own.
MLSERVER := .venv-mlserver/bin/mlserver
$(MLSERVER):
	$(PYTHON) -m venv .venv-mlserver
	.venv-mlserver/bin/pip install --quiet mlserver onnxruntime numpy

# Debian tools the tests drive for real: Prometheus and promtool (monitoring kit), dcmtk's storescu and
# echoscu (C-STORE receiver), dicom3tools' dciodvfy (validates the SR/SEG output), systemd-analyze (unit checks), python3-seccomp (the unit's seccomp rules).
# apt-get installs whatever is missing (as root, as on CI, or through sudo); nothing when all are there.
DEB_TOOLS := promtool:prometheus storescu:dcmtk systemd-analyze:systemd dciodvfy:dicom3tools
system-deps:
	@missing=""; for pair in $(DEB_TOOLS); do command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; done; \
	ls /usr/lib/python3/dist-packages/seccomp*.so >/dev/null 2>&1 || missing="$$missing python3-seccomp"; \
	if [ -n "$$missing" ]; then \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
	  echo "installing Debian packages:$$missing"; \
	  ( $$SUDO apt-get -o DPkg::Lock::Timeout=300 update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get \
	    -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends $$missing >/dev/null ) \
	  || echo "warning: could not install$$missing; the tests that need them are skipped"; \
	fi

# Debian's chromium for the console browser test, driven by Playwright with executable_path (never
# `playwright install`, which downloads a browser build): installed only when missing and we are root.
browser-deps:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian chromium"; \
	  ( apt-get -o DPkg::Lock::Timeout=300 update -qq && DEBIAN_FRONTEND=noninteractive apt-get \
	    -o DPkg::Lock::Timeout=300 install -y -qq chromium fonts-dejavu-core >/dev/null ) \
	  || echo "warning: could not install chromium; the console browser test is skipped"; \
	fi

test: $(STAMP) $(MLSERVER) system-deps browser-deps
	$(PY) -m pytest -q

# Long runs: every test marked `soak` (deselected from make test), then the ingest fuzzer under its long
# hypothesis profile, which records inputs tried and outcomes in bench/results/fuzz.json.
# pytest exits 5 when no test carries the marker: not a failure here.
soak: $(STAMP)
	$(PY) -m pytest -q -m soak -o timeout=0 || [ $$? -eq 5 ]
	$(PY) bench/fuzz_report.py soak

bench: $(STAMP)
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# CPU inference figures on a quiet machine: every model x back end x variant (cpu.json), then the roofline
# that reads it (roofline.json/md), then decode/prepare before-after (decode.json)
bench-cpu: $(STAMP)
	$(PY) bench/bench_cpu.py
	$(PY) bench/roofline.py
	$(PY) bench/bench_decode.py

clean:
	rm -rf $(VENV) var .pytest_cache
