# Two commands on a fresh machine with only python3:  make demo  and  make test.
# Both build a local virtual environment (.venv) first. torch==2.13.0 is named explicitly so that a machine with its
# CPU wheel on local disk installs it from there instead of downloading a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv test demo clean

venv: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,demo,crowd]'
	touch $(STAMP)

test: venv
	$(BIN)/python -m pytest tests -q

demo: venv
	$(BIN)/python -m minirlhf.demo

clean:
	rm -rf $(VENV) out .pytest_cache
