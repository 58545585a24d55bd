#!/bin/bash
# Forced failover RTO for N protection groups on `lifeboat up` (3 primary,
# 2 DR, a witness): from the `failover --force` command to the first NBD
# read and the first S3 GET served at a DR node, with the clients retrying
# from the moment of the command. BENCHMARKS.md "Failover" has the figures.
#
#   benches/failover_rto.sh 100        # N PGs: demo/main and demo/p1..
#
# LIFEBOAT (default: lifeboat on PATH) is the binary; needs qemu-io and
# aws-cli. Uses /tmp/lifeboat-rto-N and ports 500 above `up`'s defaults.
set -u
N=${1:-10}
LB=${LIFEBOAT:-lifeboat}
D=/tmp/lifeboat-rto-$N
pkill -9 -f "lifeboat-rto-$N/" 2>/dev/null
rm -rf "$D"
"$LB" up --data-dir "$D" --port-offset 500 --detach > "$D.up.log" 2>&1 || { cat "$D.up.log"; exit 1; }
set -a; . "$D/up.env"; set +a
for i in $(seq 1 $((N - 1))); do "$LB" pg create "demo/p$i" > /dev/null || exit 1; done
echo hello > "$D.obj"
aws --endpoint-url "$AWS_ENDPOINT_URL" s3 cp "$D.obj" s3://demo-backups/obj.txt > /dev/null || exit 1
sleep 2
kill -9 "$PID_0" "$PID_1" "$PID_2"
# Let the catalog re-elect at DR (with the witness) first: this measures
# the failover, not the catalog's election timers.
sleep 8
now() { date +%s%N; }
t0=$(now)
( for _ in $(seq 1 1500); do
    qemu-io -r -f raw -c 'read 0 4096' "$NBD_URI_3" > /dev/null 2>&1 && break; sleep 0.02
  done; now > "$D.t_nbd" ) &
( for _ in $(seq 1 300); do
    aws --endpoint-url "$S3_ENDPOINT_3" s3api get-object --bucket demo-backups --key obj.txt "$D.got" > /dev/null 2>&1 && break; sleep 0.02
  done; now > "$D.t_s3" ) &
"$LB" --endpoint "$LIFEBOAT_ENDPOINT_3" failover --force --to dr --output json > "$D.forced.json" || { cat "$D.forced.json"; exit 1; }
t1=$(now)
wait
cmp -s "$D.got" "$D.obj" || echo "the GET at DR did not return the object"
ms() { echo $(( ($1 - t0) / 1000000 )); }
echo "N=$N: command returned at $(ms "$t1") ms; first NBD read at $(ms "$(cat "$D.t_nbd")") ms; first S3 GET at $(ms "$(cat "$D.t_s3")") ms"
s0=$(now)
aws --endpoint-url "$S3_ENDPOINT_3" s3api get-object --bucket demo-backups --key obj.txt "$D.got" > /dev/null
echo "(one aws-cli GET against a serving node takes $(( ($(now) - s0) / 1000000 )) ms of that)"
pkill -9 -f "lifeboat-rto-$N/"
