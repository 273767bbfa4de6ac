# bezoar: one script call per target. The first target run creates .venv/ and installs the pins.
PY     := .venv/bin/python
RUN    := $(PY) -u
STAMP  := .venv/.installed-runtime
TSTAMP := .venv/.installed-test

.PHONY: demo base data sft dpo eval test bench gpu-check download help
help:
	@echo "make sft dpo eval  the recipe on the embedded CPU default (toy world, tiny LLaMA; ~8 min on 2 cores)"
	@echo "make base      pretrain the tiny toy base into runs/base (~9 min); without it sft starts from the shipped toy/pretrained"
	@echo "make data      synthetic SFT data into runs/data: GENERATOR_URL/_MODEL, JUDGE_URL/_MODEL; none: toy stand-ins"
	@echo "make demo      build a tiny model and tokenizer, save, reload and sample from it (CPU, ~1 min)"
	@echo "make test      run the test suite twice, CPU speed paths on and off (installs the test-only oracles first)"
	@echo "make bench     run the benchmarks in bench/ (slow; needs ~10 GB of disk for the 3B checkpoint)"
	@echo "make gpu-check CUDA against CPU, the 3B steps against their peers (one GPU, < 5 min; no GPU: the CPU half)"
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
	$(RUN) -m toy.demo

# The embedded default: base → SFT stages (LaMini → Orca → Evol-Instruct → HH-RLHF) → DPO → report.
# Each step resumes where it stopped; delete runs/ to start over.
# The base, like OpenLLaMA 3B v2 for the 3B recipe, comes pretrained: toy/pretrained is what `python -m toy.base`
# writes with its defaults (~9 min on 2 cores). sft checks it against toy/world.py and those defaults and copies it
# to runs/base; `make base` pretrains runs/base here instead.
runs/base/model.safetensors: | $(STAMP)
	$(RUN) -m toy.base --shipped toy/pretrained

base: $(STAMP)
	$(RUN) -m toy.base

# Synthetic data: generate.py's three schemes, then filter.py, into runs/data/{lamini,orca,evol}.filtered.jsonl.
# A role without GENERATOR_URL/_MODEL (JUDGE_URL/_MODEL) gets the toy stand-in (toy/llm.py) on
# 127.0.0.1. Real inputs: DATA_FLAGS="--seeds dolly.jsonl --topics topics.txt --tasks flan.jsonl".
data: $(STAMP)
	$(RUN) -m synth.pipeline $(DATA_FLAGS)

sft: runs/base/model.safetensors data $(STAMP)
	$(RUN) train_sft.py --config configs/tiny.toml --resume

dpo: $(STAMP)
	@test -d runs/tiny/hh_rlhf/merged || $(MAKE) sft
	$(RUN) train_dpo.py --config configs/dpo-tiny.toml --resume

eval: $(STAMP)
	@test -d runs/tiny-dpo/merged || $(MAKE) dpo
	$(RUN) evaluate.py report

# Twice: as users run it, then with every CPU speed path off (BEZOAR_C_KERNELS=0), so the torch code that CUDA
# runs is tested on its own; the speed paths' own tests skip in the second pass.
test: $(TSTAMP)
	$(PY) -m pytest -q
	BEZOAR_C_KERNELS=0 $(PY) -m pytest -q

bench: $(TSTAMP)
	$(RUN) bench/bench_load.py --nf4
	$(RUN) bench/bench_decode.py
	$(RUN) bench/bench_nf4.py
	$(RUN) bench/bench_sft_step.py
	$(RUN) bench/bench_dpo.py
	$(RUN) bench/bench_chat_api.py
	$(RUN) bench/bench_eval.py

gpu-check: $(TSTAMP)
	$(RUN) bench/gpu_check.py

MODEL ?= openlm-research/open_llama_3b_v2
OUT   ?= checkpoints/open_llama_3b_v2
download: $(STAMP)
	$(RUN) download.py model $(MODEL) --out $(OUT)
