# Two commands for a newcomer: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= runs/demo
LATENTS ?= 2 5 10 20
DEMO_EPOCHS ?= 10

.PHONY: setup data demo test test-slow clean

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "vaekit needs Python 3.10 or newer; " + sys.executable + " is " + sys.version.split()[0] + ". Name one: make demo PYTHON=python3.12")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

data: setup
	$(BIN)/vaekit data fetch mnist

# The tutorials' models: latent sizes 2, 5, 10, 20 (784-400-D, Bernoulli, dynamic binarization),
# then their comparison. Rewrites $(DEMO) from scratch each time.
demo: data
	rm -rf $(DEMO)
	@for z in $(LATENTS); do \
	  echo "== training latent size $$z"; \
	  $(BIN)/vaekit train --out $(DEMO)/z$$z --preset pytorch-example --latent-dim $$z \
	    --epochs $(DEMO_EPOCHS) || exit $$?; \
	done
	$(BIN)/vaekit compare $(foreach z,$(LATENTS),$(DEMO)/z$(z)) --out $(DEMO)
	@echo "open $(DEMO)/report.html"

test: setup
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: setup
	$(BIN)/python -m pytest -m slow -q

# The environment only: runs/ holds trained models (the demo's and the user's) and is kept.
clean:
	rm -rf $(VENV) .pytest_cache
