# The two commands a new machine needs (README): `make demo` and `make test`.
.PHONY: setup demo test services lint
setup:
	bash scripts/setup.sh
	bash scripts/setup-triton-interpret.sh

demo: setup
	.venv/bin/orch demo

services:
	bash scripts/services.sh

test: setup services
	bash scripts/test.sh

lint: setup
	.venv/bin/ruff check orchestrator tests bench
