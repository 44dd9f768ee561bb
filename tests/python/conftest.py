"""Fixtures for the official-SDK conformance suite.

The suite runs against a running local stack (`./deploy/local.sh up`). It reads the stack's
`NAME=value` env file named by `TOLLGATE_ENV_FILE` (default `<repo>/.local/env`); values in that
file win over the process environment, which only fills names the file lacks.

Test keys are created with the gateway's CLI (`put-key`), which writes them straight to the
gateway's JetStream KV bucket: `TOLLGATE_GATEWAY_BIN` and `TOLLGATE_GATEWAY_CONFIG` (from the env
file; if absent, the newest `target/{debug,release}/tollgate-gateway` and `<env dir>/config/gateway.toml`).

Usage rows are read from ClickHouse over HTTP as the read-only finance user.

The price book comes from billing (`GET /admin/prices` with `TOLLGATE_ADMIN_KEY` on
`TOLLGATE_BILLING_URL`), each usage row priced at its own `price_version`; when billing is not
reachable, from the gateway config's `[prices]` as before billing existed. The `billing` fixture is
an admin client on billing; `webhook_receiver` is a local HTTP server that records every POST.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterable

# Hypothesis (used by schemathesis) keeps a cache directory; keep it out of the work tree.
os.environ.setdefault(
    "HYPOTHESIS_STORAGE_DIRECTORY",
    os.path.join(tempfile.gettempdir(), "tollgate-pytest-hypothesis"),
)

import httpx  # noqa: E402
import openai  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEMO_MODELS = ("mock-gpt", "mock-claude", "mock-embed")
# The chat model served by an OpenAI-format upstream in the demo config.
CHAT_MODEL = "mock-gpt"
# Per-request HTTP timeout for every client in the suite (the test itself is capped at 60 s).
HTTP_TIMEOUT = 30.0

# Integer columns of tollgate.usage that ClickHouse may render as JSON strings (64-bit integers).
_INT_COLUMNS = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "estimated",
    "streamed",
    "latency_ms",
    "ttft_ms",
    "schema_version",
)


# ---------------------------------------------------------------- the stack's env file


def _parse_env_file(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        name, sep, value = line.partition("=")
        if not sep:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[name.strip()] = value
    return env


def _newest(paths: Iterable[Path]) -> Path | None:
    existing = [p for p in paths if p.is_file()]
    return max(existing, key=lambda p: p.stat().st_mtime) if existing else None


@dataclass(frozen=True)
class Stack:
    env_file: Path
    env: dict[str, str]
    gateway_url: str
    demo_key: str
    mock_url: str
    clickhouse_url: str
    clickhouse_db: str
    clickhouse_user: str
    clickhouse_password: str
    gateway_bin: Path | None
    gateway_config: Path | None
    billing_url: str = ""
    admin_key: str = ""

    @property
    def openai_base_url(self) -> str:
        return self.gateway_url + "/v1"


def load_stack() -> Stack:
    env_file = Path(os.environ.get("TOLLGATE_ENV_FILE") or REPO / ".local" / "env")
    if not env_file.is_file():
        raise FileNotFoundError(
            f"stack env file {env_file} not found: start the local stack with "
            "`./deploy/local.sh up` (or point TOLLGATE_ENV_FILE at another stack's env file)"
        )
    env = {k: v for k, v in os.environ.items() if k.startswith("TOLLGATE_")}
    env.update(_parse_env_file(env_file))

    def need(name: str) -> str:
        value = env.get(name, "")
        if not value:
            raise KeyError(f"{name} is missing from {env_file}")
        return value

    gateway_bin = Path(env["TOLLGATE_GATEWAY_BIN"]) if env.get("TOLLGATE_GATEWAY_BIN") else None
    if gateway_bin is None:
        target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
        gateway_bin = _newest(target / p / "tollgate-gateway" for p in ("debug", "release"))
    gateway_config = (
        Path(env["TOLLGATE_GATEWAY_CONFIG"])
        if env.get("TOLLGATE_GATEWAY_CONFIG")
        else env_file.parent / "config" / "gateway.toml"
    )
    return Stack(
        env_file=env_file,
        env=env,
        gateway_url=need("TOLLGATE_GATEWAY_URL").rstrip("/"),
        demo_key=need("TOLLGATE_DEMO_KEY"),
        mock_url=env.get("TOLLGATE_MOCK_URL", "").rstrip("/"),
        clickhouse_url=need("TOLLGATE_CLICKHOUSE_URL").rstrip("/"),
        clickhouse_db=env.get("TOLLGATE_CLICKHOUSE_DB") or "tollgate",
        clickhouse_user=env.get("TOLLGATE_CLICKHOUSE_USER") or "default",
        clickhouse_password=env.get("TOLLGATE_CLICKHOUSE_PASSWORD", ""),
        gateway_bin=gateway_bin,
        gateway_config=gateway_config if gateway_config.is_file() else None,
        billing_url=env.get("TOLLGATE_BILLING_URL", "").rstrip("/"),
        admin_key=env.get("TOLLGATE_ADMIN_KEY", ""),
    )


@pytest.fixture(scope="session")
def stack() -> Stack:
    try:
        s = load_stack()
    except (FileNotFoundError, KeyError) as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        httpx.get(s.gateway_url + "/healthz", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        pytest.fail(
            f"gateway not healthy at {s.gateway_url}/healthz ({exc!r}); env file {s.env_file}",
            pytrace=False,
        )
    return s


@pytest.fixture(scope="session")
def gateway_url(stack: Stack) -> str:
    return stack.gateway_url


@pytest.fixture(scope="session")
def openai_base_url(stack: Stack) -> str:
    return stack.openai_base_url


@pytest.fixture(scope="session")
def demo_key(stack: Stack) -> str:
    return stack.demo_key


@pytest.fixture(scope="session")
def mock_url(stack: Stack) -> str:
    if not stack.mock_url:
        pytest.skip(f"TOLLGATE_MOCK_URL is not in {stack.env_file}")
    return stack.mock_url


# ---------------------------------------------------------------- clients


def openai_client(stack: Stack, api_key: str, **kwargs: Any) -> openai.OpenAI:
    """The official client as a user would build it; never retries (a retry would hide errors)."""
    kwargs.setdefault("max_retries", 0)
    kwargs.setdefault("timeout", HTTP_TIMEOUT)
    return openai.OpenAI(base_url=stack.openai_base_url, api_key=api_key, **kwargs)


@pytest.fixture(scope="session")
def client(stack: Stack) -> Iterable[openai.OpenAI]:
    c = openai_client(stack, stack.demo_key)
    yield c
    c.close()


@pytest.fixture
def client_for(stack: Stack) -> Iterable[Callable[..., openai.OpenAI]]:
    """`client_for(key, **kwargs)`: an OpenAI client with that key (closed after the test)."""
    made: list[openai.OpenAI] = []

    def build(api_key: str, **kwargs: Any) -> openai.OpenAI:
        c = openai_client(stack, api_key, **kwargs)
        made.append(c)
        return c

    yield build
    for c in made:
        c.close()


@pytest.fixture(scope="session")
def http(stack: Stack) -> Iterable[httpx.Client]:
    """Raw HTTP to the gateway (no auth header unless a test sets one)."""
    with httpx.Client(base_url=stack.gateway_url, timeout=HTTP_TIMEOUT) as c:
        yield c


# ---------------------------------------------------------------- test keys


class TestKey(str):
    """A key's secret (usable wherever a string is), with its tenant and key id."""

    __test__ = False  # not a pytest test class
    tenant: str
    key_id: str

    def __new__(cls, secret: str, tenant: str, key_id: str) -> "TestKey":
        obj = super().__new__(cls, secret)
        obj.tenant = tenant
        obj.key_id = key_id
        return obj


