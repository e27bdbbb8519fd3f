# The two commands of the README: `make demo` and `make test`. Both do all their own setup.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install data test demo bench eval lint clean

install: $(STAMP) data

# The torch pin lives in constraints.txt so pip takes the local CPU wheel instead of the CUDA build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

data:
	@sh scripts/install_data.sh

# pytest exit code 5 means "no tests collected": treat it as the failure it is, with a message.
test: install
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests; failing on purpose" >&2; exit 1; fi; \
	exit $$rc

demo: install
	$(PY) scripts/demo.py

bench: install
	$(PY) scripts/bench_extract.py

lint: install
	$(PY) -m ruff check hardmine tests scripts

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis demo_out
