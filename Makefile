# `make demo` and `make test` each create .venv on first use and install memlens into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARCH := $(shell uname -m)
# torch/torchvision pairs that install on this project's machines (CPU execution).
ifeq ($(ARCH),aarch64)
TORCH := torch==2.9.1 torchvision==0.24.1
else
TORCH := torch==2.14.1 torchvision==0.29.1
endif

.PHONY: demo test venv benchmarks lint clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

venv: $(BIN)/.installed

demo: $(BIN)/.installed
	@# memlens run exits as memlens gate does; the demo is built to show the gate failing the non-private level (1)
	$(BIN)/memlens run pipelines/demo.yaml --out runs/demo --jobs 2; code=$$?; \
	if [ $$code -eq 1 ]; then echo "demo: the gate failed the non-private encoder, as the demo is built to show (memlens run exit 1)"; \
	elif [ $$code -ne 0 ]; then exit $$code; fi

test: $(BIN)/.installed
	$(BIN)/python -m pytest -n 2 --durations=15

benchmarks: $(BIN)/.installed
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/dp_overhead.py
	$(BIN)/python benchmarks/audit_throughput.py

lint: $(BIN)/.installed
	$(BIN)/pip install --quiet ruff && $(BIN)/ruff check memlens tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
