#!/usr/bin/env bash
# Tollgate's local stack, from one laptop.
#
#   ./deploy/local.sh up       install what is missing, build, start everything, write .local/env
#   ./deploy/local.sh down     stop everything `up` started
#   ./deploy/local.sh status   what runs, where
#   ./deploy/local.sh test     install what is missing and run every test
#   ./deploy/local.sh bench    gateway overhead vs the direct mock (oha; --litellm: LiteLLM instead)
#
# Everything lives under .local/ (git-ignored) and uses ports of its own
# (17400 and up), so it never collides with a NATS or ClickHouse already
# running. `up` is idempotent: a service already running is left alone.
#
# Knobs (environment):
#   TOLLGATE_LOCAL_DIR   where state goes (default: <repo>/.local)
#   TOLLGATE_PORT_BASE   first port (default 17400)
#   TOLLGATE_PROFILE     cargo profile for the services (default release)
#   TOLLGATE_BUS         nats (default) or kafka: which bus carries events. With
#                        kafka, a tansu broker (Kafka-compatible, built once into
#                        /var/tmp/tollgate-tools, ~11 minutes) runs on BASE+3
#   OTEL_*               passed through to the services
#   TOLLGATE_OTLP_SINK=1 also start tollgate-otlp-sink and export every
#                        service's spans to it (JSON lines in .local/spans.jsonl),
#                        unless OTEL_EXPORTER_OTLP_ENDPOINT names a collector
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOCAL=${TOLLGATE_LOCAL_DIR:-$ROOT/.local}
BASE=${TOLLGATE_PORT_BASE:-17400}
PROFILE=${TOLLGATE_PROFILE:-release}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
case $PROFILE in dev|debug) BIN=$TARGET/debug; PROFILE=dev ;; *) BIN=$TARGET/$PROFILE ;; esac

NATS_PORT=$((BASE + 0))
CH_HTTP_PORT=$((BASE + 1))
CH_TCP_PORT=$((BASE + 2))
GATEWAY_PORT=$((BASE + 10))
BILLING_PORT=$((BASE + 11))
METER_METRICS_PORT=$((BASE + 12))
MOCK_PORT=$((BASE + 20))
OTLP_SINK_PORT=$((BASE + 30))
KAFKA_PORT=$((BASE + 3))
BUS=${TOLLGATE_BUS:-nats}
TOOLS=/var/tmp/tollgate-tools
TANSU=${TOLLGATE_TANSU:-$TOOLS/bin/tansu}

log() { printf '\033[1m[tollgate]\033[0m %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- install
APT_UPDATED=0
apt_install() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install them by hand"
  local sudo=""; [ "$(id -u)" -ne 0 ] && sudo=sudo
  log "installing ${missing[*]} (apt-get)"
  if [ $APT_UPDATED -eq 0 ]; then $sudo apt-get update -qq; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

install_runtime() {
  # librdkafka (Kafka bus) is built from source by cargo: a C toolchain,
  # perl for its configure, and the OpenSSL and zlib headers.
  apt_install nats-server clickhouse-server curl build-essential perl pkg-config libssl-dev zlib1g-dev
  command -v cargo >/dev/null || die "cargo is required (https://rustup.rs)"
  case $BUS in nats|kafka) ;; *) die "TOLLGATE_BUS must be nats or kafka, not '$BUS'";; esac
  if [ "$BUS" = kafka ]; then install_tansu; fi
}

# tansu, the Kafka-compatible broker of the local stack and the Kafka tests,
# from crates.io. Built once per machine outside the clone, so every clone
# (and CI on this machine) reuses it.
install_tansu() {
  [ -x "$TANSU" ] && return 0
  log "building tansu into $TOOLS (cargo install, about 11 minutes, once per machine)"
  CARGO_TARGET_DIR=/var/tmp/tansu-target cargo install tansu --locked --features dynostore --root "$TOOLS" -q
  [ -x "$TANSU" ] || die "tansu is not at $TANSU after the build (TOLLGATE_TANSU names another path?)"
}

install_test_tools() {
  install_runtime
  install_tansu
  apt_install wrk
  install_venv
}

