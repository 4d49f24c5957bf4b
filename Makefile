# sharedlvm: `make demo` and `make test` do all their own set-up on a fresh Debian
# machine, as root: Debian packages for the engines, a venv that sees python3-sanlock.

PYTHON_SYSTEM := /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
# libc6-dev: only a recommend of gcc, but the test bed's sanlock shim includes its
# <sys/resource.h> (simhost.py).
# fdisk: sfdisk, for shards on GPT partitions of one LUN (partitions.py).
# libvirt: VMs run by libvirt (libvirt.py; the bed runs a libvirtd per simulated host,
# libvirtbed.py); libvirt-sanlock is its sanlock lock driver; nothing is started by apt.
DEB_PACKAGES := lvm2 sanlock python3-sanlock qemu-utils util-linux fdisk kpartx gcc libc6-dev qemu-system-x86 \
  libvirt-daemon-system libvirt-clients python3-libvirt libvirt-daemon-driver-qemu libvirt-sanlock
STAMP_DEB := $(VENV)/.deb-stamp
STAMP_PIP := $(VENV)/.pip-stamp

.PHONY: all deps venv demo demo-vm test lint unit integration bench clean

all: test

# Debian packages: the system engines. Installed only when missing, and without
# recommends: qemu-system-x86 alone would pull in ~200 desktop and media packages.
$(STAMP_DEB):
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@mkdir -p $(VENV) && touch $@

# The venv sees Debian's python3-sanlock (built for /usr/bin/python3).
$(STAMP_PIP): $(STAMP_DEB) pyproject.toml requirements.txt requirements-dev.txt
	@test -x $(PY) || $(PYTHON_SYSTEM) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

deps venv: $(STAMP_PIP)

demo: $(STAMP_PIP)
	$(PY) -m sharedlvm_testbed.demo

# Watchdog self-fencing in qemu guests (the vm backend): prints the timeline, ~2 min.
demo-vm: $(STAMP_PIP)
	$(PY) -m sharedlvm_testbed.demo_vm

lint: $(STAMP_PIP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy

unit: $(STAMP_PIP)
	$(PY) -m pytest tests/unit -q

# The VM bed's tests run beside the loop bed's (tests/suite.py says why it is safe).
test: $(STAMP_PIP) lint
	$(PY) tests/suite.py -q --timeout=900 -p no:cacheprovider --durations=20

bench: $(STAMP_PIP)
	$(PY) bench/metadata_ops.py

clean:
	rm -rf $(VENV) build src/*.egg-info
