# make demo: set up .venv and train the default recipe on the embedded digits.
# make test: set up .venv and run the whole test suite (what .ci/run calls).
VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# torch is pinned first: on a CPU machine the local 2.13.0 CPU wheel is taken, and the project's
# own `torch>=2.3` requirement is then already satisfied (no CUDA download).
TORCH  ?= torch==2.13.0

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/dragon train

test: setup
	$(PYTHON) -m pytest -n 2

lint: setup
	$(VENV)/bin/ruff check dragontrainer tests bench
	$(VENV)/bin/ruff format --check dragontrainer tests bench

bench: setup
	$(PYTHON) bench/throughput.py --data digits
	$(PYTHON) bench/throughput.py --data cifar-shape

clean:
	rm -rf $(VENV) runs
