#!/usr/bin/env bash
# Container smoke test, from the repo root: bash .ci/container-smoke.sh
#
# Lints the Dockerfile, validates the GPU and CPU compose variants, builds the CPU image, starts
# it with compose (project "rnn-serving-smoke"), waits until its HEALTHCHECK (/readyz) passes,
# sends real MNIST digits and an echo stream from the host (.ci/smoke_client.py), checks that
# the server runs as non-root and stops cleanly on SIGTERM, and always takes it down again.
#
# Then the scale stack (compose.scale.yaml, project "rnn-serving-scale-smoke"): a Redis primary,
# 2 replicas and 3 Sentinels, two API replicas of the same CPU image and nginx in front. The
# chaos test's short form (bench/chaos.py) streams through nginx while the Redis primary is
# SIGKILLed, then stalled (SIGSTOP) until the Sentinels replace it: every reply exactly once, 0
# acknowledged steps lost. Then .ci/scale_smoke.py kills the replica that serves an echo stream
# (SIGKILL) and resumes the stream through nginx on the other one. The stack is always taken
# down with its volumes (down -v).
#
# Env: PYTHON   interpreter with httpx, websockets, numpy, tritonclient (default .venv/bin/python)
#      API_PORT host port on 127.0.0.1 (default 8000; nginx's in the scale part)
#      API_GRPC_PORT host port of gRPC on 127.0.0.1 (default 8001; nginx's in the scale part)
#      SMOKE_HEALTH_TIMEOUT seconds to wait for healthy (default 300)
#      SMOKE_SCALE=0 skips the scale stack
#      SMOKE_CHAOS_FAULTS the chaos test's faults (default kill-primary,stall-primary; "" skips)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-.venv/bin/python}
export API_PORT=${API_PORT:-8000}
export API_GRPC_PORT=${API_GRPC_PORT:-8001}
health_timeout=${SMOKE_HEALTH_TIMEOUT:-300}
gpu=(docker compose -f compose.yaml)
cpu=(docker compose -p rnn-serving-smoke -f compose.yaml -f compose.cpu.yaml)

started=$SECONDS
step() { printf '\n== %s (at %ds)\n' "$*" "$((SECONDS - started))"; }
fail() { echo "container-smoke: FAILED: $*" >&2; exit 1; }

"$PYTHON" -c 'import httpx, numpy, websockets, tritonclient.grpc' \
  || fail "PYTHON=$PYTHON needs httpx, numpy, websockets and tritonclient (make install)"

step "docker engine, compose, hadolint"
if ! docker info >/dev/null 2>&1 || ! docker compose version >/dev/null 2>&1 \
    || ! command -v hadolint >/dev/null; then
  bash ../shared/tools/docker-sandbox.sh
fi

# compose.yaml asks for 65,536 descriptors; a daemon allowed fewer cannot give them (runc:
# "error setting rlimits"), so ask for what this host's daemon may hand out.
dockerd_pid=$(pgrep -o dockerd || true)
if [ -n "$dockerd_pid" ] && [ -z "${NOFILE:-}" ]; then
  hard=$(awk '/Max open files/ {print $5}' "/proc/$dockerd_pid/limits")
  if [ "$hard" != unlimited ] && [ "$hard" -lt 65536 ]; then export NOFILE=$hard; fi
fi

step "pinned images (Dockerfile's PYTHON_IMAGE, compose.scale.yaml's Redis and nginx)"
# Where no registry is reachable (this sandbox), the sandbox's stand-ins carry the floating tags;
# a pinned tag that cannot be pulled is given to its stand-in, and the log says so.
pin() {
  local pinned=$1 standin=$2
  docker image inspect "$pinned" >/dev/null 2>&1 && return
  timeout 60 docker pull -q "$pinned" >/dev/null 2>&1 && return
  echo "no registry: tagging the local stand-in $standin as $pinned"
  docker tag "$standin" "$pinned"
}
pin "$(sed -n 's/^ARG PYTHON_IMAGE=//p' Dockerfile)" python:3.11-slim
pin "$(grep -o 'redis:[0-9][^}]*-bookworm' compose.scale.yaml | sort -u)" redis:7-bookworm
pin "$(grep -o 'nginx:[0-9][^}]*-bookworm' compose.scale.yaml)" nginx:stable-bookworm