# .local/venv: the official openai and anthropic SDKs (and the test tools),
# for the README's snippet and the SDK suite. Always the checkout's own
# (TOLLGATE_VENV moves it), also for a stack under another TOLLGATE_LOCAL_DIR.
install_venv() {
  apt_install python3-venv
  local venv=${TOLLGATE_VENV:-$ROOT/.local/venv}
  if [ ! -x "$venv/bin/pytest" ] || ! cmp -s "$ROOT/tests/python/requirements.txt" "$venv/requirements.txt"; then
    log "creating the Python venv .local/venv (official openai and anthropic SDKs)"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q -r "$ROOT/tests/python/requirements.txt"
    cp "$ROOT/tests/python/requirements.txt" "$venv/requirements.txt"
  fi
}

build() {
  log "building services ($PROFILE)"
  (cd "$ROOT" && cargo build --profile "$PROFILE" --bins -q)
}

# ---------------------------------------------------------------- processes
pidfile() { echo "$LOCAL/run/$1.pid"; }
running() { local p; p=$(pidfile "$1"); [ -f "$p" ] && kill -0 "$(cat "$p")" 2>/dev/null; }

# start NAME CMD... : runs CMD in the background in its own session, once.
start() {
  local name=$1; shift
  if running "$name"; then log "$name already running (pid $(cat "$(pidfile "$name")"))"; return 0; fi
  mkdir -p "$LOCAL/run" "$LOCAL/log"
  setsid "$@" >>"$LOCAL/log/$name.log" 2>&1 < /dev/null &
  echo $! >"$(pidfile "$name")"
  log "started $name (pid $!)"
}

stop() {
  local name=$1 p pid
  p=$(pidfile "$name")
  [ -f "$p" ] || return 0
  pid=$(cat "$p")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    log "stopped $name"
  fi
  rm -f "$p"
}

wait_http() {
  local name=$1 url=$2
  for _ in $(seq 1 300); do
    curl -fsS -o /dev/null "$url" 2>/dev/null && return 0
    running "$name" || { tail -n 30 "$LOCAL/log/$name.log" >&2 || true; die "$name exited; log: $LOCAL/log/$name.log"; }
    sleep 0.1
  done
  die "$name not ready at $url; log: $LOCAL/log/$name.log"
}

