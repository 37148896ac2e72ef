#!/bin/sh
# Starts one Sentinel of the scale stack (compose.scale.yaml). Its config file lives on its
# volume: Sentinel rewrites it (the current primary, the epoch, the other Sentinels and the
# replicas it found), so a Sentinel that restarts carries on where it stopped. The file is
# written here only on the first start; `down -v` forgets it. Env: INITIAL_PRIMARY, MASTER_NAME,
# SENTINEL_QUORUM (2), SENTINEL_DOWN_AFTER_MS (1000), SENTINEL_FAILOVER_TIMEOUT_MS (5000).
set -eu
: "${INITIAL_PRIMARY:?}" "${MASTER_NAME:=mymaster}"
conf=/data/sentinel.conf
if [ ! -e "$conf" ]; then
  cat >"$conf" <<CONF
port 26379
dir /data
protected-mode no
sentinel resolve-hostnames no
sentinel monitor $MASTER_NAME $INITIAL_PRIMARY 6379 ${SENTINEL_QUORUM:-2}
sentinel down-after-milliseconds $MASTER_NAME ${SENTINEL_DOWN_AFTER_MS:-1000}
sentinel failover-timeout $MASTER_NAME ${SENTINEL_FAILOVER_TIMEOUT_MS:-5000}
sentinel parallel-syncs $MASTER_NAME 1
CONF
fi
exec redis-server "$conf" --sentinel
