# RecServe: the documented entry points. `make demo` runs the main job locally; `make test` runs every test.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.recserve-installed
PYTEST_ARGS ?=

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	@echo "==> creating $(VENV) and installing RecServe with all extras (first run: ~3-5 min)"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[all]'
	touch $(STAMP)

setup: $(STAMP) system-packages ## create the virtualenv and install Python and Debian dependencies

# Debian packages: nginx and Prometheus for the local data-plane tests; containerd, runc, CNI plugins, iptables
# for the real node; buildah and mmdebstrap for the images. Debian's services must not start at install
# (a policy-rc.d that refuses them is put in place only for this install, if the host has none), so
# nothing on the machine is stopped by name afterwards.
DEB_PACKAGES := nginx prometheus containerd runc containernetworking-plugins iptables conntrack buildah mmdebstrap uidmap
DEB_PROBES := /usr/sbin/nginx /usr/bin/prometheus /usr/bin/containerd /usr/sbin/runc /usr/lib/cni/bridge /usr/sbin/iptables /usr/bin/buildah /usr/bin/mmdebstrap
system-packages: ## Debian packages: nginx, Prometheus, containerd, runc, CNI plugins, iptables, buildah, mmdebstrap
	@missing=""; for b in $(DEB_PROBES); do [ -x $$b ] || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  echo "==> installing Debian packages $(DEB_PACKAGES)"; \
	  policy=""; if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; \
	    chmod +x /usr/sbin/policy-rc.d; policy=1; fi; \
	  rc=0; { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    $(DEB_PACKAGES) >/dev/null; } || rc=$$?; \
	  [ -z "$$policy" ] || rm -f /usr/sbin/policy-rc.d; \
	  exit $$rc; \
	fi

provision: $(STAMP) ## find or build the pinned Kubernetes/etcd/kwok/helm binaries (cold: ~25 min, cached after)
	$(PY) -m recserve_cluster provision

cluster-up: provision images ## start the local cluster: real control plane, kwok GPU nodes, real node real-0 (RECSERVE_REAL_NODE=0: kwok only)
	$(PY) -m recserve_cluster up

cluster-down: ## stop the local cluster and every process it started; fails if anything is left behind
	$(PY) -m recserve_cluster down
	$(PY) -m recserve_cluster leftovers

images: $(STAMP) system-packages ## build the real node's images (Debian stand-ins, operator, builder, CPU Triton); cached by content
	$(PY) -m recserve_cluster images $(IMAGES_ARGS)

TOOLS_STAMP := .venv-tools/.installed
$(TOOLS_STAMP): requirements/tools.txt
	@echo "==> installing checkov into .venv-tools (its pins conflict with the main environment)"
	$(PYTHON) -m venv .venv-tools
	.venv-tools/bin/pip install -q --no-cache-dir -r requirements/tools.txt
	touch $(TOOLS_STAMP)

tools: $(TOOLS_STAMP) ## security scanner (checkov) in its own virtualenv

chart-crds: $(STAMP) ## copy crds/ into the chart (the single source of truth is crds/)
	$(PY) hack/sync_crds.py

requirements: $(STAMP) ## regenerate the pinned image requirement sets from constraints.txt
	$(PY) hack/gen_requirements.py

lint: $(STAMP) ## ruff, mypy, import contracts, CRD and requirement drift
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	PYTHONPATH=operator:. $(VENV)/bin/lint-imports
	$(PY) hack/sync_crds.py --check
	$(PY) hack/gen_requirements.py --check
	$(PY) hack/gen_reference.py --check

reference: $(STAMP) ## regenerate docs/reference.md (every CRD field and chart value)
	$(PY) hack/gen_reference.py

demo: setup provision images ## the main job locally: cluster, chart, operator, CTR model on Triton, canary to promotion
	$(PY) -m recserve_cluster.demo up $(DEMO_ARGS)

demo-down: ## stop the demo's cluster (its local processes stop when the demo exits)
	$(PY) -m recserve_cluster.demo down

test-unit: $(STAMP) ## fast unit tests only
	$(VENV)/bin/pytest -m "not integration and not builder and not triton and not dataplane and not chart" $(PYTEST_ARGS)

test: setup provision images tools lint ## everything CI runs: lint, unit, builder, Triton, control-plane and data-plane tests
	@rc=0; $(VENV)/bin/pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "ERROR: pytest collected no tests"; rc=1; fi; \
	$(PY) -m recserve_cluster down || true; \
	$(PY) -m recserve_cluster leftovers || rc=1; \
	exit $$rc

.PHONY: reference demo demo-down help setup system-packages provision tools chart-crds requirements cluster-up cluster-down images lint test-unit test
