# eigengap: `make demo` runs the main job, `make test` the test suite. Both create or
# refresh .venv first and install everything the project needs (tests' needs included).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.eigengap-installed
DEMO_OUT ?= runs/demo
DEMO_MODEL ?= organism-xs

.PHONY: install browser demo test bench clean

install: $(STAMP) browser

# A headless browser for the report test (Debian's chromium), installed once.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y --no-install-recommends chromium || \
	  { $$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends chromium; }; }

# On a machine without a CUDA GPU, the CPU build of torch (a local wheel or the PyTorch CPU
# index); never the multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(BIN)/pip install "torch==$(TORCH_VERSION)"; \
	else \
	  $(BIN)/pip install "torch==$(TORCH_VERSION)+cpu" 2>/dev/null || \
	  $(BIN)/pip install "torch==$(TORCH_VERSION)+cpu" --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(BIN)/pip install -e '.[test,realweights]'
	touch $(STAMP)

demo: install
	$(BIN)/eigengap organisms prompts --out $(DEMO_OUT)/prompts.txt
	$(BIN)/eigengap scan --model '$(DEMO_MODEL)' --prompts $(DEMO_OUT)/prompts.txt \
	  --out $(DEMO_OUT) --force
	$(BIN)/eigengap sweep sweeps/demo.yaml --out $(DEMO_OUT)/sweeps
	$(BIN)/eigengap report $(DEMO_OUT)/sweeps/demo
	@echo "scan: $(DEMO_OUT)/scan.parquet  heatmap: $(DEMO_OUT)/gap_heatmap.png  summary: $(DEMO_OUT)/summary.md"
	@echo "per-model reports: $(DEMO_OUT)/sweeps/demo/model=*/experiment=*/report.md"
	@echo "cross-model report (a small population: organism-xs x 3 seeds, organism-s x 1): $(DEMO_OUT)/sweeps/demo/report/report.html"
	@echo "MLflow: $(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/$(DEMO_OUT)/sweeps/demo/mlflow.db"
	@echo "the full population (4 sizes x 5 seeds, docs/RESULTS.md): eigengap sweep sweeps/organisms.yaml"

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) runs .pytest_cache
