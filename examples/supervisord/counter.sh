#!/bin/sh
# The same counter in shell: its count is a shell variable, and every tick forks
# a short-lived `sleep` child, so processes come and go in the tree all the time
# (one is usually caught mid-sleep by the dump and restored with its PID).
name=${1:-counter-shell}
count=0
echo "$name started, pid $$"
while :; do
    count=$((count + 1))
    echo "$name tick $count"
    sleep "${COUNTER_INTERVAL:-0.5}"
done
