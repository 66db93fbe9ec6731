# The README's two commands: `make demo` (set up, then the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
# The CPU build; on a GPU machine set TORCH to the build you want, e.g. TORCH=torch.
TORCH ?= torch==2.13.0

.PHONY: demo test install clean

demo: install
	$(VENV)/bin/python examples/demo_minilm.py

test: install
	$(VENV)/bin/python -m pytest

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(TORCH)
	$(VENV)/bin/pip install -e ".[test,demo]"
	touch $@

clean:
	rm -rf $(VENV)
