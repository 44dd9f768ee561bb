#!/usr/bin/env python3
"""Gateway overhead, measured side by side with the mock upstream.

Every figure is a ratio or a difference between two paths measured in the same
run, interleaved (direct, target, direct, target, ...) so that the drift of a
shared machine hits both alike:

  direct   client -> mock upstream
  target   client -> gateway (or LiteLLM's proxy) -> the same mock upstream

The load tool is `oha` (crates.io). Only 200s count as successes.

Suites (``--suite``, comma-separated; default ``latency``):

  latency     fixed rates (``oha -q``, latency-corrected), plain and streamed:
              p50/p90/p99 per path and the difference (the added latency);
              the target's CPU time per request (utime+stime of its process
              tree from /proc, before/after, divided by the requests it served)
              and its peak RSS (VmHWM).
  saturation  closed loop at high concurrency (no ``-q``): requests/s of each
              path and the ratio target/direct.
  scaling     added latency against the prompt size (1 KB .. 1 MB bodies) and
              the stream length (10 .. 10,000 chunks, ``x-mock-output-tokens``;
              the mock sends one SSE event per output token), at a fixed rate.
  rss         ``--streams`` concurrent long streams through the target (the
              mock paces them with ``x-mock-chunk-delay-ms``); samples VmRSS
              and reports VmHWM of the target.

    ./deploy/local.sh up                       # release build, full stack
    ./deploy/local.sh bench --suite latency,saturation --rates 500,1000,2000,5000
    ./deploy/local.sh bench --target litellm   # LiteLLM's proxy, same harness

The stack is read from .local/env (``--env``); the gateway's pid from
.local/run/gateway.pid beside it (``--pid`` overrides).
"""
import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
TICK = os.sysconf("SC_CLK_TCK")


def load_env(path):
    env = {}
    for line in pathlib.Path(path).read_text().splitlines():
        line = line.removeprefix("export ")
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            env[k] = v
    return env


# ---------------------------------------------------------------- /proc


def tree(pid):
    """pid and all its descendants (LiteLLM may fork workers)."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                kids = pathlib.Path(f"/proc/{p}/task/{t}/children").read_text().split()
                todo.extend(int(k) for k in kids)
        except OSError:
            pass
    return pids


def cpu_seconds(pid):
    """utime+stime of pid's process tree, in seconds."""
    total = 0
    for p in tree(pid):
        try:
            stat = pathlib.Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / TICK


def status_kib(pid, field):
    """Σ of a /proc/<pid>/status field (kB) over the tree."""
    total = 0
    for p in tree(pid):
        try:
            for line in pathlib.Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


# ---------------------------------------------------------------- oha


class Oha:
    def __init__(self, binary, tmp):
        self.binary = binary
        self.tmp = pathlib.Path(tmp)
        self.bodies = {}

    def body_file(self, body):
        f = self.bodies.get(body)
        if f is None:
            f = self.tmp / f"body{len(self.bodies)}.json"
            f.write_text(body)
            self.bodies[body] = f
        return f

    def run(self, url, body, headers, seconds=None, requests=None, rate=None, connections=64,
            timeout=None):
        cmd = [self.binary, "--no-tui", "--output-format", "json", "-c", str(connections),
               "-m", "POST", "-H", "content-type: application/json", "-D", str(self.body_file(body))]
        if seconds:
            cmd += ["-z", f"{seconds}s"]
        if requests:
            cmd += ["-n", str(requests)]
        if rate:
            cmd += ["-q", str(rate), "--latency-correction"]
        if timeout:
            cmd += ["-t", f"{timeout}s"]
        for h in headers:
            cmd += ["-H", h]
        out = subprocess.run(cmd + [url], check=True, capture_output=True, text=True).stdout
        d = json.loads(out)
        codes = d.get("statusCodeDistribution", {})
        # Requests still in flight when the run's time is up are not failures.
        errors = {k: v for k, v in d.get("errorDistribution", {}).items() if "deadline" not in k}
        ok = codes.get("200", 0)
        p = d["latencyPercentiles"]
        return {"p50": p["p50"] or 0.0, "p90": p["p90"] or 0.0, "p99": p["p99"] or 0.0, "ok": ok,
                "total": sum(codes.values()) + sum(errors.values()),
                "rps": d["summary"].get("requestsPerSec") or 0.0,
                "codes": codes, "errors": errors}


# ---------------------------------------------------------------- paths


