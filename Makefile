# mallwatt: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_SECONDS ?= 120

.PHONY: setup demo test test-unit lint bench stack-up stack-down clean

setup: $(STAMP)  ## virtualenv, pinned packages, Kafka jars (cached outside git)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -c "from infra.kafka_runtime import ensure_kafka_jars; ensure_kafka_jars()"
	@touch $@

demo: setup  ## simulated mall end to end for DEMO_SECONDS, then a summary
	$(BIN)/mallwatt demo --seconds $(DEMO_SECONDS)

test: setup  ## starts the broker, runs every test, stops the broker; fails if anything fails
	@$(BIN)/mallwatt stack up --kafka-only || exit 1; \
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=20; rc=$$?; \
	$(BIN)/mallwatt stack down; exit $$rc

test-unit: setup
	$(BIN)/python -m pytest -q -m "not integration"

lint: setup
	$(BIN)/ruff check .

stack-up: setup
	$(BIN)/mallwatt stack up

stack-down:
	$(BIN)/mallwatt stack down

clean: stack-down
	rm -rf var
