# Labyard: `make demo` starts the platform on this machine, `make test` runs every test.
# Both set up what they need first (apt packages when run as root, .venv, node packages,
# the JupyterLab extension). Everything is pinned: requirements/lock.txt, package-lock.json.

SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
APT_PACKAGES := slapd ldap-utils openssl
# chromium: browser tests; the rest: the Kubernetes testbed's real node (tests/k8s, docs/dev/testbed.md)
APT_TEST_PACKAGES := chromium containerd runc containernetworking-plugins iptables ipset busybox-static gcc libc6-dev
# images/build: podman (with runc: crun fails on our hybrid cgroups) and debootstrap for the local base
APT_IMAGE_PACKAGES := podman runc debootstrap
# installs missing Debian packages when root; otherwise says what to install and stops
apt_install = missing=$$(for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	  else echo "Missing Debian packages: $$missing. Install them with: sudo apt-get install $$missing"; exit 1; fi; fi
STAMP := $(VENV)/.stamps
# As root, `labyard up` runs every user's server and run as the user's own uid (docs/admin/local.md),
# so the Python behind .venv must be usable by everyone: not, e.g., a pyenv under /root (mode 0700).
# As root, .venv is made from the first python3 that runs as nobody, and made again if it does not.
ifeq ($(shell id -u),0)
base_prefix = import sys; print(sys.base_prefix)
runs_as_nobody = $(shell p=$$($(1) -c '$(base_prefix)' 2>/dev/null) && [ "$$(runuser -u nobody -- $(1) -c '$(base_prefix)' 2>/dev/null)" = "$$p" ] && echo yes)
PYTHON3 ?= $(firstword $(foreach p,$(shell command -v python3) /usr/bin/python3,$(if $(call runs_as_nobody,$(p)),$(p))) python3)
ifneq ($(wildcard $(VENV)/bin/python),)
ifneq ($(call runs_as_nobody,$(VENV)/bin/python),yes)
ifeq ($(findstring n,$(firstword -$(MAKEFLAGS))),)
$(info $(VENV) is made from a Python other users cannot run; making it again with $(PYTHON3))
$(shell rm -rf $(VENV))
endif
endif
endif
else
PYTHON3 ?= python3
endif

.PHONY: help setup demo test test-python images bench lock clean

help:
	@echo "make demo     set up and start the platform on http://127.0.0.1:8000 (users: see README)"
	@echo "make test     set up and run every test (python, browser, Kubernetes testbed, Ansible)"
	@echo "make setup    only set up (.venv, node packages, extension)"
	@echo "make images   build the hub and single-user images with podman (images/README.md)"

setup: $(STAMP)/apt $(STAMP)/python $(STAMP)/extension $(STAMP)/proxy

$(STAMP)/apt:
	@command -v npm >/dev/null || { echo "Node.js 20+ and npm are required: apt-get install nodejs npm"; exit 1; }
	@$(call apt_install,$(APT_PACKAGES))
	@mkdir -p $(STAMP) && touch $@

$(STAMP)/apt-test: $(STAMP)/apt
	@$(call apt_install,$(APT_TEST_PACKAGES))
	@touch $@

$(STAMP)/apt-images: $(STAMP)/apt
	@$(call apt_install,$(APT_IMAGE_PACKAGES))
	@touch $@

$(STAMP)/venv:
	@command -v $(PYTHON3) >/dev/null || { echo "python3 (3.11 or newer) is required: apt-get install python3 python3-venv"; exit 1; }
	$(PYTHON3) -m venv $(VENV)
	@mkdir -p $(STAMP) && touch $@

$(STAMP)/python: $(STAMP)/venv requirements/lock.txt
	$(PIP) install --quiet --upgrade pip==25.3
	$(PIP) install --quiet -r requirements/lock.txt
	@touch $@

# `npm install --no-save` rather than `npm ci`: npm 11 writes a lock without rspack's optional
# binaries for other platforms and `npm ci` then refuses it; --no-save installs from the lock as is
extensions/node_modules/.package-lock.json: extensions/package-lock.json
	cd extensions && npm install --no-save --no-audit --no-fund --loglevel=error

$(STAMP)/extension: $(STAMP)/python extensions/node_modules/.package-lock.json $(shell find extensions/src extensions/style -type f) extensions/package.json pyproject.toml
	cd extensions && npm run --silent build:prod
	HATCH_JUPYTER_BUILDER_SKIP_NPM=1 $(PIP) install --quiet --no-deps --no-build-isolation -e .
	@touch $@

$(STAMP)/proxy: hub_config/package-lock.json
	cd hub_config && npm install --no-save --no-audit --no-fund --loglevel=error
	ln -sf ../../hub_config/node_modules/.bin/configurable-http-proxy $(VENV)/bin/configurable-http-proxy
	@touch $@

demo: setup
	$(VENV)/bin/labyard up --demo

test: setup $(STAMP)/apt-test $(STAMP)/apt-images
	bash .ci/test-all

# labyard/hub and labyard/singleuser, tagged with helm/labyard/Chart.yaml's appVersion
images: setup $(STAMP)/apt-images
	images/build

PYTEST_ARGS ?= tests --ignore=tests/k8s
test-python: setup $(STAMP)/apt-test
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) bench/ldap_logins.py
	$(PY) bench/diff/run.py

lock:
	$(PIP) install --quiet -e '.[test]'
	{ head -2 requirements/lock.txt; $(PIP) freeze --exclude-editable | grep -v '^labyard'; } > requirements/lock.new
	mv requirements/lock.new requirements/lock.txt

clean:
	rm -rf $(VENV) extensions/node_modules extensions/lib extensions/labyard_lab/labextension hub_config/node_modules
