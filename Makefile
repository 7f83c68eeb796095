# minillm: `make demo` trains and samples offline on CPU; `make test` runs the test suite.
# The virtual environment is created (or reused) in $(VENV). TORCH pins the PyTorch build:
# torch==2.13.0 is the CPU build used by CI; on a GPU machine run `make install TORCH=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest tests

# Train the tiny preset on the synthetic corpus (CPU, a few minutes), then print samples.
demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/python train.py experiment=demo
	$(BIN)/python eval.py ckpt_path=runs/demo/checkpoints/best.ckpt mode=sample max_new_tokens=120

# Training throughput and MFU of the llama2.c shapes on a CUDA GPU (docs/gpu.md).
bench: $(STAMP)
	$(BIN)/python bench/gpu_throughput.py

clean:
	rm -rf outputs multirun runs .pytest_cache
