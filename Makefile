# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv and install adaptflow into it first if needed.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch. Override for another build, e.g. `make demo TORCH=torch` on a GPU host.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

# No telemetry, no hub downloads in tests; Prefect's temporary server may take a while to start.
export DO_NOT_TRACK := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install demo ui test test-all lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev,hf,dask]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/adaptflow run studies/demo.yaml

# MLflow's and Prefect's UIs on the project's stores, on free loopback ports, until Ctrl-C.
ui: $(STAMP)
	$(BIN)/adaptflow ui

test: $(STAMP)
	HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# The suite plus the exhaustive torch.compile cases (about 8 more minutes on a cold inductor cache).
test-all: $(STAMP)
	HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "exhaustive or not exhaustive"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf .prefect .cache mlflow.db mlruns reports
