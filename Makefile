# Two commands on a fresh machine (see README):
#   make demo   set up .venv and run the main job on the embedded default (simulated survey)
#   make test   set up .venv and run the tests
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
# torch is pinned to the release this project is tested with; torchvision must match it.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.galaxalign-installed
SOURCES := pyproject.toml CMakeLists.txt $(wildcard csrc/*) $(wildcard kernels/*)

.PHONY: setup demo test bench clean

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

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/preprocess.py

clean:
	rm -rf build $(VENV) *.egg-info
