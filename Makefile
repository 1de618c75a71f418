# Two commands on a fresh machine:  `make demo` (set up + run the default attack), `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# A loose torch requirement pulls several GB of CUDA packages; pin the CPU build (see README).
TORCH  ?= torch==2.13.0

.PHONY: setup demo test bench peers audits clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/leakkit run dlg --out runs/demo

test: setup
	$(BIN)/pytest

bench: setup
	$(BIN)/python bench/vision.py
	$(BIN)/python bench/text.py
	$(BIN)/python bench/audit.py

# the defense audits behind the README's figures (about an hour on 2 cores)
# leakkit against breaching 0.1.2 (installed without its torchvision requirement; see bench/peers.py)
peers: setup
	$(BIN)/pip install --quiet --no-deps breaching==0.1.2
	$(BIN)/pip install --quiet hydra-core
	$(BIN)/python bench/peers.py

audits: setup
	LEAKKIT=$(BIN)/leakkit bash bench/audits.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
