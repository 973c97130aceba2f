# The two commands of the README: `make test` and `make demo`. Both create .venv when missing.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

.PHONY: test demo bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -c constraints.txt -e ".[dev,ray]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/hdiff compare --config configs/demo.toml --out outputs/demo

bench: $(STAMP)
	$(PY) benchmarks/bench_bp.py

clean:
	rm -rf outputs .pytest_cache