def put_key(
    stack: Stack,
    *,
    secret: str | None = None,
    tenant: str | None = None,
    key_id: str | None = None,
    name: str | None = None,
    models: Iterable[str] | str | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
    max_concurrency: int | None = None,
    expires_at: datetime | str | None = None,
    disabled: bool = False,
    revoked: bool = False,
) -> TestKey:
    if stack.gateway_bin is None or not stack.gateway_bin.is_file():
        pytest.fail(
            "no gateway binary to create test keys with: set TOLLGATE_GATEWAY_BIN in "
            f"{stack.env_file} (looked for target/{{debug,release}}/tollgate-gateway)",
            pytrace=False,
        )
    if stack.gateway_config is None:
        pytest.fail(
            f"no gateway config: set TOLLGATE_GATEWAY_CONFIG in {stack.env_file}", pytrace=False
        )
    secret = secret or f"tg_test_{secrets.token_hex(16)}"
    tenant = tenant or f"t_{secrets.token_hex(6)}"
    key_id = key_id or f"k_{secrets.token_hex(6)}"
    cmd = [
        str(stack.gateway_bin),
        "--config",
        str(stack.gateway_config),
        "put-key",
        "--secret",
        secret,
        "--tenant",
        tenant,
        "--key-id",
        key_id,
    ]
    if name is not None:
        cmd += ["--name", name]
    if models is not None:
        cmd += ["--models", models if isinstance(models, str) else ",".join(models)]
    if rpm is not None:
        cmd += ["--rpm", str(rpm)]
    if tpm is not None:
        cmd += ["--tpm", str(tpm)]
    if max_concurrency is not None:
        cmd += ["--max-concurrency", str(max_concurrency)]
    if expires_at is not None:
        if isinstance(expires_at, datetime):
            if expires_at.tzinfo is None:
                expires_at = expires_at.replace(tzinfo=timezone.utc)
            expires_at = expires_at.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
        cmd += ["--expires-at", expires_at]
    if disabled:
        cmd.append("--disabled")
    if revoked:
        cmd.append("--revoked")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"put-key did not finish in 30 s: {' '.join(cmd[:4])} ...", pytrace=False)
    if done.returncode != 0:
        shown = " ".join("<secret>" if part == secret else part for part in cmd)
        pytest.fail(
            f"put-key failed ({done.returncode}): {shown}\n{done.stderr.strip()[-2000:]}",
            pytrace=False,
        )
    return TestKey(secret, tenant, key_id)


