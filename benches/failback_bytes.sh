#!/bin/bash
# Bytes moved by failback against the bytes changed after the fork, on
# `lifeboat up` (3 primary, 2 DR, a witness). SIZE MiB of random data go to
# demo/disk0 at the primary; the primary site is killed and forced over to
# DR; CHANGE MiB are rewritten at DR; the old nodes are started again, and
# `failback prepare` reports what each one's delta resync received against
# what it held. A planned failover then goes home and every data node's
# digest of demo/main is printed. BENCHMARKS.md "Failback" has the figures.
#
#   benches/failback_bytes.sh 256 4      # SIZE MiB, CHANGE MiB
#   benches/failback_bytes.sh 64 4 100   # and 100 PGs (demo/main, demo/p1..)
#
# LIFEBOAT (default: lifeboat on PATH) is the binary; needs qemu-io and jq.
# Uses /tmp/lifeboat-fb and ports 600 above `up`'s defaults.
set -u
SIZE=${1:-256}
CHANGE=${2:-4}
PGS=${3:-1}
LB=${LIFEBOAT:-lifeboat}
D=/tmp/lifeboat-fb
pkill -9 -f "lifeboat-fb/" 2>/dev/null
rm -rf "$D" "$D".*
"$LB" up --data-dir "$D" --port-offset 600 --detach > "$D.up.log" 2>&1 || { cat "$D.up.log"; exit 1; }
set -a; . "$D/up.env"; set +a
for i in $(seq 1 $((PGS - 1))); do "$LB" pg create "demo/p$i" > /dev/null || exit 1; done
head -c $((SIZE << 20)) /dev/urandom > "$D.data"
head -c $((CHANGE << 20)) /dev/urandom > "$D.change"
now() { date +%s%N; }
t0=$(now)
qemu-io -f raw -c "write -s $D.data 0 ${SIZE}M" "$NBD_URI_1" > /dev/null || exit 1
echo "wrote $SIZE MiB at the primary in $(( ($(now) - t0) / 1000000 )) ms"
applied() { "$LB" --endpoint "$1" pg show demo/main --output json | jq -r '.status.applied_index // 0'; }
last=$("$LB" --endpoint "$LIFEBOAT_ENDPOINT_1" pg show demo/main --output json | jq -r '.status.last_log_index')
until [ "$(applied "$LIFEBOAT_ENDPOINT_3")" -ge "$last" ] && [ "$(applied "$LIFEBOAT_ENDPOINT_4")" -ge "$last" ]; do sleep 0.2; done
kill -9 "$PID_0" "$PID_1" "$PID_2"
sleep 8
"$LB" --endpoint "$LIFEBOAT_ENDPOINT_3" failover --force --to dr --output json > "$D.forced.json" || { cat "$D.forced.json"; exit 1; }
qemu-io -f raw -c "write -s $D.change 0 ${CHANGE}M" "$NBD_URI_3" > /dev/null || exit 1
for i in 0 1 2; do
  nohup "$LB" node start --config "$D/nodes/$i/node.toml" >> "$D/nodes/$i/node.log" 2>&1 &
done
t1=$(now)
"$LB" --endpoint "$LIFEBOAT_ENDPOINT_3" failback prepare --site primary --output json > "$D.prepared.json" || { cat "$D.prepared.json"; exit 1; }
echo "failback prepare returned $(( ($(now) - t1) / 1000000 )) ms after the old nodes were started"
jq -r '"\(.pgs | length) PGs; \([.pgs[].members[]] | length) members at primary, \([.pgs[].members[] | select(.resync)] | length) rejoined by a resync; received \([.pgs[].members[].resync.bytes_received // 0] | add) bytes in all; slowest resync \([.pgs[].members[].resync.took_ms // 0] | max) ms"' "$D.prepared.json"
jq -r --argjson changed $((CHANGE << 20)) '.pgs[] | select(.name == "demo/main") | .name as $pg | .members[] |
  "\($pg) node \(.node): held \(.resync.held_bytes) bytes, received \(.resync.bytes_received) (\((.resync.bytes_received * 1000 / .resync.held_bytes | floor) / 10)% of held, \((.resync.bytes_received * 100 / $changed | floor) / 100)x the \($changed) bytes changed at DR); offer \(.resync.offer_bytes) bytes, \(.resync.replaced) of \(.resync.segments) segments replaced, \(.resync.took_ms) ms"' "$D.prepared.json"
"$LB" --endpoint "$LIFEBOAT_ENDPOINT_3" failover --planned --to primary > /dev/null || exit 1
sleep 2
for i in 0 1 2 3 4; do
  echo "node $i: $("$LB" --endpoint "$(eval echo "\$LIFEBOAT_ENDPOINT_$i")" pg digest demo/main)"
done
pkill -9 -f "lifeboat-fb/"
