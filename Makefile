# bezoar: one script call per target. The first target run creates .venv/ and installs the pins.
PY     := .venv/bin/python
RUN    := $(PY) -u
STAMP  := .venv/.installed-runtime
TSTAMP := .venv/.installed-test

.PHONY: demo test bench download help
help:
	@echo "make demo      build a tiny model and tokenizer, save, reload and sample from it (CPU, ~1 min)"
	@echo "make test      run the test suite (installs the test-only oracles first)"
	@echo "make bench     run the benchmarks in bench/ (slow; needs ~10 GB of disk for the 3B checkpoint)"
	@echo "make download  fetch OpenLLaMA 3B v2 from the hub (needs network): MODEL=... OUT=..."

$(STAMP): requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(TSTAMP): $(STAMP) requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

demo: $(STAMP)
	$(RUN) demo.py

test: $(TSTAMP)
	$(PY) -m pytest -q

bench: $(TSTAMP)
	$(RUN) bench/bench_load.py
	$(RUN) bench/bench_decode.py
	$(RUN) bench/bench_nf4.py

MODEL ?= openlm-research/open_llama_3b_v2
OUT   ?= checkpoints/open_llama_3b_v2
download: $(STAMP)
	$(RUN) download.py model $(MODEL) --out $(OUT)
