# One command each: `make demo` runs the ridge study end to end, `make test` installs the peer libraries and runs lint
# and every test (the full tier, as CI does: the peer tests and the reduced bench run against kronfluence and dattri),
# `make test-fast` lint and the fast tier (unit and closed-form tests; peer tests skip when the libraries are absent).
# Both run in two pytest-xdist workers (whole files each, the long ones first; each worker's torch and the ifledger
# processes it starts take half the cores: tests/conftest.py).
# torch is installed first, pinned, so pip takes the local CPU build instead of a multi-GB CUDA one.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: install peers demo test test-fast lint bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# The peer libraries (ifledger bench, --methods kronfluence:...), each with --no-deps so that pip never replaces the
# CPU torch (kronfluence requires torchvision, which it does not use, and whose wheels pin a CUDA torch); their
# pure-Python dependencies come from the `peers` extra, which names nothing that depends on torch. (dattri's
# pretty_midi is for its music benchmarks only; traker's CUDA projector, fast_jl, is not needed: it runs on the CPU.)
PEERS ?= kronfluence==1.0.1 dattri==0.3.0 traker==0.3.2 accelerate==1.16.0 einconv==0.1.0
peers: install
	$(BIN)/python -m pip install -q -e '.[peers]'
	$(BIN)/python -m pip install -q --no-deps $(PEERS)
	$(BIN)/python -c "import torch, kronfluence, dattri, trak; print('peers installed; torch', torch.__version__)"

demo: install
	$(BIN)/ifledger run linreg

lint: install
	$(BIN)/ruff check .

test: lint peers
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-fast: lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not full"

bench: install
	$(BIN)/python benchmarks/batched_training.py

clean:
	rm -rf $(VENV) ifledger.duckdb ifledger-reports
