# Quick start: `make demo` then `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench bench-gpu bench-gpu-dry clean

$(STAMP): setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision pinned as a matched CUDA pair (runs on CPU too, and brings triton)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m onlineaug demo

# Two pytest workers (pytest-xdist): most tests wait on producer processes, so two keep two cores busy. A module
# whose tests share one expensive fixture (a Ray cluster, a torchrun group) stays on one worker (xdist_group).
TEST_WORKERS ?= 2

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest tests -q --timeout=600 -n $(TEST_WORKERS) --dist loadgroup

test-fast: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest tests -q -m "not slow" --timeout=300 -n $(TEST_WORKERS) --dist loadgroup

# Every GPU figure in one command (about 8 minutes on one H100/H200; benchmarks/README.md). No venv is built
# for it: the GPU machine has no package registry, so it runs with .venv's python if there is one, else python3.
BENCH_PY = $(if $(wildcard $(PY)),$(PY),$(PYTHON))

bench-gpu:
	$(BENCH_PY) benchmarks/gpu_suite.py $(if $(DRY_RUN),--dry-run,)

bench-gpu-dry:
	$(BENCH_PY) benchmarks/gpu_suite.py --dry-run

bench: $(STAMP)
	$(PY) benchmarks/kernels.py --quick
	$(PY) benchmarks/generator.py --quick
	$(PY) benchmarks/producer_loop.py --quick
	$(PY) benchmarks/store_write.py
	$(PY) benchmarks/overhead.py --host-only
	$(PY) benchmarks/overhead.py --quick
	$(PY) -m onlineaug plan --measure --quick --results-md benchmarks/RESULTS.md

clean:
	rm -rf $(VENV) runs build *.egg-info
