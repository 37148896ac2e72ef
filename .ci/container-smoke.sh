#!/usr/bin/env bash
# Container smoke test, from the repo root: bash .ci/container-smoke.sh
#
# Lints the Dockerfile, validates the GPU and CPU compose variants, builds the CPU image, starts
# it with compose (project "rnn-serving-smoke"), waits until its HEALTHCHECK (/readyz) passes,
# sends real MNIST digits and an echo stream from the host (.ci/smoke_client.py), checks that
# the server runs as non-root and stops cleanly on SIGTERM, and always takes it down again.
#
# Env: PYTHON   interpreter with httpx, websockets, numpy (default .venv/bin/python)
#      API_PORT host port on 127.0.0.1 (default 8000)
#      SMOKE_HEALTH_TIMEOUT seconds to wait for healthy (default 300)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-.venv/bin/python}
export API_PORT=${API_PORT:-8000}
health_timeout=${SMOKE_HEALTH_TIMEOUT:-300}
gpu=(docker compose -f compose.yaml)
cpu=(docker compose -p rnn-serving-smoke -f compose.yaml -f compose.cpu.yaml)

started=$SECONDS
step() { printf '\n== %s (at %ds)\n' "$*" "$((SECONDS - started))"; }
fail() { echo "container-smoke: FAILED: $*" >&2; exit 1; }

"$PYTHON" -c 'import httpx, numpy, websockets' \
  || fail "PYTHON=$PYTHON needs httpx, numpy and websockets (make install)"

step "docker engine, compose, hadolint"
if ! docker info >/dev/null 2>&1 || ! docker compose version >/dev/null 2>&1 \
    || ! command -v hadolint >/dev/null; then
  bash ../shared/tools/docker-sandbox.sh
fi

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
"$PYTHON" .ci/smoke_client.py --base-url "http://127.0.0.1:$API_PORT"

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

step "passed"
