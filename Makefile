# jobcage: see README.md.  Every target that runs code bootstraps first.
SHELL := /bin/bash
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python

.PHONY: bootstrap demo test bench lint clean

bootstrap:
	@test "$$(id -u)" = 0 || { echo "make bootstrap: run as root (sudo make ...)" >&2; exit 1; }
	@bash vagrant/provision.sh
	@bash scripts/bootstrap-venv.sh
	@bash scripts/build-slurm-plugin.sh

demo: bootstrap
	@$(PY) scripts/demo.py

test: bootstrap
	@$(PY) -m pytest -q tests

bench: bootstrap
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lint: bootstrap
	@$(VENV)/bin/ruff check agent cgroups bpf tests bench scripts

clean:
	rm -rf $(VENV) .pytest_cache