@pytest.fixture(scope="session")
def make_key(stack: Stack) -> Callable[..., TestKey]:
    """`make_key(models=..., rpm=..., tpm=..., max_concurrency=..., expires_at=..., disabled=...,
    revoked=..., name=..., tenant=..., key_id=...) -> secret`: a fresh key (random `tg_test_<hex>`
    secret, random tenant unless given) that works as soon as this returns."""

    def make(**limits: Any) -> TestKey:
        return put_key(stack, **limits)

    return make


# ---------------------------------------------------------------- ClickHouse


def _normalise_row(row: dict[str, Any]) -> dict[str, Any]:
    for name in _INT_COLUMNS:
        value = row.get(name)
        if isinstance(value, str) and re.fullmatch(r"-?\d+", value):
            row[name] = int(value)
        elif isinstance(value, bool):
            row[name] = int(value)
    if "cost" in row and row["cost"] is not None:
        row["cost"] = Decimal(str(row["cost"]))
    return row


@dataclass
class ClickHouse:
    url: str
    database: str
    user: str
    password: str
    _client: httpx.Client = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._client = httpx.Client(timeout=10)

    def query(self, sql: str) -> list[dict[str, Any]]:
        """Rows of a SELECT (JSONEachRow; Decimals parsed exactly)."""
        r = self._client.post(
            self.url + "/",
            params={"database": self.database},
            content=(sql.rstrip().rstrip(";") + " FORMAT JSONEachRow").encode(),
            auth=(self.user, self.password),
        )
        if r.status_code != 200:
            raise AssertionError(f"ClickHouse {r.status_code} for {sql!r}: {r.text[:1000]}")
        return [
            json.loads(line, parse_float=Decimal) for line in r.text.splitlines() if line.strip()
        ]

    def usage_rows(self, request_id: str) -> list[dict[str, Any]]:
        return [
            _normalise_row(row)
            for row in self.query(
                f"SELECT * FROM {self.database}.usage WHERE request_id = {sql_string(request_id)}"
            )
        ]

    def close(self) -> None:
        self._client.close()


def sql_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@pytest.fixture(scope="session")
def clickhouse(stack: Stack) -> Iterable[ClickHouse]:
    ch = ClickHouse(
        stack.clickhouse_url, stack.clickhouse_db, stack.clickhouse_user, stack.clickhouse_password
    )
    yield ch
    ch.close()


