# jobcage: see README.md.  Every target that runs code bootstraps first.
SHELL := /bin/bash
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python

.PHONY: bootstrap demo test test-v2 bench lint clean

bootstrap:
	@test "$$(id -u)" = 0 || { echo "make bootstrap: run as root (sudo make ...)" >&2; exit 1; }
	@bash vagrant/provision.sh
	@bash scripts/bootstrap-venv.sh
	@bash scripts/build-slurm-plugin.sh

demo: bootstrap
	@$(PY) scripts/demo.py

# The host suite, then the portable part of it on a pure-cgroup-v2 systemd guest (vagrant/v2guest/README.md);
# both always run, and either failing fails the target.
test: bootstrap
	@rc=0; $(PY) -m pytest -q tests || rc=1; bash vagrant/v2guest/run.sh || rc=1; exit $$rc

# Only the guest part: builds (or reuses) the Debian 12 image, boots it under QEMU (tcg), runs
# vagrant/v2guest/guest-tests.txt inside.  V2_TESTS="tests/test_x.py::test_y" runs another selection.
test-v2: bootstrap
	@bash vagrant/v2guest/run.sh $(V2_TESTS)

bench: bootstrap
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lint: bootstrap
	@$(VENV)/bin/ruff check agent cgroups bpf tests bench scripts

clean:
	rm -rf $(VENV) .pytest_cache
