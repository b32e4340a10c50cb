# The two commands (README): `make repro` runs the pipeline on the defaults, `make test` the tests.
# Both create the virtual environment in .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SHARED_CIFAR := ../shared/datasets/cifar10-jpg.tar.gz
# The quick run: whole pipeline on the shared CIFAR-10, narrow model, 2 CPU cores, 6 to 7 minutes.
QUICK := -S data.source=$(SHARED_CIFAR) -S model.width=16 -S train.batch_size=256 \
	-S train.epochs=5 -S lr_find.num_iter=150

export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: env repro quick test test-shuffled test-fast lint format mlflow-ui mlflow-server reset-params bench bench-lr study-full study-schedules \
	study-lr study-transfer ci-pipeline ci-baseline clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

env: $(STAMP)

repro: $(STAMP)  ## the main job: the whole pipeline on params.yaml's defaults
	dvc repro

quick: $(STAMP)  ## the quick run (CPU, shared CIFAR-10), recorded as a DVC experiment
	dvc exp run $(QUICK)

lint: $(STAMP)
	ruff check .
	ruff format --check .

# Three workers (pytest-xdist): on the 2-core dev machine two were 1.4x faster than one process,
# and three 270 s -> 243 s faster than two (docs/development.md). Scopes are single tests, except
# the modules whose server is a module fixture (tests/conftest.py, ONE_WORKER). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 3
test: lint  ## lint, then every test (CI runs exactly this), the slowest listed
	pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder --durations=25

# The same suite in a shuffled order (pytest-random-order; the seed is printed, RANDOM_SEED=N
# repeats an order): no test may depend on another having run first.
RANDOM_SEED ?= $(shell date +%s)
test-shuffled: lint  ## every test, in a shuffled order
	pytest -n $(TEST_WORKERS) --dist loadscope --random-order-bucket=global \
		--random-order-seed=$(RANDOM_SEED) --durations=10

test-fast: lint  ## the in-process tests only: no pipeline run, no server, no queue
	pytest -m "not slow and not long"

format: $(STAMP)
	ruff check --fix .
	ruff format .

bench: $(STAMP)  ## training step vs a bare loop on this device: a table and metrics/bench.json
	python -m onecycle.commands.bench

# Studies (docs/studies.md): queued DVC experiments, reported from MLflow into reports/<study>/.
# Started again, a study runs only what has not finished on this commit.
study-schedules: $(STAMP)  ## 1cycle vs constant, step and cyclic LR, 3 seeds each
	python -m onecycle.commands.study run studies/schedules.yaml

# The full recipe over seeds, for one CUDA GPU (docs/studies.md). FULL_SET adds overrides, e.g.
# FULL_SET="--set data.source=/data/cifar-10-python.tar.gz" on a machine without a network.
FULL_SET ?=
study-full: $(STAMP)  ## the default recipe: max LR auto x 5 seeds beside 0.2 / 0.4 / 0.8 x 2 (GPU)
	python -m onecycle.commands.study run studies/full.yaml $(FULL_SET)

study-lr: $(STAMP)  ## fixed max LRs 0.01..1.0 vs each suggestion method's pick, 3 seeds each
	python -m onecycle.commands.study run studies/lr.yaml

# The LR-choice benchmark (docs/method.md): per scenario of studies/lr-choice/, range-test
# sweeps stored as data and a grid of fixed max LRs through the pipeline (hours of CPU; resumes),
# then every suggestion rule scored offline into reports/lr-choice/. Never run by CI.
LR_CHOICE := quick small finetune mobilenet width64
bench-lr: $(STAMP)  ## the LR-choice benchmark: sweeps, grids, then the rules scored (hours)
	python -m onecycle.data.subset $(SHARED_CIFAR) data/transfer/animals --classes bird,cat,deer,dog,frog,horse
	python -m onecycle.data.subset $(SHARED_CIFAR) data/transfer/vehicles --classes airplane,automobile,ship,truck
	python -m onecycle.commands.lrbench run $(LR_CHOICE:%=studies/lr-choice/%.yaml)

