#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: system packages (Fashion-MNIST, redis-server, prometheus; chromium with --dev)
# and the .venv.
# Usage: deploy/local/bootstrap.sh [--dev]    (--dev also installs test/lint tools)
set -euo pipefail
cd "$(dirname "$0")/../.."

need_apt=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need_apt+=(dataset-fashion-mnist)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
# promtool (check config / check rules / test rules in tests/deploy) comes with Debian's prometheus package
# (--no-install-recommends: no node exporter; where systemd runs, the package also enables a Prometheus service)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
# --dev: the status pages' browser test (tests/api/test_ui_browser.py) drives Debian's headless Chromium through
# playwright, which never downloads a browser of its own here
if [ "${1:-}" = "--dev" ]; then command -v chromium >/dev/null 2>&1 || need_apt+=(chromium); fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo ">> installing system packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
extras="services,bench"
[ "${1:-}" = "--dev" ] && extras="dev,services,bench"
stamp=".venv/.installed-$extras-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || { echo ">> creating .venv"; $PY -m venv .venv; }
  echo ">> installing cdm[$extras] into .venv (torch CPU wheel pinned to 2.13.0)"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q -e ".[$extras]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
# tests/deploy renders deploy/k8s with `kubectl kustomize` (kustomize >= 5: components, labels). Debian's
# kubernetes-client is far older, so kubectl is not installed here: it comes with the machine image.
command -v kubectl >/dev/null 2>&1 ||
  echo ">> warning: kubectl not found: tests/deploy/test_k8s.py will fail (install kubectl >= 1.27)" >&2