step "compose config: GPU (default) and CPU (compose.cpu.yaml) variants"
"${gpu[@]}" --profile train config --quiet
"${cpu[@]}" --profile train config --quiet
nvidia_reservations() { "$@" --profile train config | grep -c 'driver: nvidia' || true; }
[ "$(nvidia_reservations "${gpu[@]}")" = 2 ] || fail "the GPU variant must reserve a GPU for api and train"
[ "$(nvidia_reservations "${cpu[@]}")" = 0 ] || fail "the CPU variant must not reserve a GPU"

step "hadolint"
hadolint Dockerfile

step "build the CPU image"
"${cpu[@]}" build api

cleanup() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "--- api logs (last 200 lines) ---" >&2
    "${cpu[@]}" logs --no-color --tail 200 api >&2 || true
  fi
  "${cpu[@]}" down --remove-orphans --timeout 30 || true
  exit "$rc"
}
trap cleanup EXIT

step "start it (127.0.0.1:$API_PORT)"
"${cpu[@]}" up -d --no-build api
cid=$("${cpu[@]}" ps -q api)
[ -n "$cid" ] || fail "no api container"

step "wait for healthy (at most ${health_timeout}s)"
deadline=$((SECONDS + health_timeout))
while :; do
  read -r state health restarts < <(docker inspect -f \
    '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}} {{.RestartCount}}' "$cid")
  [ "$health" = healthy ] && break
  [ "$health" != none ] || fail "the image has no HEALTHCHECK"
  if [ "$state" != running ] || [ "$restarts" != 0 ]; then
    fail "container is $state after $restarts restart(s)"
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    docker inspect -f '{{json .State.Health}}' "$cid" >&2
    fail "not healthy after ${health_timeout}s (health: $health)"
  fi
  sleep 2
done
echo "healthy after $((SECONDS - deadline + health_timeout))s"

step "smoke client"
"$PYTHON" .ci/smoke_client.py --base-url "http://127.0.0.1:$API_PORT" \
  --grpc-url "127.0.0.1:$API_GRPC_PORT"

step "runs as non-root"
uid=$(docker exec "$cid" id -u)
[ "$uid" != 0 ] || fail "the server runs as root"
echo "uid $uid"

step "SIGTERM stop"
t0=$SECONDS
"${cpu[@]}" stop --timeout 30 api
code=$(docker inspect -f '{{.State.ExitCode}}' "$cid")
[ "$code" = 0 ] || fail "server exited with $code on SIGTERM (137: it had to be killed)"
echo "stopped cleanly in $((SECONDS - t0))s"

# --- The scale stack: Redis + 2 API replicas + nginx (compose.scale.yaml) -----------------------
if [ "${SMOKE_SCALE:-1}" = 0 ]; then
  step "passed (scale stack skipped: SMOKE_SCALE=0)"
  exit 0
fi
scale_started=$SECONDS
scale_gpu=(docker compose -f compose.yaml -f compose.scale.yaml)
scale=(docker compose -p rnn-serving-scale-smoke -f compose.yaml -f compose.cpu.yaml -f compose.scale.yaml)

