#!/usr/bin/env bash
# The main job: set up, start `advex serve` with embedded defaults (SQLite store and artifacts
# under ./advex-data, CPU unless a GPU is present), run `advex demo` against it through the
# client SDK, then stop the server gracefully (SIGTERM). Extra arguments go to `advex demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh server,plot
venv="${ADVEX_VENV:-.venv}"
port="${ADVEX_PORT:-50051}"
metrics_port="${ADVEX_METRICS_PORT:-9108}"
log="${ADVEX_DATA_DIR:-advex-data}/server.log"
mkdir -p "$(dirname "$log")"

echo "==> starting advex serve on localhost:$port (log: $log)"
"$venv/bin/advex" serve --port "$port" --metrics-port "$metrics_port" >"$log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT

"$venv/bin/advex" --target "localhost:$port" demo "$@"

echo "==> metrics sample (http://127.0.0.1:$metrics_port/metrics):"
"$venv/bin/python" - "$metrics_port" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
for line in text.splitlines():
    if line.startswith(("advex_clean_accuracy", "advex_robust_accuracy", "advex_operations_total")):
        print("   ", line)
PY
