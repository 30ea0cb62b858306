# Two commands: `make demo` and `make test`. Both set up .venv first (idempotent).
VENV    ?= .venv
PY      := $(VENV)/bin/python
BIN     := $(CURDIR)/$(VENV)/bin
DATA    ?= data/synthetic
ROWS    ?= 3000000
SEED    ?= 0
RUN     ?= runs/demo
NPROC   ?= 2
PYTEST_ARGS ?=

.PHONY: all install data demo test test-fast clean

all: demo

install:
	@bash tools/install.sh

$(DATA)/.generated-$(ROWS)-$(SEED): | install
	@rm -f $(DATA)/.generated-*
	$(PY) -m dlrm_mtl generate --out $(DATA) --rows $(ROWS) --seed $(SEED)
	@touch $@

data: install $(DATA)/.generated-$(ROWS)-$(SEED)

# Train on the synthetic data with NPROC workers launched by TorchX (local_cwd, gloo on CPU).
demo: data
	@rm -rf $(RUN)
	PATH="$(BIN):$$PATH" $(BIN)/torchx run -s local_cwd launchers/dlrm_mtl_train.py:train \
		-j 1x$(NPROC) --config configs/demo.yaml train.run_dir=$(RUN) data.train=$(DATA)/train data.eval=$(DATA)/eval
	$(PY) -m dlrm_mtl report $(RUN)

# Tests in TEST_WORKERS (default 2) pytest-xdist workers, then those marked `serial` alone
# (tools/run_tests.sh); TEST_WORKERS=0 runs everything in one process.
test: install
	PATH="$(BIN):$$PATH" PY=$(PY) bash tools/run_tests.sh "" $(PYTEST_ARGS)

test-fast: install
	PATH="$(BIN):$$PATH" PY=$(PY) bash tools/run_tests.sh "not slow" $(PYTEST_ARGS)

clean:
	rm -rf runs data/synthetic
