# Every target that runs Python first makes the virtual environment and the generated stubs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROTO_SRC := protos/offload/v1/offload.proto
STUBS := offload/v1/offload_pb2.py offload/v1/offload_pb2_grpc.py
NODE_CLIENT := clients/node
NPM := $(shell command -v npm 2>/dev/null)

.PHONY: help venv proto node-deps demo test test-unit check lint lint-docker lint-k8s typecheck bench clean bench-scheduler soak cpp-client test-browser
.PHONY: image image-test

help:
	@echo "make demo    run the ball-tracking demo (embedded server, synthetic camera, split 3)"
	@echo "make test    run the test suite (tests/unit, tests/loopback, tests/process)"
	@echo "make test-unit   the unit tests only: no sockets, no processes, seconds"
	@echo "make test-browser   the dashboard in headless chromium (apt-get install chromium)"
	@echo "make check   lint + type check + tests (what CI runs)"
	@echo "make proto   regenerate the gRPC stubs in offload/v1/"
	@echo "make lint-docker   hadolint Dockerfile.server"
	@echo "make lint-k8s      yamllint and kubernetes-validate deploy/kubernetes/"
	@echo "make bench   benchmarks and the soak (minutes): writes bench/results/, prints the summary"
	@echo "make bench-scheduler   automatic mode against the oracle (minutes; bench/results/)"
	@echo "make soak              devices stream for SOAK_MINUTES (10): memory, threads, drift"
	@echo "make cpp-client        build the C++ device client into build/cpp/ (needs libgrpc++-dev)"
	@echo "make image       build localhost/offload-server:VERSION with buildah (minutes)"
	@echo "make image-test  run the built image as configured: health, a device, size, user"

# Exact versions from constraints.txt, for the package's build too (pyproject.toml has ranges).
PIP_INSTALL := $(PY) -m pip install --quiet -c constraints.txt --build-constraint constraints.txt

$(VENV)/.installed: pyproject.toml setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt --upgrade pip
	$(PIP_INSTALL) -e '.[server,demo,dev]'
	touch $@

venv: $(VENV)/.installed

$(STUBS): $(PROTO_SRC) $(VENV)/.installed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m grpc_tools.protoc -Iprotos \
		--python_out=. --mypy_out=quiet:. --grpc_python_out=. --mypy_grpc_out=quiet:. $(PROTO_SRC)

proto: $(STUBS)

# The Node.js client's packages, exactly as package-lock.json pins them.
$(NODE_CLIENT)/node_modules/.package-lock.json: $(NODE_CLIENT)/package-lock.json
ifdef NPM
	cd $(NODE_CLIENT) && npm ci --no-audit --no-fund --loglevel=error
else
	@echo "npm not found: the Node.js client test will be skipped (install nodejs and npm)"
endif

node-deps: $(NODE_CLIENT)/node_modules/.package-lock.json

demo: proto
	$(PY) -m offload.client --local-tasks 3 --frames 300

test: proto node-deps
	$(PY) -m pytest -q

test-unit: proto
	$(PY) -m pytest -q tests/unit

# The dashboard's page in Debian's chromium, driven by Playwright (the dev extra); not in `test`.
# Screenshots go to test-artifacts/.
test-browser: proto
	$(PY) -m pytest -q tests/browser

# Not part of test/check: it takes minutes and measures speed, not behaviour.
$(VENV)/.bench-installed: $(VENV)/.installed
	$(PIP_INSTALL) -e '.[server,demo,dev,bench]'
	touch $@

bench: proto $(VENV)/.bench-installed
	$(PY) -m bench
	$(PY) -m bench.cloud
	$(PY) -m bench.cloud --profile
	$(PY) -m bench.cloud --profile --profile-split 1 --items 600
	$(PY) -m bench.state
	$(PY) -m bench.soak --minutes $(SOAK_MINUTES)
	$(PY) -m bench.workers
	$(PY) -m bench.dashboard

# Automatic mode against a static sweep's oracle; writes bench/results/scheduler.{json,md}.
bench-scheduler: proto
	$(PY) -m bench.scheduler

# Devices stream to a server process for SOAK_MINUTES; memory, threads and file descriptors of
# both sides are sampled and their drift reported in bench/results/soak.{json,md}.
SOAK_MINUTES ?= 10
soak: proto
	$(PY) -m bench.soak --minutes $(SOAK_MINUTES)

lint: proto lint-docker lint-k8s
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

lint-docker: venv
	$(VENV)/bin/hadolint Dockerfile.server

# The Kubernetes manifests, offline: YAML style, then each object against the schemas of
# K8S_VERSION (strict: an unknown field fails). kustomization.yaml is kustomize's, not an object.
K8S_DIR ?= deploy/kubernetes
K8S_VERSION ?= 1.33.0
lint-k8s: venv
	$(VENV)/bin/yamllint --strict -c deploy/kubernetes/.yamllint.yaml $(K8S_DIR)
	$(VENV)/bin/kubernetes-validate --strict --quiet -k $(K8S_VERSION) \
		$(filter-out %/kustomization.yaml,$(wildcard $(K8S_DIR)/*.yaml))

typecheck: proto
	$(PY) -m mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) offload/v1/*_pb2*.py offload/v1/*_pb2*.pyi .pytest_cache .mypy_cache .ruff_cache \
		$(NODE_CLIENT)/node_modules build dist *.egg-info

# The server image, built with buildah (no daemon) into its vfs storage; where IMAGE_BASE (default:
# Dockerfile.server's ARG BASE) cannot be pulled, on a stand-in built from Debian's packages
# (docs/deployment.md#the-server-image).
IMAGE_BASE ?=
IMAGE ?= localhost/offload-server:$(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' offload/__init__.py)
image: venv
	@command -v buildah >/dev/null && command -v debootstrap >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq buildah debootstrap >/dev/null; }
	$(PY) deploy/image/build.py $(if $(IMAGE_BASE),--base $(IMAGE_BASE)) --tag $(IMAGE)

# tests/image against IMAGE: not collected by `make test` (pyproject.toml's addopts).
image-test: proto image
	IMAGE=$(IMAGE) $(PY) -m pytest -q -p no:cacheprovider tests/image

# The C++ device client (clients/cpp/), generated from the .proto and compiled into build/cpp/;
# its test (tests/process/test_cpp_client.py) runs this target once per session, a no-op when
# nothing changed.
cpp-client:
	$(MAKE) --no-print-directory -C clients/cpp OUT=$(CURDIR)/build/cpp