class Paths:
    """The two paths: direct to the mock, and through the target."""

    def __init__(self, a, env):
        self.mock = env["TOLLGATE_MOCK_URL"] + "/v1/chat/completions"
        self.mock_auth = []
        self.mock_model = "mock-gpt-4o-mini"
        if a.direct_url:
            # A/B: the first path is another gateway (e.g. the build before a
            # change), so the difference is what the change did; or the
            # no-logic floor proxy (`--direct-key none`, the mock's model).
            self.mock = a.direct_url.rstrip("/") + "/v1/chat/completions"
            self.mock_auth = ([] if a.direct_key == "none"
                              else [f"authorization: Bearer {a.direct_key or env['TOLLGATE_DEMO_KEY']}"])
            self.mock_model = a.direct_model
        self.pid = a.pid
        self.direct_pid = a.direct_pid
        self.direct_cpu = [0.0, 0]
        if a.target == "gateway" and a.target_url:
            self.url = a.target_url.rstrip("/") + "/v1/chat/completions"
            self.auth = [f"authorization: Bearer {env['TOLLGATE_DEMO_KEY']}"]
            self.model = "mock-gpt"
        elif a.target == "gateway":
            self.url = env["TOLLGATE_GATEWAY_URL"] + "/v1/chat/completions"
            self.auth = [f"authorization: Bearer {env['TOLLGATE_DEMO_KEY']}"]
            self.model = "mock-gpt"
            if self.pid is None:
                pidfile = pathlib.Path(a.env).parent / "run" / "gateway.pid"
                self.pid = int(pidfile.read_text()) if pidfile.exists() else None
        elif a.target == "floor":
            # tollgate-floor-proxy in front of the mock: no key, the mock's model.
            self.url = a.target_url.rstrip("/") + "/v1/chat/completions"
            self.auth = []
            self.model = "mock-gpt-4o-mini"
        else:
            self.url = a.target_url.rstrip("/") + "/v1/chat/completions"
            self.auth = [f"authorization: Bearer {a.target_key}"]
            self.model = a.target_model
        self.name = a.target

    def body(self, path, stream, content="benchmark me", include_usage=True):
        model = self.mock_model if path == "direct" else self.model
        b = {"model": model, "messages": [{"role": "user", "content": content}]}
        if stream:
            b["stream"] = True
            if include_usage:
                b["stream_options"] = {"include_usage": True}
        return json.dumps(b)

    def target(self, path):
        return (self.mock, self.mock_auth) if path == "direct" else (self.url, self.auth)


def med(runs, k):
    return statistics.median(r[k] for r in runs)


def interleave(a, paths, oha, body_of, headers=(), **kw):
    """Runs direct, target, direct, target, ... `a.rounds` times each.
    Returns the runs per path and the target's CPU seconds and requests
    (in A/B mode the first path's too, as `paths.direct_cpu`)."""
    runs = {"direct": [], "target": []}
    cpu = {"direct": [0.0, 0], "target": [0.0, 0]}
    for _ in range(a.rounds):
        for path in ("direct", "target"):
            url, auth = paths.target(path)
            pid = paths.pid if path == "target" else paths.direct_pid
            before = cpu_seconds(pid) if pid else None
            r = oha.run(url, body_of(path), list(auth) + list(headers), **kw)
            if before is not None:
                cpu[path][0] += cpu_seconds(pid) - before
                cpu[path][1] += r["total"]
            runs[path].append(r)
    paths.direct_cpu = cpu["direct"]
    return runs, cpu["target"][0], cpu["target"][1]


def check(runs, label, failures):
    for path, rs in runs.items():
        ok, total = sum(r["ok"] for r in rs), sum(r["total"] for r in rs)
        if ok != total:
            codes = {}
            for r in rs:
                for k, v in list(r["codes"].items()) + list(r["errors"].items()):
                    codes[k] = codes.get(k, 0) + v
            failures.append(f"{label} {path}: {ok}/{total} ok {codes}")
    return {p: (sum(r["ok"] for r in rs), sum(r["total"] for r in rs)) for p, rs in runs.items()}


# ---------------------------------------------------------------- suites


