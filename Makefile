.PHONY: test demo lint bench

PY := .venv/bin/python
MYPY_PACKAGES := $(wildcard osteofy cohort edge quantize firmware_bridge dashboard)

test:
	scripts/test

demo:
	scripts/demo

lint:
	$(PY) -m ruff check .
	$(PY) -m mypy $(MYPY_PACKAGES)

bench:
	$(PY) -m bench.cohort_render
	$(PY) -m osteofy.cli bench
