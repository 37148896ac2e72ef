#!/bin/sh
# Starts one Redis data node of the scale stack (compose.scale.yaml): as the primary if the
# Sentinels name this node, else as a replica of the node they name. "$@" is redis-server's
# arguments. Env: NODE_ADDR (this node's address as the Sentinels know it), INITIAL_PRIMARY,
# SENTINELS (space-separated addresses, port 26379), MASTER_NAME.
#
# Why ask: a node that comes back after a crash must not take its old role from its command line.
# A primary restarted by its restart policy within a second (before the Sentinels see it down)
# would come back as the primary with an append-only file that may lack its last second of
# writes (appendfsync everysec), and its replicas would resync from it, dropping writes that
# they held and that clients were told of (ECHO_STORE_MIN_REPLICAS). So a node that the
# Sentinels still name as primary and that has data of its own (a restart, not the first start)
# waits until they promote a replica (they see it down after down-after-milliseconds), then
# joins as a replica of the new primary. Waiting is bounded (PROMOTION_WAIT_S, 60 s): with no
# replica able to take over it starts as the primary with what it has.
set -eu
: "${NODE_ADDR:?}" "${INITIAL_PRIMARY:?}" "${SENTINELS:?}" "${MASTER_NAME:=mymaster}"

say() { echo "redis-node ($NODE_ADDR): $*" >&2; }

# The primary's address as the first Sentinel that answers names it; fails if none answers.
named_primary() {
  for sentinel in $SENTINELS; do
    addr=$(timeout 2 redis-cli -h "$sentinel" -p 26379 --raw \
      sentinel get-master-addr-by-name "$MASTER_NAME" 2>/dev/null | head -n 1) || continue
    case $addr in
      "" | *" "* | ERR* | NOAUTH*) continue ;;
    esac
    echo "$addr"
    return 0
  done
  return 1
}

# On a first start the Sentinels are up already (depends_on); after a whole-stack restart they
# start alongside the nodes: give them a while before falling back to the configured primary.
deadline=$(($(date +%s) + ${SENTINEL_WAIT_S:-30}))
until primary=$(named_primary); do
  if [ "$(date +%s)" -ge "$deadline" ]; then
    primary=$INITIAL_PRIMARY
    say "no Sentinel answers: taking the configured primary $primary"
    break
  fi
  sleep 1
done

if [ "$primary" = "$NODE_ADDR" ] && [ -d appendonlydir ]; then
  say "restarting while the Sentinels name this node as primary: waiting for a failover"
  deadline=$(($(date +%s) + ${PROMOTION_WAIT_S:-60}))
  while [ "$primary" = "$NODE_ADDR" ] && [ "$(date +%s)" -lt "$deadline" ]; do
    sleep 0.5
    primary=$(named_primary) || primary=$NODE_ADDR
  done
fi

if [ "$primary" = "$NODE_ADDR" ]; then
  say "starting as the primary"
  exec redis-server "$@"
fi
say "starting as a replica of $primary"
exec redis-server "$@" --replicaof "$primary" 6379
