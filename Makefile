# scanside: `make run` and `make test` set themselves up in a fresh virtual environment (one .venv for both).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# two stamps in the one venv: `make run` needs the agent's runtime only; `make test` adds the test and
# training extras (PyTorch, Playwright, OpenVINO, tritonclient, ...: about 2 GB)
STAMP_RUN  := $(VENV)/.installed-run
STAMP      := $(VENV)/.installed
PIP_QUIET  := --quiet --disable-pip-version-check

.PHONY: run test bench bench-cpu gpu-check soak clean setup setup-run system-deps browser-deps taps say-test-installs

setup: $(STAMP)
setup-run: $(STAMP_RUN)

$(PY):
	@echo "make: creating the virtual environment $(VENV) (Python >= 3.10)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_QUIET) --upgrade pip

$(STAMP_RUN): pyproject.toml | $(PY)
	@echo "make: installing scanside and its runtime dependencies into $(VENV) (no test or training extras)"
	$(PY) -m pip install $(PIP_QUIET) -e .
	touch $(STAMP_RUN)

# torch==2.13.0 is pinned in the train extra: a CPU build this machine kind keeps on local disk
# (an unpinned torch downloads several GB of CUDA wheels).
$(STAMP): pyproject.toml | $(PY)
	@echo "make: installing scanside with its test and training extras into $(VENV) (PyTorch CPU, Playwright, OpenVINO, ...)"
	$(PY) -m pip install $(PIP_QUIET) -e '.[test,train]'
	touch $(STAMP) $(STAMP_RUN)

# The real-data-trained TAPS prostate gland model (third-party, MIT, 80 MB: never committed) is fetched and
# registered by `scanside models import-taps`. An optional step of its own: announced, skipped with
# SCANSIDE_OFFLINE=1 or when already imported, and never fatal (the agent runs without it).
TAPS_MANIFEST := engines/models/prostate-gland-taps/1.1.2/manifest.json
taps: $(STAMP_RUN)
	@if [ -f $(TAPS_MANIFEST) ]; then :; \
	elif [ "$$SCANSIDE_OFFLINE" = 1 ]; then echo "make: SCANSIDE_OFFLINE=1: TAPS gland model not imported"; \
	else echo "make: optional step: importing the TAPS gland model (lavlab-taps 1.1.2 wheel, ~74 MB, kept in $${SCANSIDE_CACHE_DIR:-$$HOME/.cache/scanside}/wheels)"; \
	  PIP_DEFAULT_TIMEOUT=20 PIP_RETRIES=1 $(VENV)/bin/scanside models import-taps \
	  || echo "make: warning: TAPS gland model not imported (offline?); the agent runs without it. Later: $(VENV)/bin/scanside models import-taps"; \
	fi

run: $(STAMP_RUN) taps
	@echo "make: to use the scanside command directly: export PATH=\"$(CURDIR)/$(VENV)/bin:\$$PATH\"   (or: source $(VENV)/bin/activate)"
	$(VENV)/bin/scanside demo

# A real KServe v2 server for the Triton engine test: Seldon MLServer pins its own FastAPI, so it
# lives in a venv of its own.
MLSERVER := .venv-mlserver/bin/mlserver
$(MLSERVER):
	@echo "make: creating .venv-mlserver with Seldon MLServer (~400 MB) for the Triton/KServe engine test"
	$(PYTHON) -m venv .venv-mlserver
	.venv-mlserver/bin/pip install --quiet mlserver onnxruntime numpy

# Debian tools the tests drive for real: Prometheus and promtool (monitoring kit), dcmtk's storescu and
# echoscu (C-STORE receiver), dicom3tools' dciodvfy (validates the SR/SEG output), systemd-analyze (unit checks), python3-seccomp (the unit's seccomp rules).
# apt-get installs whatever is missing (as root, as on CI, or through sudo); nothing when all are there.
# Orthanc (Debian orthanc, /usr/sbin/Orthanc): the PACS of the end-to-end DICOM test (tests/agent/test_orthanc.py).
DEB_TOOLS := promtool:prometheus storescu:dcmtk systemd-analyze:systemd dciodvfy:dicom3tools Orthanc:orthanc
system-deps:
	@missing=""; for pair in $(DEB_TOOLS); do tool=$${pair%%:*}; \
	  command -v $$tool >/dev/null 2>&1 || [ -x /usr/sbin/$$tool ] || missing="$$missing $${pair##*:}"; done; \
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

# Say what `make test` installs besides .venv before doing it (each step is skipped when already there).
say-test-installs:
	@echo "make test installs, where missing: Debian packages (apt-get, as root or via sudo -n): prometheus, dcmtk,"
	@echo "  systemd, dicom3tools, orthanc, python3-seccomp, chromium (root only); a second venv .venv-mlserver"
	@echo "  (Seldon MLServer, ~400 MB, for the KServe v2 test); the lavlab-taps wheel (~74 MB) into"
	@echo "  $${SCANSIDE_CACHE_DIR:-$$HOME/.cache/scanside}/wheels (make taps; SCANSIDE_OFFLINE=1 skips it)."

test: say-test-installs $(STAMP) $(MLSERVER) system-deps browser-deps taps
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

# on a GPU machine, no network needed: the TensorRT back end's CUDA path in one go (bench/README.md);
# PYTHON is whatever interpreter has the project's dependencies there
gpu-check:
	$(PYTHON) bench/gpu_check.py

clean:
	rm -rf $(VENV) var .pytest_cache