wait_tcp() {
  local name=$1 port=$2
  for _ in $(seq 1 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    running "$name" || die "$name exited; log: $LOCAL/log/$name.log"
    sleep 0.1
  done
  die "$name not listening on $port"
}

# ---------------------------------------------------------------- services
secret() { # a stable random secret per name, kept in .local/secrets
  local f=$LOCAL/secrets/$1
  mkdir -p "$LOCAL/secrets"; chmod 700 "$LOCAL/secrets"
  [ -s "$f" ] || (umask 077; printf '%s%s' "$2" "$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$f")
  cat "$f"
}

start_nats() {
  mkdir -p "$LOCAL/nats"
  start nats /usr/sbin/nats-server -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$LOCAL/nats" -m 0
  wait_tcp nats "$NATS_PORT"
}

start_clickhouse() {
  local dir=$LOCAL/clickhouse
  mkdir -p "$dir"/{data,tmp,user_files,format_schemas,log}
  sed -e "s#@DIR@#$dir#g" -e "s#@HTTP_PORT@#$CH_HTTP_PORT#g" -e "s#@TCP_PORT@#$CH_TCP_PORT#g" \
    "$ROOT/deploy/clickhouse/config.xml.in" >"$dir/config.xml"
  cp "$ROOT/deploy/clickhouse/users.xml" "$dir/users.xml"
  start clickhouse /usr/sbin/clickhouse-server --config-file="$dir/config.xml"
  wait_http clickhouse "http://127.0.0.1:$CH_HTTP_PORT/ping"
}

migrate() {
  "$BIN/tollgate-migrate" --url "http://127.0.0.1:$CH_HTTP_PORT" --database tollgate
}

render() { # render TEMPLATE OUT: fill @VARS@ of deploy/*.toml.in
  sed -e "s#@LOCAL@#$LOCAL#g" -e "s#@NATS_URL@#nats://127.0.0.1:$NATS_PORT#g" \
      -e "s#@CH_URL@#http://127.0.0.1:$CH_HTTP_PORT#g" -e "s#@MOCK_URL@#http://127.0.0.1:$MOCK_PORT#g" \
      -e "s#@GATEWAY_PORT@#$GATEWAY_PORT#g" -e "s#@METER_METRICS_PORT@#$METER_METRICS_PORT#g" \
      -e "s#@BILLING_PORT@#$BILLING_PORT#g" "$1" >"$2"
}


# A local OTLP receiver when asked for (TOLLGATE_OTLP_SINK=1) and no
# collector is configured: the services started after it export to it.
# The Kafka bus (TOLLGATE_BUS=kafka): tansu with in-memory storage, so
# `down` forgets the events log (ClickHouse keeps what the meter stored).
start_kafka() {
  if [ "$BUS" != kafka ]; then return 0; fi
  start kafka "$TANSU" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" --storage-engine memory://tansu/
  wait_tcp kafka "$KAFKA_PORT"
}

# bus_config FILE: point a rendered service config at the chosen bus.
bus_config() {
  if [ "$BUS" != kafka ]; then return 0; fi
  {
    printf 'bus = "kafka"\n'
    cat "$1"
    printf '\n[kafka]\nbrokers = "127.0.0.1:%s"\npartitions = 6\n' "$KAFKA_PORT"
    # tansu 0.6 answers a fetch from inside a multi-message record batch
    # wrongly; one message per batch keeps restarts from a committed offset exact.
    printf '[kafka.properties]\n"batch.num.messages" = "1"\n'
  } >"$1.tmp"
  mv "$1.tmp" "$1"
}

start_otlp_sink() {
  [ "${TOLLGATE_OTLP_SINK:-0}" = 1 ] || return 0
  if [ -n "${OTEL_EXPORTER_OTLP_ENDPOINT:-}" ]; then
    log "OTEL_EXPORTER_OTLP_ENDPOINT is set: exporting there, not starting the sink"; return 0
  fi
  start otlp-sink "$BIN/tollgate-otlp-sink" --listen "127.0.0.1:$OTLP_SINK_PORT" --out "$LOCAL/spans.jsonl"
  wait_tcp otlp-sink "$OTLP_SINK_PORT"
  export OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$OTLP_SINK_PORT OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf
  OTLP_SPANS=$LOCAL/spans.jsonl
}

start_mock() {
  start mock "$BIN/tollgate-mock-upstream" --listen "127.0.0.1:$MOCK_PORT"
  wait_http mock "http://127.0.0.1:$MOCK_PORT/healthz"
}

start_gateway() {
  mkdir -p "$LOCAL/config" "$LOCAL/gateway"
  render "$ROOT/deploy/gateway.local.toml.in" "$LOCAL/config/gateway.toml"
  bus_config "$LOCAL/config/gateway.toml"
  start gateway env OTEL_SERVICE_NAME=tollgate-gateway RUST_LOG="${RUST_LOG:-info}" "$BIN/tollgate-gateway" --config "$LOCAL/config/gateway.toml" run
  wait_http gateway "http://127.0.0.1:$GATEWAY_PORT/readyz"
}

start_billing() {
  mkdir -p "$LOCAL/config"
  render "$ROOT/deploy/billing.local.toml.in" "$LOCAL/config/billing.toml"
  bus_config "$LOCAL/config/billing.toml"
  start billing env OTEL_SERVICE_NAME=tollgate-billing RUST_LOG="${RUST_LOG:-info}" "$BIN/tollgate-billing" --config "$LOCAL/config/billing.toml"
  wait_http billing "http://127.0.0.1:$BILLING_PORT/healthz"
}

# The demo tenant (postpaid, no limit) and its key come from billing's admin
# API. The key's secret is shown once, so it is kept in .local/secrets; a key
# billing no longer knows (e.g. after a wiped .local/nats) is made again.
seed_demo() {
  local url=http://127.0.0.1:$BILLING_PORT auth="Authorization: Bearer $ADMIN_KEY" code id_file=$LOCAL/secrets/demo-key-id
  code=$(curl -sS -o "$LOCAL/run/seed.json" -w '%{http_code}' -X POST -H "$auth" -H 'content-type: application/json' \
    -d '{"id":"demo","name":"Demo tenant","billing":"postpaid"}' "$url/admin/tenants")
  case $code in 201|409) ;; *) cat "$LOCAL/run/seed.json" >&2; die "creating the demo tenant failed ($code)";; esac
  if [ -s "$id_file" ] && [ -s "$LOCAL/secrets/demo-key" ] \
     && curl -fsS -o /dev/null -H "$auth" "$url/admin/keys/$(cat "$id_file")"; then
    DEMO_KEY=$(cat "$LOCAL/secrets/demo-key"); return 0
  fi
  curl -fsS -X POST -H "$auth" -H 'content-type: application/json' -d '{"name":"demo key"}' \
    "$url/admin/tenants/demo/keys" >"$LOCAL/run/seed.json" || die "creating the demo key failed"
  (umask 077
   python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["secret"], end="")' "$LOCAL/run/seed.json" >"$LOCAL/secrets/demo-key"
   python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"], end="")' "$LOCAL/run/seed.json" >"$id_file")
  rm -f "$LOCAL/run/seed.json"
  DEMO_KEY=$(cat "$LOCAL/secrets/demo-key")
  log "created the demo key $(cat "$id_file")"
}

