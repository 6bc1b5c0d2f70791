#!/usr/bin/env bash
# Install the project on a node: torch pinned for the node's CUDA (or the CPU build), then the project itself
# (which pins ray[default,serve,data]). Used by cluster.yaml's setup_commands and by the Dockerfile.
#
#   bash cluster/deploy/install.sh [PROJECT_DIR]
#   TORCH_CUDA=cu128 bash cluster/deploy/install.sh     # force a wheel flavour: cpu | cu126 | cu128 | cu130
#   DRY_RUN=1 bash cluster/deploy/install.sh            # print the pip commands instead of running them
set -euo pipefail

TORCH_VERSION=2.13.0            # the version the project is tested with (Makefile, pyproject.toml range)
PY=${PYTHON:-python3}
DIR=${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}

detect_flavour() {
  # the highest wheel flavour the node's driver supports (nvidia-smi prints "CUDA Version: 12.8")
  if ! command -v nvidia-smi >/dev/null 2>&1; then echo cpu; return; fi
  local v
  v=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\)\.\([0-9]*\).*/\1 \2/p' | head -n1)
  if [ -z "$v" ]; then echo "install.sh: cannot read the CUDA version from nvidia-smi" >&2; exit 1; fi
  local major minor
  read -r major minor <<<"$v"
  local n=$((major * 10 + minor))
  if [ "$n" -ge 130 ]; then echo cu130
  elif [ "$n" -ge 128 ]; then echo cu128
  elif [ "$n" -ge 126 ]; then echo cu126
  else echo "install.sh: CUDA driver $major.$minor is older than 12.6; update the driver or set TORCH_CUDA=cpu" >&2; exit 1
  fi
}

FLAVOUR=${TORCH_CUDA:-$(detect_flavour)}
case "$FLAVOUR" in
  cpu|cu126|cu128|cu130) ;;
  *) echo "install.sh: TORCH_CUDA=$FLAVOUR: expected cpu, cu126, cu128 or cu130" >&2; exit 1 ;;
esac

run() { if [ -n "${DRY_RUN:-}" ]; then echo "$*"; else "$@"; fi; }
run "$PY" -m pip install -q "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${FLAVOUR}"
run "$PY" -m pip install -q -e "${DIR}"
