# adapmoe: `make demo` runs the embedded default, `make test` the test suite.
# Both create .venv and install what they need (torch 2.13.0 CPU build first, so that the
# loose `torch>=2.4` requirement never pulls a multi-GB CUDA build).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test proto install bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[torch,k8s,bench,test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/moe-decoder demo

# pytest exits 5 when it collects nothing: make treats any non-zero exit as failure.
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

proto: $(STAMP)
	$(BIN)/python proto/gen.py

clean:
	rm -rf $(VENV) .demo