step "scale stack: compose config, GPU (compose.scale.yaml) and CPU (+ compose.cpu.yaml)"
"${scale_gpu[@]}" --profile train config --quiet
"${scale[@]}" --profile train config --quiet
[ "$(nvidia_reservations "${scale_gpu[@]}")" = 2 ] || fail "the GPU scale stack must keep the GPU reservations"
[ "$(nvidia_reservations "${scale[@]}")" = 0 ] || fail "the CPU scale stack must not reserve a GPU"
"${scale[@]}" config --format json | "$PYTHON" -c '
import json, sys
s = json.load(sys.stdin)["services"]
published = {n: [(p.get("host_ip"), p.get("published")) for p in c.get("ports", [])] for n, c in s.items()}
assert s["api"]["deploy"]["replicas"] == 2, "api: 2 replicas"
env = s["api"]["environment"]
assert env["ECHO_STORE_URL"].startswith("redis+sentinel://sentinel-1:26379,"), "api: Sentinels"
assert env["ECHO_STORE_MIN_REPLICAS"] == "2", "api: every step on both Redis replicas"
assert all(c.get("restart") for c in s.values()), "a restart policy on every service"
redis = {n for n in s if n.startswith(("redis-", "sentinel-"))}
assert len(redis) == 6 and len({s[n]["image"] for n in redis}) == 1, "one Redis image, 6 nodes"
assert {n for n, p in published.items() if p} == {"nginx"}, f"only nginx published: {published}"
assert all(ip == "127.0.0.1" for ip, _ in published["nginx"]), f"nginx on 127.0.0.1: {published}"
' || fail "compose.scale.yaml: replicas, store, restart policies or published ports"

# The single container goes first (same host port); from here on the trap takes the stack down.
"${cpu[@]}" down --remove-orphans --timeout 30
scale_cleanup() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "--- scale stack: ps and logs (last 100 lines each) ---" >&2
    "${scale[@]}" ps -a >&2 || true
    "${scale[@]}" logs --no-color --tail 100 >&2 || true
  fi
  "${scale[@]}" down -v --remove-orphans --timeout 30 || true
  exit "$rc"
}
trap scale_cleanup EXIT

step "scale stack: up, the image built above (nginx on 127.0.0.1:$API_PORT)"
"${scale[@]}" up -d --no-build --pull never --wait --wait-timeout "$health_timeout"
"${scale[@]}" ps
for node in redis-1 redis-2 redis-3; do
  cid=$("${scale[@]}" ps -q "$node")
  setting() { docker exec "$cid" redis-cli config get "$1" | tail -n 1; }
  [ "$(setting appendonly)" = yes ] || fail "$node runs without its append-only file"
  [ "$(setting maxmemory-policy)" = noeviction ] || fail "$node evicts keys (not noeviction)"
  [ "$(setting min-replicas-to-write)" -ge 1 ] || fail "$node writes without a replica"
done

chaos_faults=${SMOKE_CHAOS_FAULTS-kill-primary,stall-primary}
if [ -n "$chaos_faults" ]; then
  step "chaos test, short form: $chaos_faults under 8 streams through nginx"
  "$PYTHON" -m bench.chaos --no-up --project rnn-serving-scale-smoke --port "$API_PORT" \
    --streams 8 --warmup 2 --faults "$chaos_faults"
fi

step "scale smoke client: kill the replica serving a stream, resume it through nginx"
"$PYTHON" .ci/scale_smoke.py --project rnn-serving-scale-smoke --base-url "http://127.0.0.1:$API_PORT"

step "scale stack: digits and an echo sequence over gRPC through nginx (grpc_pass)"
"$PYTHON" .ci/smoke_client.py --base-url "http://127.0.0.1:$API_PORT" \
  --grpc-url "127.0.0.1:$API_GRPC_PORT"

step "scale stack: nginx logged the upgrades, without query strings"
nginx_log=$("${scale[@]}" logs --no-color nginx)
grep -q 'GET /echo HTTP/1.1" 101' <<<"$nginx_log" || fail "nginx's access log has no WebSocket upgrades"
if grep -F '/echo?' <<<"$nginx_log"; then
  fail "nginx logged a query string (above): resume URLs carry session tokens"
fi

step "scale stack: down -v"
"${scale[@]}" down -v --remove-orphans --timeout 30
echo "scale stack part: $((SECONDS - scale_started))s"

step "passed"
