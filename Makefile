# Two entry points, each sets everything up on a fresh machine first:
#   make run   - start the voice agent on its embedded defaults (http://127.0.0.1:8000/)
#   make test  - run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test setup clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,train]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/voice-agent serve $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
