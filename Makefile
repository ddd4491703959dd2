# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv and install the project into it; `make test` also installs,
# when run as root, the Debian tools that the interop tests use.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEBIAN_TOOLS := qemu-utils libnbd-bin nbdkit nbd-server postgresql fdisk gdisk dosfstools ntfs-3g xfsprogs mtools exfatprogs exfat-fuse lvm2
# qemu for the VM driver: without its recommends (a GUI stack the tests do not need);
# systemd for systemd-analyze, -sysusers and -tmpfiles (tests/test_deploy.py); chromium, the
# consoles' browser tests' (driven by Playwright, tests/browser.py)
DEBIAN_TOOLS_LEAN := qemu-system-x86 systemd chromium
# programs whose presence tells that the Debian tools are installed
TOOL_PROGRAMS := qemu-img qemu-io qemu-nbd nbdinfo nbdcopy nbdkit nbd-server qemu-system-x86_64 pg_ctlcluster \
	sfdisk sgdisk mkfs.vfat mkntfs ntfscp mkfs.xfs mcopy mkfs.exfat mount.exfat-fuse vgcfgrestore systemd-analyze chromium

.PHONY: console-shots demo test lint typecheck pytest debian-tools bench bench-maintenance bench-files bench-fleet fuzz-files campaign clean openapi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m agentless.demo

debian-tools:
	@missing=""; for p in $(TOOL_PROGRAMS); do command -v $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = "0" ]; then \
		echo "installing Debian tools ($(DEBIAN_TOOLS) $(DEBIAN_TOOLS_LEAN)) for:$$missing"; \
		apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBIAN_TOOLS) >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DEBIAN_TOOLS_LEAN) >/dev/null; \
	else \
		echo "NOTE: not root, cannot install$$missing; the tests that need them will be skipped with a reason"; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy --strict src

# --dist loadgroup: the tests of one xdist_group run in one process (tests/test_fleet_netns.py
# starts its fleet of namespaces once), the others are spread as by default
pytest: $(STAMP) debian-tools
	$(VENV)/bin/pytest -n 3 --dist loadgroup -q --durations=25

test: lint typecheck pytest

# the consoles' pictures in docs/img (docs/console.md), taken by their browser tests
console-shots: $(STAMP) debian-tools
	CONSOLE_SHOTS=1 $(VENV)/bin/pytest -q -p no:randomly tests/backup/test_console.py tests/backup/test_console_points.py tests/wincenter/test_console.py

# the checked-in OpenAPI document of the WinCenter REST API (a test fails while it is stale)
openapi: $(STAMP)
	$(PY) -m agentless.wincenter.openapi > docs/api/openapi.json
	$(PY) -m agentless.winserver.openapi > docs/api/host-openapi.json

bench: $(STAMP)
	$(PY) bench/vhd_throughput.py

# verify, prune, gc and copy of synthetic repositories of 1 M and 10 M blobs (docs/performance.md)
bench-maintenance: $(STAMP)
	$(PY) bench/maintenance_scale.py $(MAINTENANCE_FLAGS)

# file-level restore against `vmbackup export` (docs/performance.md "File-level restore")
bench-files: $(STAMP) debian-tools
	$(PY) bench/file_restore.py $(FILES_BENCH_FLAGS)

# issue 18: 1 and 2 workers in the network-namespace fleet (root), and claims at scale
bench-fleet: $(STAMP) debian-tools
	$(PY) bench/fleet.py
	$(PY) bench/claims_scale.py

# 300 damaged guest file systems listed and extracted (make test runs 12)
fuzz-files: $(STAMP) debian-tools
	FILES_CAMPAIGN=300 $(VENV)/bin/pytest -q -s tests/backup/test_hostile_images.py -k campaign

# The fault campaign of docs/reliability.md: every row at full counts (a million inputs per
# fuzz target; 20-60 minutes on 2 cores). Not part of `make test`, which runs it small
# (tests/test_campaign_smoke.py). ROWS="fuzz-nbd ..." picks rows; CAMPAIGN_FLAGS=--write-docs
# records the figures in docs/reliability.md.
campaign: $(STAMP)
	$(PY) -m bench.campaign $(CAMPAIGN_FLAGS) $(ROWS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