def suite_latency(a, paths, oha, failures):
    print(f"\n## latency at fixed rates ({a.seconds}s x {a.rounds} rounds per path, interleaved, "
          f"{a.connections} connections, latency-corrected)")
    print(f"{'mode':7} {'rate':>6} {'path':8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'ok':>12} "
          f"{'cpu/req':>9}")
    for mode in a.modes.split(","):
        stream = mode == "stream"
        for rate in [int(r) for r in a.rates.split(",")]:
            runs, cpu, served = interleave(
                a, paths, oha, lambda p: paths.body(p, stream), seconds=a.seconds, rate=rate,
                connections=a.connections)
            counts = check(runs, f"{mode} {rate}/s", failures)
            m = {p: {k: med(rs, k) for k in ("p50", "p90", "p99")} for p, rs in runs.items()}
            for path in ("direct", "target"):
                ok, total = counts[path]
                c, n = (cpu, served) if path == "target" else paths.direct_cpu
                cpu_col = f"{c / n * 1e6:7.0f}µs" if n else ""
                print(f"{mode:7} {rate:>6} {path:8} {m[path]['p50']*1e3:8.3f} {m[path]['p90']*1e3:8.3f} "
                      f"{m[path]['p99']*1e3:8.3f} {ok:>6}/{total:<5} {cpu_col:>9}")
            add = {k: (m["target"][k] - m["direct"][k]) * 1e6 for k in ("p50", "p90", "p99")}
            print(f"{mode:7} {rate:>6} {'added':8} {add['p50']:7.0f}µ {add['p90']:7.0f}µ {add['p99']:7.0f}µ")
            sys.stdout.flush()
    if paths.pid:
        print(f"{paths.name} peak RSS (VmHWM): {status_kib(paths.pid, 'VmHWM') / 1024:.1f} MiB")


def suite_saturation(a, paths, oha, failures):
    print(f"\n## saturation (closed loop, {a.sat_connections} connections, {a.seconds}s x {a.rounds} "
          f"rounds per path, interleaved)")
    print(f"{'mode':7} {'path':8} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'ok':>14}")
    for mode in a.modes.split(","):
        stream = mode == "stream"
        runs, cpu, served = interleave(
            a, paths, oha, lambda p: paths.body(p, stream), seconds=a.seconds,
            connections=a.sat_connections)
        counts = check(runs, f"saturation {mode}", failures)
        rps = {}
        for path in ("direct", "target"):
            rps[path] = med(runs[path], "rps")
            ok, total = counts[path]
            print(f"{mode:7} {path:8} {rps[path]:9.0f} {med(runs[path], 'p50')*1e3:8.3f} "
                  f"{med(runs[path], 'p99')*1e3:8.3f} {ok:>7}/{total:<6}")
        cpu_col = f", {paths.name} CPU {cpu / served * 1e6:.0f} µs/request" if served else ""
        print(f"{mode:7} {'ratio':8} {rps['target'] / rps['direct'] * 100:8.1f}%{cpu_col}")
        sys.stdout.flush()


