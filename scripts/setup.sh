#!/usr/bin/env bash
# Shared set-up for the README's two commands: a virtualenv with advex and its extras
# (exact pins from ci/constraints.txt), and Debian's Fashion-MNIST.
#   scripts/setup.sh [extras]      e.g. scripts/setup.sh server,plot
# The repository holds four distributions under the `advex` namespace (protos/, client/, engine/,
# service/) and the `advex` distribution at the root; all are installed editable from here.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-server,plot}"
venv="${ADVEX_VENV:-.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "==> creating virtualenv $venv"
  "$python" -m venv "$venv"
fi
echo "==> installing advex[$extras] (pinned by ci/constraints.txt; torch is a large download the first time)"
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
local=(-e ./protos -e ./client)
case ",$extras," in *,server,*) local+=(-e ./engine -e ./service) ;; esac
PYTHONWARNINGS=ignore "$venv/bin/python" -m pip install -q -c ci/constraints.txt "${local[@]}" -e ".[$extras]"

if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
  echo "==> installing Debian's dataset-fashion-mnist"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  $sudo_cmd apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