def wait_usage_row(ch: ClickHouse, request_id: str, timeout: float = 15) -> dict[str, Any]:
    """The `tollgate.usage` row of `request_id`, polled until it appears (at most `timeout` s).
    Fails if none appears or if the request has more than one row."""
    assert request_id, "no request id to look for"
    deadline = time.monotonic() + timeout
    while True:
        rows = ch.usage_rows(request_id)
        if rows:
            assert len(rows) == 1, f"{len(rows)} usage rows for request {request_id}: {rows}"
            return rows[0]
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"no tollgate.usage row for request_id {request_id!r} within {timeout} s"
            )
        time.sleep(0.2)


@pytest.fixture(scope="session")
def wait_usage(clickhouse: ClickHouse) -> Callable[..., dict[str, Any]]:
    """`wait_usage(request_id, timeout=15) -> row` (see `wait_usage_row`)."""

    def wait(request_id: str, timeout: float = 15) -> dict[str, Any]:
        return wait_usage_row(clickhouse, request_id, timeout)

    return wait


# ---------------------------------------------------------------- the price book

# Token columns of a usage row and the price (per million tokens) of each.
TOKEN_PRICES = (
    ("input_tokens", "input_per_million"),
    ("output_tokens", "output_per_million"),
    ("cache_read_tokens", "cache_read_per_million"),
    ("cache_write_tokens", "cache_write_per_million"),
)


def _decimal_prices(models: Any) -> dict[str, dict[str, Decimal]]:
    if not isinstance(models, dict):
        return {}
    return {
        model: {
            k: Decimal(str(v))
            for k, v in table.items()
            if k.endswith("_per_million") and v is not None
        }
        for model, table in models.items()
        if isinstance(table, dict)
    }


def prices_by_column(prices: dict[str, Decimal]) -> dict[str, Decimal]:
    """Per-million price of each token column, as billing and the gateway price them: cache reads
    and cache writes default to the input price when the book gives none."""
    out = {
        "input_tokens": prices["input_per_million"],
        "output_tokens": prices["output_per_million"],
    }
    out["cache_read_tokens"] = prices.get("cache_read_per_million", out["input_tokens"])
    out["cache_write_tokens"] = prices.get("cache_write_per_million", out["input_tokens"])
    return out


@dataclass
class PriceBook:
    """The price book (USD per million tokens, by public model name).

    From billing (`source == "billing"`): `version`/`models` are the book in force when loaded,
    and `cost(row)` prices a usage row at the row's own `price_version`, fetching that version
    from billing once (`GET /admin/prices?version=N`). From the gateway config's `[prices]`
    (`source == "config"`, billing unreachable): rows of another version cannot be priced."""

    version: str
    models: dict[str, dict[str, Decimal]]
    source: str = "config"
    billing_url: str = ""
    admin_key: str = field(default="", repr=False)
    _versions: dict[str, dict[str, dict[str, Decimal]]] = field(
        default_factory=dict, init=False, repr=False
    )
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self._versions[self.version] = self.models

    def models_at(self, version: Any) -> dict[str, dict[str, Decimal]] | None:
        """The models of price-book `version` (None: the config book, and another version)."""
        version = _version_str(version)
        with self._lock:
            if version in self._versions:
                return self._versions[version]
        if self.source != "billing":
            return None
        r = httpx.get(
            self.billing_url + "/admin/prices",
            params={"version": version},
            headers={"Authorization": f"Bearer {self.admin_key}"},
            timeout=HTTP_TIMEOUT,
        )
        if r.status_code == 404:
            raise AssertionError(
                f"a usage row names price-book version {version}, which billing does not know: "
                f"GET /admin/prices?version={version} -> 404 {r.text[:500]}"
            )
        if r.status_code != 200:
            raise AssertionError(
                f"GET /admin/prices?version={version} -> {r.status_code} {r.text[:500]}"
            )
        body = r.json()
        got = _version_str(body.get("version"))
        if got != version:
            raise AssertionError(f"asked billing for price-book version {version}, got {body}")
        models = _decimal_prices(body.get("models"))
        with self._lock:
            self._versions[version] = models
        return models

    def cost(self, row: dict[str, Any]) -> Decimal | None:
        """The exact cost of a usage row at its own price-book version, or None if the model is
        not priced (or, for the config book, the row is of another version)."""
        version = row.get("price_version")
        models = self.models_at(self.version if version is None else version)
        if models is None:
            return None
        prices = models.get(row.get("requested_model") or "")
        if prices is None:
            return None
        if "input_per_million" not in prices or "output_per_million" not in prices:
            return None
        per_million = prices_by_column(prices)
        total = Decimal(0)
        for column, _ in TOKEN_PRICES:
            tokens = int(row.get(column) or 0)
            if tokens:
                total += tokens * per_million[column]
        return total / Decimal(1_000_000)


