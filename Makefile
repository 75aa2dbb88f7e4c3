# Everything a fresh machine needs: `make test` and `make demo` create .venv and install into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The torch build to install first; other machines may override (e.g. a CPU-only wheel index).
TORCH  ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast demo clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	# MTCNN face detector: its wheel pins torch<2.3 and numpy<2 but runs on current ones.
	$(BIN)/python -m pip install -q --no-deps facenet-pytorch==2.6.0
	touch $(STAMP)

# The quick tests on two pytest workers (those on the session's in-process Ray cluster kept on one:
# tests/conftest.py), then the slow end-to-end ones one after the other, as they were written to run.
PYTEST := $(BIN)/python -m pytest

test: test-fast
	$(PYTEST) tests -m slow

test-fast: $(STAMP)
	$(PYTEST) tests -m "not slow" -n 2 --dist loadgroup

# The whole product on one machine: synthetic corpus -> embedded web -> crawl -> Ray Train +
# DeepSpeed (SCN and a baseline) -> evaluation -> RAF-DB-layout fine-tuning -> report.
demo: $(STAMP)
	$(BIN)/python -m scn_scale.demo --out demo-out

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
