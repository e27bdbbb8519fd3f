# The two commands of the README: `make demo` and `make test`. Both do all their own setup.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install data test demo demo-lm example example-loop bench eval lint clean mutate

install: $(STAMP) data
	@sh scripts/install_browser.sh

# The torch pin lives in constraints.txt so pip takes the local CPU wheel instead of the CUDA build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# Fashion-MNIST (the demo and the tests) and mlbench's Satellite table (the quality benchmark's second
# dataset, which a test also runs on): `make test` on a fresh machine installs both.
data:
	@sh scripts/install_data.sh
	@sh scripts/install_eval_data.sh

# pytest exit code 5 means "no tests collected": treat it as the failure it is, with a message.
test: install
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests; failing on purpose" >&2; exit 1; fi; \
	exit $$rc

# The README shows exactly these commands.
DEMO := demo_out
FMNIST := $(or $(HARDMINE_FASHION_MNIST),/usr/share/datasets/fashion-mnist)
demo: install
	$(PY) scripts/train_demo_model.py --out $(DEMO)/fashion_mlp.pt
	$(VENV)/bin/hardmine scan $(DEMO)/fashion_mlp.pt $(FMNIST) --model hardmine.zoo:fashion_mlp \
		--out $(DEMO)/scan --dim 64 --overwrite
	$(VENV)/bin/hardmine show $(DEMO)/scan --top 15
	$(VENV)/bin/hardmine export $(DEMO)/scan --out $(DEMO)/oversample.parquet --strategy top-k --top 0.05 --boost 4
	$(VENV)/bin/hardmine neighbors $(DEMO)/scan --ids "$$($(VENV)/bin/hardmine show $(DEMO)/scan --top 1 --json \
		| $(PY) -c 'import json,sys; print(json.load(sys.stdin)[0]["sample_id"])')" -k 8

# The README's "Language models" commands: a tiny GPT-2 trained on Debian's fortune quotations (about a
# minute on 2 cores), scanned as a causal LM, its hardest quotes listed and the hardest one shown token by token.
DEMO_LM := $(DEMO)/lm
demo-lm: $(STAMP)
	@sh scripts/install_lm_data.sh
	$(PY) scripts/train_demo_lm.py --out $(DEMO_LM)
	$(VENV)/bin/hardmine scan $(DEMO_LM)/model $(DEMO_LM)/fortunes.jsonl --task causal-lm \
		--text-column text --id-column id --max-length 64 --out $(DEMO_LM)/scan --dim 64 --overwrite
	$(VENV)/bin/hardmine show $(DEMO_LM)/scan --top 10
	$(VENV)/bin/hardmine tokens $(DEMO_LM)/scan --html $(DEMO_LM)/hardest.html --id "$$($(VENV)/bin/hardmine show \
		$(DEMO_LM)/scan --top 1 --json | $(PY) -c 'import json,sys; print(json.load(sys.stdin)[0]["sample_id"])')"

# API example: exact engine + projector only (no CLI)
example: install
	$(PY) scripts/example_engine.py

# Speed benchmarks: each prints a table of ratios against a reference measured in the same run and writes
# JSON + Markdown to scripts/results/; the README's tables are then refreshed from those files.
bench: install
	$(PY) scripts/bench_extract.py
	$(PY) scripts/bench_extract.py --keep-heap --methods train_step,factored \
		--out scripts/results/bench_extract_keep_heap.json
	$(PY) scripts/bench_callbacks.py
	$(PY) scripts/bench_dispatch.py
	$(PY) scripts/bench_attention.py
	$(PY) scripts/bench_parameters.py
	$(PY) scripts/bench_scan.py
	$(PY) scripts/bench_lm.py
	$(PY) scripts/bench_startup.py
	$(PY) scripts/bench_distributed.py
	$(PY) scripts/bench_conv_routes.py
	$(PY) scripts/measure_index.py
	$(PY) scripts/update_readme.py

# Quality benchmark on two real datasets (Fashion-MNIST, and mlbench's Satellite installed by
# install_eval_data.sh), then the defaults chosen by the rules over both (scripts/eval_summary.py).
eval: install
	@sh scripts/install_eval_data.sh
	$(PY) scripts/eval_quality.py --dataset fashion-mnist --no-online --retrain-weightings 0
	$(PY) scripts/eval_quality.py --dataset satellite --no-online --retrain-weightings 0
	$(PY) scripts/eval_summary.py
	$(PY) scripts/measure_neighbor_signs.py
	$(PY) scripts/update_readme.py

example-loop: install
	$(PY) scripts/example_training_loop.py

# Mutation testing of the core modules (mutmut, config in pyproject.toml; not run in CI): kill rate per module
# to scripts/results/mutation.{json,md}. MUTATE_ARGS e.g. "--modules score,manifest --keep --max-children 2".
MUTATE_ARGS ?=
mutate: install
	$(PY) scripts/mutate.py $(MUTATE_ARGS)

lint: install
	$(PY) -m ruff check hardmine tests scripts

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis demo_out