def _version_str(version: Any) -> str:
    """`3`, `"3"` and `3.0` name the same version."""
    if isinstance(version, str) and re.fullmatch(r"\s*\d+\s*", version):
        return str(int(version))
    if isinstance(version, (int, Decimal)) and not isinstance(version, bool):
        return str(int(version))
    return str(version)


def load_billing_price_book(stack: Stack) -> PriceBook | None:
    """The price book in force from billing, or None if billing is not configured or reachable."""
    if not stack.billing_url or not stack.admin_key:
        return None
    try:
        r = httpx.get(
            stack.billing_url + "/admin/prices",
            headers={"Authorization": f"Bearer {stack.admin_key}"},
            timeout=10,
        )
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    try:
        body = r.json()
    except ValueError:
        return None
    if not isinstance(body, dict) or "version" not in body:
        return None
    return PriceBook(
        version=_version_str(body["version"]),
        models=_decimal_prices(body.get("models")),
        source="billing",
        billing_url=stack.billing_url,
        admin_key=stack.admin_key,
    )


def load_config_price_book(stack: Stack) -> PriceBook | None:
    """The gateway config's `[prices]` (the price book before billing existed), if any."""
    if stack.gateway_config is None:
        return None
    import tomllib

    try:
        config = tomllib.loads(stack.gateway_config.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    prices = config.get("prices")
    if not isinstance(prices, dict) or not isinstance(prices.get("models"), dict):
        return None
    return PriceBook(
        version=_version_str(prices.get("version", "")),
        models=_decimal_prices(prices["models"]),
    )


def load_price_book(stack: Stack) -> PriceBook | None:
    """Billing's price book (every version, fetched as rows name them), else the config's."""
    return load_billing_price_book(stack) or load_config_price_book(stack)


@pytest.fixture(scope="session")
def price_book(stack: Stack) -> PriceBook | None:
    return load_price_book(stack)


# ---------------------------------------------------------------- billing


def api_error_of(r: httpx.Response) -> dict[str, Any]:
    """The `{"error": {"type", "message"}}` body of a billing error response (asserted)."""
    try:
        body = r.json()
    except ValueError:
        raise AssertionError(
            f"{r.request.method} {r.request.url.path} -> {r.status_code}, not JSON: {r.text[:500]}"
        ) from None
    err = body.get("error") if isinstance(body, dict) else None
    assert isinstance(err, dict), f"no error object in {r.status_code} body: {body}"
    assert isinstance(err.get("type"), str) and err["type"], f"error without a type: {body}"
    assert isinstance(err.get("message"), str) and err["message"], f"no error message: {body}"
    return err


@pytest.fixture(scope="session")
def billing(stack: Stack) -> Iterable[httpx.Client]:
    """An HTTP client on billing (`TOLLGATE_BILLING_URL`) sending the master key."""
    if not stack.billing_url or not stack.admin_key:
        pytest.fail(
            f"TOLLGATE_BILLING_URL and TOLLGATE_ADMIN_KEY must be in {stack.env_file}",
            pytrace=False,
        )
    with httpx.Client(
        base_url=stack.billing_url,
        headers={"Authorization": f"Bearer {stack.admin_key}"},
        timeout=HTTP_TIMEOUT,
    ) as c:
        try:
            c.get("/healthz").raise_for_status()
        except httpx.HTTPError as exc:
            pytest.fail(
                f"billing not healthy at {stack.billing_url}/healthz ({exc!r}); "
                f"env file {stack.env_file}",
                pytrace=False,
            )
        yield c


# ---------------------------------------------------------------- webhook receiver


@dataclass
class Delivery:
    """One POST the receiver got: lower-cased headers, the raw body, when, and what it answered."""

    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float
    status: int

    @property
    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    @property
    def type(self) -> str | None:
        body = self.json
        return body.get("type") if isinstance(body, dict) else None

    @property
    def webhook_id(self) -> str | None:
        return self.headers.get("webhook-id")

    def short(self) -> str:
        return (
            f"[{self.status}] {self.type} id={self.webhook_id} "
            f"{self.body[:300].decode(errors='replace')}"
        )


class WebhookReceiver:
    """A `ThreadingHTTPServer` on 127.0.0.1 that records every POST (any path) and answers
    `status` (an int, or a callable `Delivery -> int`; 200 by default)."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.status: int | Callable[[Delivery], int] = 200
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self._read_body()
                d = Delivery(
                    path=self.path,
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body,
                    received_at=time.time(),
                    status=200,
                )
                status = receiver.status
                try:
                    d.status = int(status(d) if callable(status) else status)
                except Exception:  # noqa: BLE001 - a broken programmed status answers 500
                    d.status = 500
                with receiver._cond:
                    receiver.deliveries.append(d)
                    receiver._cond.notify_all()
                self.send_response(d.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _read_body(self) -> bytes:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="webhook-receiver", daemon=True
        )
        self._thread.start()
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}/hooks"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def mark(self) -> int:
        """A position in the log: `wait_for(..., since=mark)` looks only at later deliveries."""
        with self._cond:
            return len(self.deliveries)

    def received(self, event_type: str | None = None, since: int = 0) -> list[Delivery]:
        """Deliveries (of `event_type`) since `since`, in arrival order, one per `webhook-id`
        (a redelivery of an id is at-least-once delivery, not a new event)."""
        with self._cond:
            seen: set[str] = set()
            out = []
            for d in self.deliveries[since:]:
                if event_type is not None and d.type != event_type:
                    continue
                if d.webhook_id is not None:
                    if d.webhook_id in seen:
                        continue
                    seen.add(d.webhook_id)
                out.append(d)
            return out

    def wait_for(
        self,
        event_type: str,
        predicate: Callable[[Delivery], bool] | None = None,
        timeout: float = 10,
        since: int = 0,
    ) -> Delivery:
        """The first delivery (since `since`) of `event_type` satisfying `predicate`, waiting up to
        `timeout` s; fails with the list of what did arrive."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for d in self.deliveries[since:]:
                    if d.type == event_type and (predicate is None or predicate(d)):
                        return d
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
        raise AssertionError(
            f"no {event_type} webhook{' matching the predicate' if predicate else ''} within "
            f"{timeout} s at {self.url}; received:\n{self.describe()}"
        )

    def describe(self) -> str:
        with self._cond:
            deliveries = list(self.deliveries)
        if not deliveries:
            return "  (nothing)"
        return "\n".join(f"  {i}: {d.short()}" for i, d in enumerate(deliveries))


@pytest.fixture
def webhook_receiver() -> Iterable[WebhookReceiver]:
    """A webhook receiver on 127.0.0.1 (see `WebhookReceiver`); `.url` is its endpoint."""
    r = WebhookReceiver()
    yield r
    r.close()


# ---------------------------------------------------------------- what the demo config offers


@pytest.fixture(scope="session")
def demo_model_ids(client: openai.OpenAI) -> list[str]:
    return [m.id for m in client.models.list()]


_FAILING_NAME = re.compile(r"(?:^|[-_:/@.+])(?:fail|broken)(?:$|[-_:/@.+])")


@pytest.fixture(scope="session")
def failing_model(stack: Stack, demo_model_ids: list[str]) -> str | None:
    """A configured model whose every deployment fails upstream (the demo config's `mock-broken`,
    served by the mock's `mock-fail-503`): `TOLLGATE_FAILING_MODEL`, else the first listed model
    named `...fail...` or `...broken...`, else None."""
    explicit = stack.env.get("TOLLGATE_FAILING_MODEL")
    if explicit:
        return explicit
    for model in demo_model_ids:
        if model not in DEMO_MODELS and _FAILING_NAME.search(model):
            return model
    return None


@pytest.fixture(scope="session")
def mock_headers_forwarded(client: openai.OpenAI) -> bool:
    """Whether the gateway forwards `x-mock-*` request headers to the mock upstream: ask for 23
    output tokens by header and see whether the reply has them (the default is at most 16)."""
    c = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "probe"}],
        extra_headers={"x-mock-output-tokens": "23"},
    )
    return c.usage is not None and c.usage.completion_tokens == 23
