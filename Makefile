# Entry points people type. `make demo` and `make test` are the two set-up commands in README.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BUILD := build

.PHONY: all venv host-deps demo test unit lint vmtest bench bench-mesh bench-idle clean image disk-image plain-image extension deb schema-docs

all: venv

# System packages (QEMU, mmdebstrap, nftables, ...): installed when missing, from Debian.
host-deps:
	@.ci/install-host-packages

$(BIN)/kubespan: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[server,dev]'
	touch $@

venv: $(BIN)/kubespan

include extension/extension.mk
include deb/deb.mk
include image/image.mk

lint: venv
	$(BIN)/ruff check service tests qemu-tests bench
	$(BIN)/ruff format --check service tests qemu-tests bench
	$(BIN)/mypy
	$(BIN)/mypy qemu-tests

unit: host-deps venv
	$(BIN)/pytest -m 'not vm' --durations=15 tests qemu-tests/test_kslab_router.py

# A plain Debian 12 image (not ours) for the VM test that installs the Debian package.
PLAIN_IMAGE := $(BUILD)/plain/vmlinuz $(BUILD)/plain/initrd.img $(BUILD)/plain/root.ext4

$(PLAIN_IMAGE) &: $(wildcard qemu-tests/plain/*) | host-deps
	qemu-tests/plain/build.sh $(BUILD)/plain

plain-image: $(PLAIN_IMAGE)

vmtest: host-deps venv image disk-image plain-image deb
	$(BIN)/pytest -m vm --durations=0 qemu-tests

test: host-deps lint unit vmtest

demo: host-deps venv image
	$(BIN)/python qemu-tests/demo.py --nodes 3

schema-docs: venv
	$(BIN)/python -m kubespan.config.docs machineconfig-schema > machineconfig-schema/README.md

BENCHES := bench/plan.py bench/dead_peers.py bench/idle_pass.py bench/wireguard_dump.py bench/apply.py bench/discovery_load.py

bench: venv
	@for b in $(BENCHES); do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# Mesh and NAT scenarios on the image (qemu-tests/natlab.py): name=value lines, seconds.
bench-mesh: host-deps venv image
	$(BIN)/python qemu-tests/bench_mesh.py $(BENCH_MESH_ARGS)

# Idle cost of the agent in a VM with 2 and 100 peers (qemu-tests/bench_idle.py): name=value.
bench-idle: host-deps venv image
	$(BIN)/python qemu-tests/bench_idle.py $(BENCH_IDLE_ARGS)

clean:
	rm -rf $(BUILD)
