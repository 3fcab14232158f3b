#!/usr/bin/env bash
# The GPU engine's figures in one command (bench/gpu.py): advex vs torchattacks PGD on ResNet-18 and
# ResNet-50 at batch 512 (L2, Linf; images/s, ratio, MFU), the AutoAttack cascade vs torchattacks',
# D_R on 4,096 images x 100 steps, one training epoch. Results: bench/results/gpu_<device>.{json,md}.
#   bash bench/gpu.sh                         # CIFAR-10 from $ADVEX_DATA_ROOT (or ../shared/data)
#   bash bench/gpu.sh --small                 # toy sizes on the CPU: checks that it all runs
#   bash bench/gpu.sh --data-root .gpu/data   # on the lent GPU machine (see bench/README.md)
#   bash bench/gpu.sh --reproduce cifar10 --data-root .gpu/data
#                                             # then `advex reproduce --preset cifar10` against a server
#                                             # started here; results in bench/results/reproduce-cifar10-<device>
# Works from a checkout with the repo's .venv, or with a system Python that has torch (the GPU
# machine's image): advex is then imported from the checkout, and torchattacks (with scipy) is
# installed from .gpu/wheels when it is missing there.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
export PYTHONPATH="$PWD/protos:$PWD/client:$PWD/engine:$PWD/service${PYTHONPATH:+:$PYTHONPATH}"
if ! "$py" -c "import torchattacks" 2>/dev/null; then
  if compgen -G ".gpu/wheels/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-deps .gpu/wheels/*.whl
  else
    "$py" -m pip install -q --no-deps torchattacks scipy
  fi
fi
preset=""
if [ "${1:-}" = "--reproduce" ]; then preset="$2"; shift 2; fi
"$py" bench/gpu.py "$@"
[ -z "$preset" ] && exit 0
# The preset, through the service as a user runs it: a server on this machine's device, the client beside it.
data_root="${ADVEX_DATA_ROOT:-../shared/data}"
while [ $# -gt 0 ]; do
  case "$1" in --data-root) data_root="$2"; shift 2 ;; *) shift ;; esac
done
device=$("$py" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
work=$(mktemp -d)
port=$("$py" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$py" -m advex.client.cli serve --port "$port" --metrics-port 0 --data-dir "$work" --data-roots "$data_root" \
  >"$work/server.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true; rm -rf "$work"' EXIT
"$py" -m advex.client.cli --target "127.0.0.1:$port" reproduce --preset "$preset" \
  --out "bench/results/reproduce-$preset-$device"
