#!/usr/bin/env bash
# Test certificates and SuperNode keys for a TLS + authenticated Flower deployment.
# Usage: scripts/make-certs.sh OUT_DIR [NUM_NODES] [HOST ...]   (hosts default to localhost 127.0.0.1)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: scripts/make-certs.sh OUT_DIR [NUM_NODES] [HOST ...]}"
nodes="${2:-3}"
shift $(( $# < 2 ? $# : 2 ))
hosts=()
for h in "$@"; do hosts+=(--host "$h"); done
.venv/bin/fedtreelora flower credentials --out "$out" --nodes "$nodes" ${hosts[@]+"${hosts[@]}"}