start_meter() {
  mkdir -p "$LOCAL/config"
  render "$ROOT/deploy/meter.local.toml.in" "$LOCAL/config/meter.toml"
  bus_config "$LOCAL/config/meter.toml"
  start meter env OTEL_SERVICE_NAME=tollgate-meter RUST_LOG="${RUST_LOG:-info}" "$BIN/tollgate-meter" --config "$LOCAL/config/meter.toml" run
  wait_http meter "http://127.0.0.1:$METER_METRICS_PORT/healthz"
}

write_env() {
  local f=$LOCAL/env
  cat >"$f.tmp" <<EOF
export TOLLGATE_GATEWAY_URL=http://127.0.0.1:$GATEWAY_PORT
export TOLLGATE_BILLING_URL=http://127.0.0.1:$BILLING_PORT
export TOLLGATE_ADMIN_KEY=$ADMIN_KEY
export TOLLGATE_DEMO_KEY=$DEMO_KEY
export TOLLGATE_MOCK_URL=http://127.0.0.1:$MOCK_PORT
export TOLLGATE_CLICKHOUSE_URL=http://127.0.0.1:$CH_HTTP_PORT
export TOLLGATE_CLICKHOUSE_DB=tollgate
export TOLLGATE_CLICKHOUSE_USER=finance
export TOLLGATE_CLICKHOUSE_PASSWORD=finance
export TOLLGATE_NATS_URL=nats://127.0.0.1:$NATS_PORT
export TOLLGATE_BUS=$BUS
export TOLLGATE_KAFKA_BROKERS=$([ "$BUS" = kafka ] && echo "127.0.0.1:$KAFKA_PORT")
export TOLLGATE_METER_METRICS_URL=http://127.0.0.1:$METER_METRICS_PORT
export TOLLGATE_GATEWAY_BIN=$BIN/tollgate-gateway
export TOLLGATE_GATEWAY_CONFIG=$LOCAL/config/gateway.toml
export TOLLGATE_OTLP_SPANS=${OTLP_SPANS:-}
EOF
  chmod 600 "$f.tmp"; mv "$f.tmp" "$f"
}

SERVICES=(meter gateway billing mock kafka clickhouse nats otlp-sink floor)

cmd_up() {
  install_runtime
  mkdir -p "$LOCAL"
  install_venv
  build
  ADMIN_KEY=$(secret admin-key tg_admin_)
  start_nats
  start_clickhouse
  migrate
  start_kafka
  start_otlp_sink
  start_mock
  start_billing
  seed_demo
  start_gateway
  start_meter
  write_env
  log "up: source $LOCAL/env   (events on $BUS; gateway $([ -n "${OTEL_EXPORTER_OTLP_ENDPOINT:-}" ] && echo "with OTLP to $OTEL_EXPORTER_OTLP_ENDPOINT" || echo "without OTLP"))"
}

cmd_down() {
  for s in "${SERVICES[@]}"; do stop "$s"; done
  log "down"
}

cmd_status() {
  for s in "${SERVICES[@]}"; do
    if running "$s"; then echo "$s: running (pid $(cat "$(pidfile "$s")"))"; else echo "$s: stopped"; fi
  done
  [ -f "$LOCAL/env" ] && cat "$LOCAL/env"
}

cmd_test() {
  install_test_tools
  cd "$ROOT"
  log "building everything (tests use the debug profile)"
  cargo build --workspace --bins --tests -q
  log "cargo test"
  cargo test --workspace --no-fail-fast
  log "local stack + official SDK conformance (events on NATS)"
  TOLLGATE_PROFILE=dev TOLLGATE_BUS=nats "$ROOT/tests/stack/run.sh"
  log "local stack + official SDK conformance (events on Kafka)"
  TOLLGATE_PROFILE=dev TOLLGATE_BUS=kafka TOLLGATE_STACK_TEST_PORT_BASE=27500 "$ROOT/tests/stack/run.sh"
}