def suite_scaling(a, paths, oha, failures):
    rate, secs = a.scaling_rate, a.scaling_seconds
    print(f"\n## scaling at {rate}/s ({secs}s x {a.rounds} rounds per path, interleaved): "
          "added latency and target CPU per request")
    print(f"{'what':18} {'direct p50':>10} {'target p50':>10} {'added p50':>10} {'added p99':>10} "
          f"{'cpu/req':>9} {'ok':>12}")

    def row(label, runs, cpu, served):
        counts = check(runs, label, failures)
        d50, t50 = med(runs["direct"], "p50"), med(runs["target"], "p50")
        d99, t99 = med(runs["direct"], "p99"), med(runs["target"], "p99")
        ok, total = counts["target"]
        cpu_col = f"{cpu / served * 1e6:7.0f}µs" if served else ""
        print(f"{label:18} {d50*1e3:8.3f}ms {t50*1e3:8.3f}ms {(t50-d50)*1e6:8.0f}µs {(t99-d99)*1e6:8.0f}µs "
              f"{cpu_col:>9} {ok:>6}/{total:<5}")
        sys.stdout.flush()

    for kib in [int(s) for s in a.prompt_kib.split(",")]:
        content = ("lorem ipsum " * (kib * 1024 // 12 + 1))[: kib * 1024 - 60]
        runs, cpu, served = interleave(
            a, paths, oha, lambda p: paths.body(p, False, content), seconds=secs, rate=rate,
            connections=a.connections)
        row(f"prompt {kib} KiB", runs, cpu, served)
    for n in [int(s) for s in a.stream_chunks.split(",")]:
        # Fewer requests per second for long streams, so the mock and the
        # client are not what saturates.
        r = max(10, min(rate, rate * 100 // max(n, 1)))
        runs, cpu, served = interleave(
            a, paths, oha, lambda p: paths.body(p, True), [f"x-mock-output-tokens: {n}"],
            seconds=secs, rate=r, connections=a.connections)
        row(f"stream {n} ({r}/s)", runs, cpu, served)


def suite_rss(a, paths, oha, failures):
    n, tokens, delay = a.streams, a.stream_tokens, a.chunk_delay_ms
    print(f"\n## {n} concurrent streams through {paths.name} ({tokens} chunks, one every {delay} ms)")
    if not paths.pid:
        print("no pid for the target: cannot read its RSS")
        return
    base = status_kib(paths.pid, "VmRSS")
    samples = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            samples.append(status_kib(paths.pid, "VmRSS"))
            stop.wait(0.2)

    t = threading.Thread(target=sample)
    t.start()
    try:
        r = oha.run(paths.url, paths.body("target", True), paths.auth +
                    [f"x-mock-output-tokens: {tokens}", f"x-mock-chunk-delay-ms: {delay}"],
                    requests=n, connections=n, timeout=tokens * delay / 1000 * 4 + 30)
    finally:
        stop.set()
        t.join()
    check({"target": [r]}, f"rss {n} streams", failures)
    print(f"ok {r['ok']}/{r['total']}; p50 {r['p50']:.2f}s p99 {r['p99']:.2f}s per stream")
    print(f"{paths.name} VmRSS before {base / 1024:.1f} MiB, peak sampled {max(samples, default=0) / 1024:.1f} MiB, "
          f"VmHWM {status_kib(paths.pid, 'VmHWM') / 1024:.1f} MiB")


SUITES = {"latency": suite_latency, "saturation": suite_saturation, "scaling": suite_scaling,
          "rss": suite_rss}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", default=os.environ.get("TOLLGATE_ENV_FILE", str(ROOT / ".local" / "env")))
    ap.add_argument("--suite", default="latency", help="latency,saturation,scaling,rss or all")
    ap.add_argument("--target", default="gateway", choices=["gateway", "litellm", "floor"])
    ap.add_argument("--target-url", help="base URL of the target (without /v1); for --target "
                    "gateway, default from --env")
    ap.add_argument("--direct-url", help="A/B mode: measure this gateway (without /v1) as the "
                    "first path instead of the mock")
    ap.add_argument("--direct-key", help="A/B mode: the --direct-url's key (default the demo key; "
                    "'none' sends no Authorization)")
    ap.add_argument("--direct-model", default="mock-gpt", help="A/B mode: the --direct-url's model")
    ap.add_argument("--target-key", default="sk-bench")
    ap.add_argument("--target-model", default="mock-gpt")
    ap.add_argument("--pid", type=int, help="pid of the target process (CPU and RSS)")
    ap.add_argument("--direct-pid", type=int, help="A/B mode: pid of the --direct-url gateway")
    ap.add_argument("--rates", default="500,1000")
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--sat-connections", type=int, default=64)
    ap.add_argument("--modes", default="plain,stream")
    ap.add_argument("--scaling-rate", type=int, default=200)
    ap.add_argument("--scaling-seconds", type=int, default=4)
    ap.add_argument("--prompt-kib", default="1,10,100,1000")
    ap.add_argument("--stream-chunks", default="10,100,1000,10000")
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--stream-tokens", type=int, default=300)
    ap.add_argument("--chunk-delay-ms", type=int, default=20)
    ap.add_argument("--oha", default=os.environ.get("OHA", "/var/tmp/tollgate-tools/bin/oha"))
    a = ap.parse_args()
    if a.target in ("litellm", "floor") and not a.target_url:
        ap.error(f"--target-url is required for --target {a.target}")
    env = load_env(a.env)
    paths = Paths(a, env)
    suites = list(SUITES) if a.suite == "all" else a.suite.split(",")
    failures = []
    print(f"# {os.cpu_count()} cores, {os.uname().release}; target {paths.name} ({paths.url}), "
          f"pid {paths.pid}; direct {paths.mock}")
    with tempfile.TemporaryDirectory(prefix="tollgate-bench-") as tmp:
        oha = Oha(a.oha, tmp)
        for s in suites:
            SUITES[s](a, paths, oha, failures)
    if failures:
        print("\nnot every request returned 200:", file=sys.stderr)
        for f in failures:
            print("  " + f, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
