#!/bin/sh
# `make loadtest`: start `prefix-router demo` on its own port, wait for /ready, run the Locust
# scenarios (loadtest/locustfile.py) headless for a bounded time, stop the demo. Writes
# loadtest/results/locust_*.csv, loadtest/results/locust.html and the demo's log beside them.
# Settings come from the environment (the Makefile passes its LOADTEST_* variables).
set -eu
BIN=${BIN:-.venv/bin}
PORT=${LOADTEST_PORT:-18080}
USERS=${LOADTEST_USERS:-24}
RATE=${LOADTEST_RATE:-8}
DURATION=${LOADTEST_TIME:-30s}
OUT=${LOADTEST_OUT:-loadtest/results}
URL="http://127.0.0.1:$PORT"

mkdir -p "$OUT"
"$BIN/prefix-router" demo --port "$PORT" >"$OUT/demo.log" 2>&1 &
DEMO=$!
trap 'kill "$DEMO" 2>/dev/null || true; wait "$DEMO" 2>/dev/null || true' EXIT INT TERM

# Poll /ready (every pool has a healthy worker) for up to 30 s.
tries=0
until "$BIN/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
    "$URL/ready" 2>/dev/null; do
    tries=$((tries + 1))
    if ! kill -0 "$DEMO" 2>/dev/null || [ "$tries" -ge 150 ]; then
        echo "loadtest: the demo gateway on $URL did not become ready; its log:" >&2
        cat "$OUT/demo.log" >&2
        exit 1
    fi
    sleep 0.2
done

echo "loadtest: $USERS users (spawn rate $RATE/s) for $DURATION against the demo on $URL"
"$BIN/locust" -f loadtest/locustfile.py --headless --only-summary \
    -u "$USERS" -r "$RATE" -t "$DURATION" --stop-timeout 10 \
    --csv "$OUT/locust" --html "$OUT/locust.html" --host "$URL"
echo "loadtest: reports in $OUT/locust_stats.csv and $OUT/locust.html"
