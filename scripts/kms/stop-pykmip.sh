#!/usr/bin/env bash
# Stop the PyKMIP server that scripts/kms/start-pykmip.sh started for DIR.
#
# Usage: scripts/kms/stop-pykmip.sh DIR
#
# SIGTERM, then SIGKILL after STOP_GRACE seconds (default 1): PyKMIP's accept loop has a
# 10 s socket timeout, so a clean stop takes about 10 s, and the test state is throwaway.
# Only the server's own process group is signalled.
set -uo pipefail
DIR=${1:?usage: $0 DIR}
GRACE=${STOP_GRACE:-1}
PIDFILE="$DIR/pykmip.pid"
[[ -f $PIDFILE ]] || exit 0
PID=$(cat "$PIDFILE")
if kill -0 "$PID" 2>/dev/null; then
  kill -TERM -- "-$PID" 2>/dev/null || kill -TERM "$PID" 2>/dev/null
  for _ in $(seq 1 $((GRACE * 10))); do
    kill -0 "$PID" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL -- "-$PID" 2>/dev/null || true
fi
rm -f "$PIDFILE"
