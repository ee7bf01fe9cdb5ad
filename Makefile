# Every target does its own set-up: system data package, virtual environment, editable install.
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup run verify test bench readme clean

$(VENV)/.installed: pyproject.toml constraints.txt
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		$(SUDO) apt-get install -y -qq dataset-fashion-mnist; }
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/cmhsa pipeline --config configs/fmnist_tiny_midrun.yaml

verify: setup
	$(VENV)/bin/cmhsa verify --kernel-size 5 --patch-size 16 --in-chans 3 --out-chans 3 --image-size 224

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/convert.py
	$(PY) benchmarks/throughput.py

# every measured block of README.md, rewritten in place by the command that measures it (timings take minutes)
readme: setup
	$(PY) benchmarks/readme.py all

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
