# Two commands on a fresh machine:  `make demo` (set up + run the default attack), `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# A loose torch requirement pulls several GB of CUDA packages; pin the CPU build (see README).
TORCH  ?= torch==2.13.0

.PHONY: setup demo test bench clean

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

clean:
	rm -rf $(VENV) runs .pytest_cache
