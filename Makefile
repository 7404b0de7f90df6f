# make run   - install what is missing, then serve on 127.0.0.1:8000
# make test  - install what is missing, then run the test suite
# make bench - run the benchmarks, write bench/results/latest.md and latest.png
# make setup - only install: .venv with requirements and the jobqueue package (editable),
#              poppler-utils + ffmpeg via apt-get; make test adds chromium for the browser tests

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup system-packages browser run test bench samples clean

setup: system-packages $(VENV)/.installed

system-packages:
	@if ! command -v pdftoppm >/dev/null || ! command -v ffmpeg >/dev/null || ! command -v ffprobe >/dev/null; then \
		echo "Installing poppler-utils and ffmpeg with apt-get"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq poppler-utils ffmpeg; \
	fi

# Debian's chromium, driven by playwright in tests/test_dashboard.py (no browser download).
browser:
	@if ! command -v chromium >/dev/null; then \
		echo "Installing chromium with apt-get (for the dashboard tests)"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	fi

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-bench.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

run: setup
	$(PY) src/main.py $(ARGS)

test: setup browser
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) -m pip install -q -r requirements-bench.txt
	cd bench && ../$(PY) run.py $(BENCH_ARGS)

samples: setup
	$(PY) data/make_samples.py

clean:
	rm -rf $(VENV) out/*/ out/*.db*
