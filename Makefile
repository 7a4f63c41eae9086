# make demo: set up .venv if needed, then pretrain on the bundled demo photos.
# make test: set up .venv if needed, then run the test suite.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.requirements-installed

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -r requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m eva_jax.pretrain --config=configs/pretrain_demo.py --workdir=workdirs/demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest tests -q -n 2 --durations=15

clean:
	rm -rf $(VENV) workdirs
