# make demo: set up .venv if needed, then pretrain on the bundled demo photos.
# make test: set up .venv if needed, then run the test suite.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.requirements-installed

.PHONY: demo test venv clean

venv: $(STAMP)

# Pinned dependencies first, then eva_jax itself editable and without deps (they are the pins), so
# the eva-* console scripts land in .venv/bin and `import eva_jax` works from any directory.
# Reinstalls when the pins or the package metadata (scripts, package list) change.
$(STAMP): requirements.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -r requirements.txt
	$(VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/eva-pretrain --config=pretrain_demo --workdir=workdirs/demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest tests -q -n 2 --durations=15

clean:
	rm -rf $(VENV) workdirs build dist *.egg-info