# The transfer example: CIFAR-10's animals and vehicles as image folders of their own (under
# data/transfer/), then the study: its source run first, then every setting from its checkpoint.
study-transfer: $(STAMP)  ## animals -> vehicles at 100 images a class: scratch/frozen/fine-tuned x 1cycle/fixed
	python -m onecycle.data.subset $(SHARED_CIFAR) data/transfer/animals --classes bird,cat,deer,dog,frog,horse
	python -m onecycle.data.subset $(SHARED_CIFAR) data/transfer/vehicles --classes airplane,automobile,ship,truck
	python -m onecycle.commands.study run studies/transfer.yaml

# MLflow's job runner (GenAI scorers, trace archival; unused here) stays off: on, it polls for nothing.
mlflow-ui: $(STAMP)  ## browse the runs at http://127.0.0.1:5000 (it prints the runs table's URL)
	@echo "MLflow UI: open $$(python -c 'from onecycle.tracking.connect import ui_url; print(ui_url("http://127.0.0.1:5000"))')"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=$${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} \
		mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

# A tracking server for a team (docs/teams.md): `mlflow server` on a PostgreSQL backend
# store, artifacts proxied through it (--serve-artifacts) into MLFLOW_ARTIFACTS_DESTINATION (a
# folder or an object store URI such as s3://bucket/mlflow), with MLflow's basic-auth app (users
# and permissions in the same database). onecycle/tracking/team_server.py checks every setting first (one
# line naming the variable) and keeps the database password off the command line. The pipeline
# logs to it with MLFLOW_TRACKING_URI=http://<host>:<port> and MLFLOW_TRACKING_USERNAME/PASSWORD.
MLFLOW_SERVER_HOST ?= 127.0.0.1
MLFLOW_SERVER_PORT ?= 5000
MLFLOW_SERVER_WORKERS ?= 2
MLFLOW_SERVER_ALLOWED_HOSTS ?=# the names clients use; needed for a bind beyond loopback
MLFLOW_SERVER_AUTH ?= basic-auth# `off`: no users at all (warned about at every start)
MLFLOW_SERVER_DB_WAIT ?= 20# seconds to wait for PostgreSQL before giving up
MLFLOW_SERVER_AUTH_CACHE ?= 60# seconds a checked password is trusted (MLflow's cache; 0: never)
mlflow-server: $(STAMP)  ## MLflow server on PostgreSQL: set MLFLOW_BACKEND_STORE_URI=postgresql://...
	python -m onecycle.tracking.team_server --host $(MLFLOW_SERVER_HOST) --port $(MLFLOW_SERVER_PORT) \
		--workers $(MLFLOW_SERVER_WORKERS) --allowed-hosts "$(MLFLOW_SERVER_ALLOWED_HOSTS)" \
		--auth "$(MLFLOW_SERVER_AUTH)" --db-wait $(MLFLOW_SERVER_DB_WAIT) \
		--auth-cache "$(MLFLOW_SERVER_AUTH_CACHE)" \
		--artifacts "$(CURDIR)/mlartifacts-server"

# params.yaml back to the committed defaults. Not `git checkout params.yaml`: after a failed
# `dvc exp run -S ...` git can show the file clean while it holds the refused value.
reset-params:
	git show HEAD:params.yaml > params.yaml

# The experiments side by side: test accuracy, both max_lr values, where train's came from.
EXP_TABLE := dvc exp show --md --no-pager --drop '.*' \
	--keep 'Experiment|accuracy$$|.*:max_lr$$|max_lr_source|train_seconds|train.epochs|train.max_lr|base.seed'

# CI (see .ci/run): the quick run through DVC and the metric gate. The max_lr override path
# (`-S train.max_lr=...`: that LR used, lr_find not rerun) is tests/test_pipeline.py's, on the
# suite's tiny run: run here at the quick run's size it cost .ci/run about 85 s.
ci-pipeline: $(STAMP)
	dvc exp run -n ci-quick-$$(date +%s) $(QUICK)
	$(EXP_TABLE)
	python -m onecycle.commands.gate

# Deliberately replace ci/baseline.json's metrics with a fresh quick run's (tolerances are kept).
ci-baseline: $(STAMP)
	dvc exp run $(QUICK)
	python -m onecycle.commands.gate --update

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
