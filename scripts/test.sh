#!/usr/bin/env bash
# The tests: set up, check the layer contracts and that the generated protobuf code is current,
# run the suite.
# Real-data tests read ADVEX_DATA_ROOT (default ../shared/data when it exists).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh server,plot,notebook,dev
venv="${ADVEX_VENV:-.venv}"
# torchattacks is the benchmark's peer (and a cross-check in the tests); --no-deps because its
# declared requests pin drags in old packages. It needs only torch, scipy and tqdm.
"$venv/bin/python" -m pip install -q -c ci/constraints.txt scipy
"$venv/bin/python" -m pip install -q --no-deps -c ci/constraints.txt torchattacks

# The TLS tests make their certificates with the openssl command; the no-traffic test follows
# a real server with strace.
missing=""
command -v openssl >/dev/null || missing="$missing openssl"
command -v strace >/dev/null || missing="$missing strace"
# test_audit_report renders the audit's HTML report in headless Chromium.
command -v chromium >/dev/null || missing="$missing chromium"
# test_alert_rules checks and unit-tests deploy/prometheus/alerts.yml with promtool (Debian's
# prometheus package provides it; nothing starts the daemon).
command -v promtool >/dev/null || missing="$missing prometheus"
if [ -n "$missing" ]; then
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  # shellcheck disable=SC2086
  $sudo_cmd apt-get install -y -qq $missing >/dev/null
fi

if [ -z "${ADVEX_DATA_ROOT:-}" ] && [ -d ../shared/data ]; then
  export ADVEX_DATA_ROOT="$(cd ../shared/data && pwd)"
fi
echo "==> layer contracts (import-linter; pyproject.toml [tool.importlinter])"
"$venv/bin/lint-imports" --no-cache
echo "==> generated protobuf code"
"$venv/bin/python" scripts/gen_protos.py --check
echo "==> tests (ADVEX_DATA_ROOT=${ADVEX_DATA_ROOT:-unset})"
exec "$venv/bin/python" -m pytest -q "$@"
