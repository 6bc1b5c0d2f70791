# make demo : create .venv, install, run the main job on the embedded default (no download, no credentials)
# make test : create .venv, install, run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export NO_PROXY := 127.0.0.1,localhost

.PHONY: demo test bench-storage bench-runtime clean-store

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	# CPU machines take torch 2.13.0 (its CPU build lies on disk); an unpinned torch pulls a multi-GB CUDA build
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch; \
	else $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e '.[test]'
	# compile the planner's numba kernel once now (cached beside it) rather than in the first process that plans
	$(BIN)/python -c "from policies.ranking import PrefetchPlanner; PrefetchPlanner().warm_up()"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python -m jobs.demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

bench-storage: $(BIN)/.installed
	$(BIN)/python -m jobs.bench_storage --quick --json bench-out/storage.json

bench-runtime: $(BIN)/.installed
	$(BIN)/python -m jobs.bench_runtime --json bench-out/runtime.json

clean-store:
	rm -rf .store
