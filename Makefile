# Two commands from a fresh clone:
#   make demo   set up .venv and run a prompt through a cluster on the built-in tiny model
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test setup clean

$(BIN)/fiddler: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --editable '.[test]'
	touch $@

setup: $(BIN)/fiddler

demo: setup
	$(BIN)/fiddler run --workers 2 --max-new-tokens 24 "Mixture-of-experts models route each token to"

# Two test processes: most tests wait on the workers and launchers they start. Each process runs its own session
# (runtime folder, shared clusters), so neither sees the other's files as leftovers. More would crowd a 2-core machine.
test: setup
	$(BIN)/python -m pytest -q -n 2

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
