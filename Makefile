# onenip-ray: `make install`, `make test`, `make lint`, `make demo`.
VENV ?= .venv
PY := $(VENV)/bin/python
# This workplace's pip installs exactly these from local disk; elsewhere override TORCH_SPEC
# (e.g. TORCH_SPEC="torch torchvision") or install torch yourself first.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install test lint demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

demo: install
	$(PY) -m demo

clean:
	rm -rf $(VENV) demo_out runs
