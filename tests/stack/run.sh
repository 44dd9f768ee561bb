#!/usr/bin/env bash
# The local stack, tested as a user runs it: `up` on a fresh state dir and
# its own ports, `up` again (harmless), the finance tables exist, the official
# SDK conformance suite against it, then `down` leaves no process of ours.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export TOLLGATE_LOCAL_DIR=${TOLLGATE_STACK_TEST_DIR:-$(mktemp -d /tmp/tollgate-stack-test.XXXXXX)}
export TOLLGATE_PORT_BASE=${TOLLGATE_STACK_TEST_PORT_BASE:-27400}
export TOLLGATE_PROFILE=${TOLLGATE_PROFILE:-dev}
# Traces on, to the stack's own OTLP sink: what ops get with a collector.
export TOLLGATE_OTLP_SINK=${TOLLGATE_OTLP_SINK:-1}
unset OTEL_EXPORTER_OTLP_ENDPOINT OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
VENV=${TOLLGATE_VENV:-$ROOT/.local/venv}
# Which bus carries events in this pass (TOLLGATE_BUS=kafka: the whole stack
# on a tansu broker); `.local/env` must say the same.
WANT_BUS=${TOLLGATE_BUS:-nats}
LOCAL_SH="$ROOT/deploy/local.sh"
pass=0; fail=0
ok() { echo "ok: $*"; pass=$((pass + 1)); }
bad() { echo "FAILED: $*"; fail=$((fail + 1)); }
cleanup() { "$LOCAL_SH" down >/dev/null 2>&1 || true; }
trap cleanup EXIT

