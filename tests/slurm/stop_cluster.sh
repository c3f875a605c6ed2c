#!/usr/bin/env bash
# Stop the daemons of tests/slurm/start_cluster.sh by their pid files (state stays for inspection).
DIR=${SLURM_TEST_DIR:-/tmp/redi-slurm}
for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/munge/munged.pid"; do
  if [ -f "$pidfile" ]; then
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null && for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    rm -f "$pidfile"
  fi
done
