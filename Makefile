# linvision developer entry points.
#   make demo   train linvit_t on the real MNIST-5k subset (CPU, a few minutes) and evaluate it
#   make test   run the test suite (CPU)
# Both create .venv on first use and install the project into it (editable, with the dev and demo
# extras). A stamp file records the install, so later runs skip pip until pyproject.toml changes.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.linvision-installed

DEMO_DATA ?= $(or $(LINVISION_DEMO_DATA),.cache/mnist5k)
DEMO_OUT ?= output/demo

# One torch thread unless the caller says otherwise: on a small shared CPU machine two threads run
# 5-20x slower than one.
export OMP_NUM_THREADS ?= 1
# Never wait on the Hugging Face hub: nothing here downloads weights.
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test install

$(PY):
	$(PYTHON) -m venv $(VENV)

# editable_mode=compat puts the checkout itself on sys.path (a .pth line). setuptools' default editable
# mode installs an import hook that Python consults only after its path scan, so from the folder that
# holds a clone named linvision, `import linvision` found that folder as an empty namespace package.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --config-settings editable_mode=compat -e ".[dev,demo]"
	touch $@

install: $(STAMP)

# pytest's own exit status fails the target, including 5 ("no tests collected").
test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m linvision.demo_data --root $(DEMO_DATA)
	$(PY) tools/train.py -c configs/demo.yaml --data-dir $(DEMO_DATA) --output $(DEMO_OUT)
	$(PY) tools/eval.py --checkpoint $(DEMO_OUT)/best.safetensors --data-dir $(DEMO_DATA)