"$LOCAL_SH" up
pids_first=$(cat "$TOLLGATE_LOCAL_DIR"/run/*.pid | sort | tr '\n' ' ')
"$LOCAL_SH" up
pids_second=$(cat "$TOLLGATE_LOCAL_DIR"/run/*.pid | sort | tr '\n' ' ')
[ "$pids_first" = "$pids_second" ] && ok "up twice keeps the same processes" || bad "up twice restarted something ($pids_first vs $pids_second)"

set -a; . "$TOLLGATE_LOCAL_DIR/env"; set +a
for v in TOLLGATE_GATEWAY_URL TOLLGATE_BILLING_URL TOLLGATE_ADMIN_KEY TOLLGATE_DEMO_KEY TOLLGATE_MOCK_URL \
         TOLLGATE_CLICKHOUSE_URL TOLLGATE_CLICKHOUSE_DB TOLLGATE_CLICKHOUSE_USER TOLLGATE_CLICKHOUSE_PASSWORD \
         TOLLGATE_NATS_URL TOLLGATE_BUS TOLLGATE_KAFKA_BROKERS; do
  grep -q "^export $v=" "$TOLLGATE_LOCAL_DIR/env" || bad ".local/env lacks 'export $v='"
done
ok ".local/env exports every variable of ARCHITECTURE.md"
# The README's way: a fresh shell that sources it hands them to the programs it starts.
if env -i PATH="$PATH" bash -c ". '$TOLLGATE_LOCAL_DIR/env' && python3 -c 'import os,sys; sys.exit(0 if os.environ.get(\"TOLLGATE_GATEWAY_URL\") else 1)'"; then
  ok "source .local/env exports TOLLGATE_GATEWAY_URL to a child process"
else
  bad "source .local/env leaves TOLLGATE_GATEWAY_URL unset for child processes"
fi
if [ "$TOLLGATE_BUS" = "$WANT_BUS" ]; then ok "events on $WANT_BUS (.local/env says so)"; else bad ".local/env says TOLLGATE_BUS=$TOLLGATE_BUS, expected $WANT_BUS"; fi
if [ "$WANT_BUS" = kafka ]; then
  if [ -n "$TOLLGATE_KAFKA_BROKERS" ] && (exec 3<>"/dev/tcp/${TOLLGATE_KAFKA_BROKERS%:*}/${TOLLGATE_KAFKA_BROKERS##*:}") 2>/dev/null \
     && grep -q "kafka partitions assigned" "$TOLLGATE_LOCAL_DIR/log/meter.log"; then
    ok "the meter consumes from the Kafka broker at $TOLLGATE_KAFKA_BROKERS"
  else
    bad "Kafka: broker '$TOLLGATE_KAFKA_BROKERS' not answering or the meter holds no partitions"
  fi
fi

tables=$(curl -fsS -u "$TOLLGATE_CLICKHOUSE_USER:$TOLLGATE_CLICKHOUSE_PASSWORD" "$TOLLGATE_CLICKHOUSE_URL/" --data-binary "SHOW TABLES FROM tollgate")
missing=""
for t in usage ledger invoices invoice_lines; do grep -qx "$t" <<<"$tables" || missing="$missing $t"; done
[ -z "$missing" ] && ok "finance tables visible to the read-only user" || bad "missing finance tables:$missing"
if curl -fsS -u "$TOLLGATE_CLICKHOUSE_USER:$TOLLGATE_CLICKHOUSE_PASSWORD" "$TOLLGATE_CLICKHOUSE_URL/" \
     --data-binary "CREATE TABLE tollgate.nope (x UInt8) ENGINE = Memory" >/dev/null 2>&1; then
  bad "the finance user can write"
else
  ok "the finance user is read-only"
fi

# One request with the client's own traceparent is one trace: the gateway's
# server span continues it and the meter's spans hang off the gateway's.
if [ -n "${TOLLGATE_OTLP_SPANS:-}" ]; then
  trace_id=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
  curl -fsS -o /dev/null "$TOLLGATE_GATEWAY_URL/v1/chat/completions" -H "authorization: Bearer $TOLLGATE_DEMO_KEY" \
    -H 'content-type: application/json' -H "traceparent: 00-$trace_id-00f067aa0ba902b7-01" \
    -d '{"model":"mock-gpt","messages":[{"role":"user","content":"trace me"}]}'
  if python3 - "$TOLLGATE_OTLP_SPANS" "$trace_id" <<'PY'
import json, sys, time
path, trace = sys.argv[1], sys.argv[2]
deadline = time.time() + 30
while time.time() < deadline:
    spans = []
    try:
        spans = [json.loads(l) for l in open(path) if trace in l]
    except FileNotFoundError:
        pass
    server = [s for s in spans if s["service"] == "tollgate-gateway" and s["kind"] == 2]
    meter = [s for s in spans if s["service"] == "tollgate-meter"
             and server and s["parent_span_id"] == server[0]["span_id"]]
    if server and server[0]["parent_span_id"] == "00f067aa0ba902b7" and len(meter) >= 2:
        sys.exit(0)
    time.sleep(0.2)
print(f"trace {trace}: {len(spans)} spans in {path}", file=sys.stderr)
sys.exit(1)
PY
  then ok "one request is one trace across gateway and meter (OTLP sink)"; else bad "no gateway+meter trace in the OTLP sink"; fi
else
  bad "TOLLGATE_OTLP_SPANS is empty: the OTLP sink did not start"
fi

if [ -d "$ROOT/tests/python" ] && [ -x "$VENV/bin/pytest" ]; then
  if TOLLGATE_ENV_FILE="$TOLLGATE_LOCAL_DIR/env" "$VENV/bin/pytest" -q "$ROOT/tests/python" -p no:cacheprovider; then
    ok "official SDK conformance suite"
  else
    bad "official SDK conformance suite"
  fi
else
  bad "no Python venv at $VENV (run ./deploy/local.sh test, which makes it)"
fi

started_pids=$(cat "$TOLLGATE_LOCAL_DIR"/run/*.pid)
"$LOCAL_SH" down
sleep 0.5
left=$(pgrep -af "$TOLLGATE_LOCAL_DIR" || true)
for p in $started_pids; do kill -0 "$p" 2>/dev/null && left="$left pid $p"; done
[ -z "$left" ] && ok "down leaves no process of ours running" || bad "still running after down: $left"
trap - EXIT

echo "stack (events on $WANT_BUS): $pass passed, $fail failed"
[ "$fail" -eq 0 ]
