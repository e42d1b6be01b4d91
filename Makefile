# bgq: `make run` (set up + ingest the samples), `make test` (set up + all checks), `make bench`.
# Every install comes from uv.lock (docs/development.md); `make lock` refreshes it.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NUMBA_CACHE := $(VENV)/.numba-cache
# uv itself comes from the package index, pinned by version and hash (uv-requirements.txt), into
# its own small venv: uv sync manages .venv exactly, so uv must not live there.
TOOLS := .tools
UV := $(TOOLS)/bin/uv
# One environment with every extra (test, bench): `uv sync` removes what it was not asked for.
SYNC := $(UV) sync --locked --quiet --all-extras --python $(PYTHON)

.PHONY: setup models system-redis browser run test screenshots bench bench-memory bench-models bench-api bench-lanes bench-autoscale bench-elastic bench-quality models-grid profile lint format lock floors clean

setup: $(STAMP) models

$(UV): uv-requirements.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(TOOLS)/bin/python || $(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -qq --require-hashes -r uv-requirements.txt
	touch $@

$(STAMP): pyproject.toml uv.lock $(UV)
	$(SYNC)
	touch $(STAMP)

# pymatting's numba functions (alpha matting) compiled once per venv, on both cores
# (workers/numba_cache.py), before the tests and benchmarks use them; `make run` needs none.
$(NUMBA_CACHE): $(STAMP)
	$(BIN)/python -m workers.numba_cache
	touch $@

models: $(STAMP)
	$(BIN)/bgq models fetch u2netp

# The newest releases that pyproject.toml allows, all extras together (so rembg[cli]'s pins in
# the bench extra hold fastapi, uvicorn and python-multipart back), into uv.lock; then
# `make test` and commit both (docs/development.md).
lock: $(UV)
	$(UV) lock --upgrade --python $(PYTHON)
	$(SYNC)
	touch $(STAMP)

# Are pyproject.toml's lower bounds honest? The oldest direct dependencies they allow (uv's
# lowest-direct resolution, without the bench extra, whose rembg[cli] pins would lift fastapi and
# uvicorn), in a throwaway copy of the working tree under build/floors: the unit tests, then the
# pipeline, API, worker, ingest and CLI tests.
FLOOR_TESTS := tests/test_pipeline.py tests/test_api.py tests/test_workers.py tests/test_ingest.py \
	tests/test_cli.py
floors: $(UV) models
	rm -rf build/floors && mkdir -p build/floors
	rev=$$(git stash create) && git archive $${rev:-HEAD} | tar -x -C build/floors
	cd build/floors && ../../$(UV) pip compile --quiet --resolution lowest-direct --extra test \
			--python-version 3.11 pyproject.toml -o floors.txt \
		&& ../../$(UV) venv --quiet --python $(PYTHON) \
		&& ../../$(UV) pip sync --quiet floors.txt \
		&& ../../$(UV) pip install --quiet --no-deps -e . \
		&& .venv/bin/python -m workers.numba_cache \
		&& .venv/bin/pytest -q -p no:cacheprovider -m "not integration" \
		&& .venv/bin/pytest -q -p no:cacheprovider $(FLOOR_TESTS)

run: setup
	$(BIN)/bgq ingest samples/catalog.csv --out out

# Figures, not tests: rembg p vs bgq ingest vs the model-bound limit, then a URL catalog
# (a few minutes on 2 cores). Per model (u2net, u2netp): `make bench-models`.
bench: setup $(NUMBA_CACHE)
	$(BIN)/python -m bench.ingest
	$(BIN)/python -m bench.urls

# Peak RSS/USS/PSS of a pool process per input size vs rembg.remove(), and growth over 1,000
# small tasks (several minutes on 2 cores; figures, not tests).
bench-memory: setup $(NUMBA_CACHE)
	$(BIN)/python -m bench.memory

# rembg's published table per model (u2netp, u2net): a pool process
# beside rembg.remove() at 7 sizes, what each model costs a pool process, and the 1080p catalog:
# rembg p -m u2net vs bgq ingest --model u2net vs bare onnxruntime (about 7 minutes on 2 cores).
bench-models: setup $(NUMBA_CACHE)
	$(BIN)/python -m bench.models

# Cache-hit latency of the HTTP API (p50/p99, requests/s).
bench-api: setup $(NUMBA_CACHE)
	$(BIN)/python -m bench.api

# Lanes: interactive latency under a bulk ingest, bulk throughput per lane, fairness between
# two catalogs; with lanes and without, side by side (6 minutes on 2 cores, a fast host).
bench-lanes: setup $(NUMBA_CACHE)
	$(BIN)/python -m bench.lanes

# What KEDA's Redis lists scaler would see against the exporter's lane metrics, during a
# 60-image ingest on 2 pool processes (docs/kubernetes.md).
bench-autoscale: setup
	$(BIN)/python -m bench.autoscale

# Elastic workers: a worker host lost mid-ingest, one cut off from the network for 5 minutes
# (network namespaces: root and iproute2), duplicate work over 200 images (about 10 minutes).
bench-elastic: setup
	$(BIN)/python -m bench.elastic

profile: setup $(NUMBA_CACHE)
	$(BIN)/python -m bench.profile

# Which model to use: u2netp and the dropped u2net-int8 (built by `python -m bench.quantize` into
# $BGQ_HOME/bench/ when missing) against u2net fp32 on 10 photos the int8 model was not
# calibrated on, and ms per inference with one thread (docs/models.md; about 2 minutes).
bench-quality: setup
	$(BIN)/python -m bench.model_quality

# docs/img/models-grid.png: the sample photos' cutouts by u2netp, u2net and the dropped u2net-int8.
models-grid: setup
	$(BIN)/python -m bench.models_grid

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The tests also start system redis-servers: TLS, ACL users, Sentinel (Debian 12 ships 7.0 with TLS).
system-redis:
	@redis_ok() { command -v redis-server >/dev/null && \
		ldd "$$(command -v redis-server)" 2>/dev/null | grep -q libssl; }; \
	if ! redis_ok; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update && apt-get install -y redis-server redis-sentinel || exit 1; \
		fi; \
		redis_ok || { echo "make test needs redis-server (>= 6, built with TLS) on PATH;" \
			"on Debian/Ubuntu as root: apt-get install redis-server redis-sentinel"; exit 1; }; \
	fi

# The web page's tests drive Debian's chromium through Playwright (which downloads no browser).
browser:
	@if ! command -v chromium >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update && apt-get install -y chromium || exit 1; \
		fi; \
		command -v chromium >/dev/null || { echo "make test needs Debian's chromium for the" \
			"web page tests; as root: apt-get update && apt-get install -y chromium"; exit 1; }; \
	fi

# Test processes (pytest-xdist; pyproject's addopts give each whole modules, at most 4): each
# with its own Redis, S3 server and stacks. TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= auto
test: setup $(NUMBA_CACHE) system-redis browser lint
	$(BIN)/pytest --numprocesses $(TEST_WORKERS)

# The README's pictures of the web page, taken by its browser test.
screenshots: setup browser $(NUMBA_CACHE)
	BGQ_TEST_SCREENSHOTS=docs/img $(BIN)/pytest tests/test_page.py -k narrow_window

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(TOOLS) build out .pytest_cache .mypy_cache .ruff_cache *.egg-info
