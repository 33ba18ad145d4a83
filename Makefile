# Quick start: `make demo` then `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench clean

$(STAMP): setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision pinned as a matched CUDA pair (runs on CPU too, and brings triton)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m onlineaug demo

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest tests -q --timeout=600

test-fast: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest tests -q -m "not slow" --timeout=300

bench: $(STAMP)
	$(PY) benchmarks/kernels.py --quick
	$(PY) benchmarks/generator.py --quick
	$(PY) benchmarks/overhead.py --quick
	$(PY) -m onlineaug plan --measure --quick --results-md benchmarks/RESULTS.md

clean:
	rm -rf $(VENV) runs build *.egg-info