# bench [--litellm] [latency.py options]: the gateway's overhead against the
# direct mock (tests/bench/latency.py; `--suite all` for every suite). With
# --litellm, LiteLLM's proxy (PyPI, in a venv under /var/tmp/tollgate-tools)
# is started on port BASE+30 in front of the same mock and measured instead,
# with the same harness; it is stopped afterwards.
cmd_bench() {
  local tools=/var/tmp/tollgate-tools litellm=0 floor= args=()
  for a in "$@"; do
    case $a in
      --litellm) litellm=1 ;;
      --floor) floor=mock ;;                 # the no-logic proxy against the mock
      --floor-vs-gateway) floor=gateway ;;   # the gateway against the no-logic proxy
      *) args+=("$a") ;;
    esac
  done
  if [ ! -x "$tools/bin/oha" ]; then
    log "installing oha (load generator) into $tools"
    cargo install oha --locked --root "$tools" -q
  fi
  [ -f "$LOCAL/env" ] || die "run ./deploy/local.sh up first"
  if [ -n "$floor" ]; then
    # tollgate-floor-proxy: the gateway's I/O stack without its logic, in
    # front of the same mock; what any proxy hop costs on this machine.
    local port=$((BASE + 31)) rc=0 fpid
    start floor "$BIN/tollgate-floor-proxy" --listen "127.0.0.1:$port" --upstream "http://127.0.0.1:$MOCK_PORT"
    wait_http floor "http://127.0.0.1:$port/v1/models"
    fpid=$(cat "$(pidfile floor)")
    if [ "$floor" = mock ]; then
      OHA=$tools/bin/oha TOLLGATE_ENV_FILE="$LOCAL/env" python3 "$ROOT/tests/bench/latency.py" \
        --target floor --target-url "http://127.0.0.1:$port" --pid "$fpid" ${args[@]+"${args[@]}"} || rc=$?
    else
      OHA=$tools/bin/oha TOLLGATE_ENV_FILE="$LOCAL/env" python3 "$ROOT/tests/bench/latency.py" \
        --direct-url "http://127.0.0.1:$port" --direct-pid "$fpid" --direct-model mock-gpt-4o-mini \
        --direct-key none ${args[@]+"${args[@]}"} || rc=$?
    fi
    stop floor
    return $rc
  fi
  if [ $litellm -eq 0 ]; then
    OHA=$tools/bin/oha TOLLGATE_ENV_FILE="$LOCAL/env" python3 "$ROOT/tests/bench/latency.py" ${args[@]+"${args[@]}"}
    return
  fi
  local venv=$tools/litellm-venv port=$((BASE + 30)) rc=0
  if [ ! -x "$venv/bin/litellm" ]; then
    apt_install python3-venv
    log "installing LiteLLM's proxy into $venv (PyPI)"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q 'litellm[proxy]'
  fi
  mkdir -p "$LOCAL/config"
  cat >"$LOCAL/config/litellm.yaml" <<EOF
# LiteLLM's proxy in front of the same mock upstream (written by local.sh bench).
model_list:
  - model_name: mock-gpt
    litellm_params:
      model: openai/mock-gpt-4o-mini
      api_base: http://127.0.0.1:$MOCK_PORT/v1
      api_key: sk-mock
general_settings:
  master_key: sk-bench
EOF
  start litellm env LITELLM_LOG=ERROR "$venv/bin/litellm" --config "$LOCAL/config/litellm.yaml" \
    --host 127.0.0.1 --port "$port" --num_workers 1
  wait_http litellm "http://127.0.0.1:$port/health/liveliness"
  OHA=$tools/bin/oha TOLLGATE_ENV_FILE="$LOCAL/env" python3 "$ROOT/tests/bench/latency.py" \
    --target litellm --target-url "http://127.0.0.1:$port" --target-key sk-bench \
    --pid "$(cat "$(pidfile litellm)")" ${args[@]+"${args[@]}"} || rc=$?
  stop litellm
  return $rc
}

case "${1:-}" in
  up) cmd_up ;;
  bench) shift; cmd_bench "$@" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  test) cmd_test ;;
  *) echo "usage: $0 up|down|status|test|bench" >&2; exit 2 ;;
esac
