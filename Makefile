# The two commands of the README: `make image ROLE=frontend` and `make test`.
ROLE ?= frontend
SITE ?= production
OUT ?= out
VENV := .venv
PYTHON ?= python3

.PHONY: deps image test test-fast clean

deps: $(VENV)/.installed
	./tools/install-host-deps

$(VENV)/.installed: pyproject.toml
	./tools/install-host-deps
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

image: deps
	$(VENV)/bin/okome-image build --role $(ROLE) --site $(SITE) --out $(OUT)

test: deps
	$(VENV)/bin/pytest

test-fast: deps
	$(VENV)/bin/pytest -m "not boot"

clean:
	rm -rf $(OUT) $(VENV) .pytest_cache
