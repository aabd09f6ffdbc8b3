# Two commands on a fresh machine (see README):
#   make demo   set up .venv and run the main job on the embedded default (simulated survey)
#   make test-all  set up .venv, lint (ruff) and run every test (CI: .ci/run)
#   make test      the fast tier: every test not marked slow
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
# torch is pinned to the release this project is tested with; torchvision must match it.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.galaxalign-installed
SOURCES := pyproject.toml CMakeLists.txt $(wildcard csrc/*) $(wildcard kernels/*)

.PHONY: setup browser demo test test-all lint bench clean

setup: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel
	$(PIP) install -q $(TORCH)
	$(PIP) install -q "scikit-build-core>=0.10" "pybind11>=2.13"
	$(PIP) install -q --no-build-isolation -e ".[test]"
	$(PY) -c "import galaxalign_batch._core as c; print('galaxalign_batch._core', dict(c.build_info()))"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/galaxalign-batch demo

# The labelling UI's browser test drives Debian's chromium through Playwright (no browser download).
# Installed here when missing and apt-get can be used (root); otherwise that test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (Debian package) for the labelling UI's browser test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "note: no chromium and no root apt-get: the browser test will skip (install chromium to run it)"; fi; }

test: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(PY) -m ruff check galaxalign_batch tests bench

test-all: setup browser lint
	$(PY) -m pytest -q --durations=15

bench: setup
	$(PY) bench/preprocess.py

clean:
	rm -rf build $(VENV) *.egg-info
