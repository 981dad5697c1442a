#!/usr/bin/env bash
# A three-site Flower deployment on one machine, following docs/flower.md step by step:
# TLS, SuperNode authentication, each site with its own data folder. Outputs go to runs/flower-3sites.
# Usage: bash examples/flower-three-sites.sh   (from the repository root, after scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1
work="$PWD/runs/flower-3sites"
rm -rf "$work" && mkdir -p "$work"
export FLWR_HOME="$work/flwr-home"
port=39493
settings=(--method fedtreelora --set data.num_clients=3 --set data.n_train=32 --set data.n_val=32 --set model.num_layers=2 --set federation.rounds=4
          --set fedtreelora.warmup_rounds=2)

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# Certificates and keys; the sites' data.
fedtreelora flower credentials --out "$work/certs" --nodes 3
fedtreelora flower sites "${settings[@]}" --out "$work/sites"

# The SuperLink, with TLS and SuperNode authentication.
flower-superlink --ssl-ca-certfile "$work/certs/ca.crt" --ssl-certfile "$work/certs/server.pem" \
  --ssl-keyfile "$work/certs/server.key" --enable-supernode-auth --disable-runtime-dependency-installation \
  --host 127.0.0.1 --port "$port" > "$work/superlink.log" 2>&1 &
pids+=($!)
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "mylink"

[superlink.mylink]
address = "127.0.0.1:$port"
root-certificates = "$work/certs/ca.crt"
TOML
for _ in $(seq 60); do (echo > /dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 1; done

# Register the three sites' keys, then start one SuperNode per site.
for k in 0 1 2; do flwr supernode register "$work/certs/supernode_$k.pub" mylink; done
for k in 0 1 2; do
  flower-supernode --superlink "127.0.0.1:$port" --root-certificates "$work/certs/ca.crt" \
    --auth-supernode-private-key "$work/certs/supernode_$k" --port $((port + 10 + k)) \
    --node-config "client-id=$k data=\"$work/sites/site$k\"" > "$work/supernode$k.log" 2>&1 &
  pids+=($!)
done

# The app and the run.
fedtreelora flower app "${settings[@]}" --out "$work/app" --run-dir "$work/run" --round-timeout 300
flwr run "$work/app" mylink --stream
echo "outputs: $work/run (summary.json, metrics.jsonl, report.html)"
