#!/usr/bin/env python3
"""Gateway overhead at fixed request rates, measured side by side.

Runs `oha` at a fixed rate against the mock upstream directly and through the
gateway (full stack on: auth, limits, event publish to JetStream, meter into
ClickHouse), interleaved direct, gateway, direct, gateway, ... so machine drift
hits both paths alike. Only 200s count as successes. Prints p50/p90/p99 of
each path and the difference (the gateway's added latency), per rate and
mode (plain or streamed; for streams the figure is time to the full body).

    ./deploy/local.sh up            # release build
    python3 tests/bench/latency.py --rates 500,1000 --seconds 5 --rounds 3

Needs `oha` (./deploy/local.sh bench installs it with cargo into
/var/tmp/tollgate-tools) and reads the stack from .local/env.
"""
import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_env(path):
    env = {}
    for line in pathlib.Path(path).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            env[k] = v
    return env


def oha(oha_bin, url, body, headers, rate, seconds, connections):
    cmd = [oha_bin, "-z", f"{seconds}s", "-q", str(rate), "-c", str(connections), "--no-tui",
           "--latency-correction", "--output-format", "json", "-m", "POST",
           "-H", "content-type: application/json", "-d", body]
    for h in headers:
        cmd += ["-H", h]
    out = subprocess.run(cmd + [url], check=True, capture_output=True, text=True).stdout
    d = json.loads(out)
    codes = d.get("statusCodeDistribution", {})
    # Requests still in flight when the run's time is up are not failures.
    errors = {k: v for k, v in d.get("errorDistribution", {}).items() if "deadline" not in k}
    total = sum(codes.values()) + sum(errors.values())
    ok = codes.get("200", 0)
    p = d["latencyPercentiles"]
    return {"p50": p["p50"], "p90": p["p90"], "p99": p["p99"], "ok": ok, "total": total}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--env", default=os.environ.get("TOLLGATE_ENV_FILE", str(ROOT / ".local" / "env")))
    ap.add_argument("--rates", default="500,1000")
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--modes", default="plain,stream")
    ap.add_argument("--oha", default=os.environ.get("OHA", "/var/tmp/tollgate-tools/bin/oha"))
    a = ap.parse_args()
    env = load_env(a.env)
    direct = env["TOLLGATE_MOCK_URL"] + "/v1/chat/completions"
    gateway = env["TOLLGATE_GATEWAY_URL"] + "/v1/chat/completions"
    auth = [f"authorization: Bearer {env['TOLLGATE_DEMO_KEY']}"]
    print(f"# {os.cpu_count()} cores; {a.seconds}s x {a.rounds} rounds per path, interleaved; "
          f"{a.connections} connections; latency-corrected (oha -q)")
    print(f"{'mode':7} {'rate':>6} {'path':8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'ok':>8}")
    failed = False
    for mode in a.modes.split(","):
        stream = mode == "stream"
        for rate in [int(r) for r in a.rates.split(",")]:
            # The mock is addressed by its upstream model name, the gateway by the public one.
            def body(model):
                b = {"model": model, "messages": [{"role": "user", "content": "benchmark me"}]}
                if stream:
                    b.update(stream=True, stream_options={"include_usage": True})
                return json.dumps(b)
            runs = {"direct": [], "gateway": []}
            for _ in range(a.rounds):
                runs["direct"].append(oha(a.oha, direct, body("mock-gpt-4o-mini"), [], rate, a.seconds, a.connections))
                runs["gateway"].append(oha(a.oha, gateway, body("mock-gpt"), auth, rate, a.seconds, a.connections))
            med = {}
            for path, rs in runs.items():
                med[path] = {k: statistics.median(r[k] for r in rs) for k in ("p50", "p90", "p99")}
                ok = sum(r["ok"] for r in rs)
                total = sum(r["total"] for r in rs)
                failed |= ok != total
                print(f"{mode:7} {rate:>6} {path:8} {med[path]['p50']*1e3:8.3f} {med[path]['p90']*1e3:8.3f} "
                      f"{med[path]['p99']*1e3:8.3f} {ok:>4}/{total}")
            add = {k: (med["gateway"][k] - med["direct"][k]) * 1e6 for k in ("p50", "p90", "p99")}
            print(f"{mode:7} {rate:>6} {'added':8} {add['p50']:7.0f}µ {add['p90']:7.0f}µ {add['p99']:7.0f}µ")
    if failed:
        print("some requests did not return 200", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
