# cdm: every target sets itself up (venv, pip and apt packages, local services) on a fresh machine.
.PHONY: help setup dev demo test lint typecheck unit bench bench-gpu bench-quick bench-routing bench-routing-converged services-start services-stop clean

PY := .venv/bin/python

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

setup:  ## create .venv and install runtime deps (+ apt: dataset-fashion-mnist, redis-server)
	@deploy/local/bootstrap.sh

dev:
	@deploy/local/bootstrap.sh --dev

demo: setup  ## the main job end to end: services + daemon + push sources + sample + forget
	@$(PY) scripts/demo.py

test: dev  ## lint, type-check and the whole test suite (starts Redis, Kafka broker and S3 on free ports itself)
	@$(PY) -m ruff check cdm common registry sampler daemon api cli bench scripts deploy tests
	@$(PY) -m mypy cdm common registry sampler daemon api cli bench scripts deploy
	@$(PY) -m pytest

unit: dev  ## tests that need no services
	@$(PY) -m pytest -m "not services"

bench: dev  ## full benchmark run (~45 min on 2 CPU cores + the routing group, untimed at full); writes bench/RESULTS.md
	@$(PY) -m bench.run --profile full

bench-gpu: dev  ## the larger GPU profile (device = "cuda", bf16, batch 256, 4,000 steps, 5,000 FID samples)
	@$(PY) -m bench.run --profile gpu

bench-quick: dev  ## minutes-long benchmark smoke run
	@$(PY) -m bench.run --profile quick

bench-routing: dev  ## the router-kinds group alone at its own profile (~25 min on 2 shared CPU cores)
	@$(PY) -m bench.run --profile routing --only routing

bench-routing-converged: dev  ## 8.5: the router kinds at K x compute (each compartment converged_steps x B; ~20 min)
	@$(PY) -m bench.run --profile routing --only routing-converged

services-start: setup  ## start Redis + Kafka-protocol broker + S3 server on free loopback ports (state in .services/)
	@$(PY) -m deploy.local.services start

services-stop:
	@$(PY) -m deploy.local.services stop

clean:
	rm -rf .venv .cache .services build *.egg-info
