# paramhub developer commands. `make install` then `make test` on a fresh machine.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# torch/torchvision pinned to the pair these machines serve from local disk;
# pyproject admits any torch 2.11-2.14 with its matching torchvision.
TORCH_PAIR ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install proto test test-fast demo bench lint cluster-up cluster-down cluster-test image

install:
	$(PIP) install $(TORCH_PAIR)
	$(PIP) install -e '.[dev]'

# Regenerate the checked-in stubs. The virtual include path makes the generated
# imports read `from paramhub.common.pb import ...`, which resolves inside our package.
proto:
	$(PYTHON) -m paramhub.common.pb.generate

test:
	$(PYTHON) -m pytest -q tests

test-fast:
	$(PYTHON) -m pytest -q -m "not slow" tests

demo:
	$(PYTHON) -m paramhub.tools.demo

bench:
	ps-bench transport

lint:
	$(PYTHON) -m ruff check common ps worker tools tests

# A local cluster in Docker (deploy/docker-compose.yml): one server, two workers, one evaluator.
# Settings in deploy/.env (see deploy/.env.example); GPUs: add -f deploy/docker-compose.gpu.yml.
COMPOSE ?= docker compose -f deploy/docker-compose.yml -f deploy/docker-compose.ports.yml

cluster-up:
	$(COMPOSE) up --build

# Keeps the checkpoints volume; `$(COMPOSE) down -v` deletes it too.
cluster-down:
	$(COMPOSE) down

# The CPU image (offline when no registry answers: deploy/build-image.sh).
image:
	deploy/build-image.sh

# Builds the image and runs the compose cluster for real (tests/cluster): training, kills, the
# ledger, the exported model. Starts dockerd when none runs (as root) and stops what it started.
cluster-test:
	PARAMHUB_CLUSTER_TEST=1 $(PYTHON) -m pytest -q -s -p no:cacheprovider tests/cluster
