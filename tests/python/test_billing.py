"""A tenant's life against the real local stack, with the official SDKs (the billing issue's
acceptance test).

A prepaid tenant is created through billing's admin API with a key and a webhook endpoint (a
receiver on 127.0.0.1), a new price-book version is put in force, credit is granted, and the
tenant spends it with the `openai` SDK until the gateway refuses (429 `insufficient_quota`; the
`anthropic` SDK gets 400 "credit balance is too low"). The overspend stays within the documented
bound (one request past zero per gateway replica; the local stack has one), the quota webhooks
arrive signed per Standard Webhooks, a top-up lifts the refusal within 2 s, the finalized invoice
equals the metered usage priced at the version in force (each line rounded once, half up, to the
cent) in the API, in ClickHouse and in the `invoice.finalized` webhook, only the tenant's own key
sees it, and a revoked key is refused within seconds.

Figures: each request asks the mock for `LIFE_OUTPUT_TOKENS` output tokens (when the gateway
forwards `x-mock-*` headers) so that invoice lines are cents, not fractions of a cent.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, ROUND_HALF_UP, ROUND_UP, Decimal
from typing import Any, Callable

import anthropic
import httpx
import openai
import pytest
from standardwebhooks.webhooks import Webhook

from conftest import (
    CHAT_MODEL,
    HTTP_TIMEOUT,
    ClickHouse,
    Delivery,
    PriceBook,
    Stack,
    WebhookReceiver,
    api_error_of,
    openai_client,
    sql_string,
    prices_by_column,
)

pytestmark = pytest.mark.timeout(120)

CLAUDE_MODEL = "mock-claude"
MESSAGES = [{"role": "user", "content": "the life of a tenant"}]
# Output tokens per request when the gateway forwards x-mock-* headers (≈ 1.5¢ at $0.60/M; not
# a round number, so line amounts are not whole cents before rounding).
LIFE_OUTPUT_TOKENS = 24_917
# The mock's prompt count is words + 3 per message; an upper bound for the first grant's estimate.
PROMPT_TOKENS_BOUND = 64
# The credit, in requests: after 6 requests 6/7.4 = 81 % is used (quota.warning at 80 %), the 7th
# leaves 0.4 of a request, the 8th is admitted on that and goes 0.6 past zero, the 9th is refused.
CREDIT_IN_REQUESTS = Decimal("7.4")
WARNING_FRACTION = Decimal("0.8")
CENT = Decimal("0.01")
PICO = Decimal("0.000000000001")  # the 12th decimal place: billing's money scale
MONEY_2DP = re.compile(r"^-?\d+\.\d{2}$")
# Invoice token kinds (billing/src/invoice.rs) and their usage columns, in line order.
TOKEN_KINDS = (
    ("input", "input_tokens"),
    ("output", "output_tokens"),
    ("cache_read", "cache_read_tokens"),
    ("cache_write", "cache_write_tokens"),
)


# ---------------------------------------------------------------- helpers


def call(billing: httpx.Client, method: str, path: str, expect: int, **kwargs: Any) -> Any:
    """An admin API call that must answer `expect`; its JSON body (None when empty)."""
    r = billing.request(method, path, **kwargs)
    assert r.status_code == expect, (
        f"{method} {path} {kwargs.get('json', '')} -> {r.status_code}, expected {expect}: "
        f"{r.text[:2000]}"
    )
    return r.json() if r.content else None


def dec(value: Any) -> Decimal:
    assert isinstance(value, str), f"money must be a decimal string, got {value!r}"
    return Decimal(value)


def pico(d: Decimal, rounding: str = ROUND_DOWN) -> Decimal:
    """`d` at billing's 12 decimal places (grant amounts may have no more)."""
    return d.quantize(PICO, rounding=rounding).normalize()


def round_line(d: Decimal) -> Decimal:
    """The invoice rule: once, to the cent, half up (half away from zero for amounts ≥ 0)."""
    return d.quantize(CENT, rounding=ROUND_HALF_UP)


def floor_cent(d: Decimal) -> Decimal:
    return max(d, Decimal(0)).quantize(CENT, rounding=ROUND_DOWN)


def verify(delivery: Delivery, secret: str) -> dict[str, Any]:
    """The delivery verified with the `standardwebhooks` library; its JSON body."""
    try:
        body = Webhook(secret).verify(delivery.body, delivery.headers)
    except Exception as exc:  # noqa: BLE001 - report any verification failure with the delivery
        raise AssertionError(
            f"webhook does not verify with the endpoint's secret ({exc!r}): "
            f"headers {delivery.headers}, body {delivery.body[:500]!r}"
        ) from None
    assert isinstance(body, dict), body
    for name in ("type", "timestamp", "data"):
        assert name in body, f"webhook body lacks {name!r}: {body}"
    return body


def is_refusal(exc: openai.RateLimitError) -> bool:
    body = exc.body if isinstance(exc.body, dict) else {}
    return "insufficient_quota" in (exc.code, exc.type, body.get("code"), body.get("type"))


@dataclass
class Life:
    """What happened to the tenant, for the assertions and for failure messages."""

    stack: Stack
    billing: httpx.Client
    receiver: WebhookReceiver
    tenant: str
    key_id: str = ""
    key: str = ""
    webhook_id: str = ""
    webhook_secret: str = ""
    output_tokens: int | None = None
    grants: list[Decimal] = field(default_factory=list)
    # (request id, cost from x-tollgate-cost) of every request the gateway served.
    served: list[tuple[str, Decimal]] = field(default_factory=list)
    last_served_at: float = 0.0
    _client: openai.OpenAI | None = None

    @property
    def client(self) -> openai.OpenAI:
        if self._client is None:
            self._client = openai_client(self.stack, self.key)
        return self._client

    @property
    def spent(self) -> Decimal:
        return sum((c for _, c in self.served), Decimal(0))

    @property
    def granted(self) -> Decimal:
        return sum(self.grants, Decimal(0))

    def extra_headers(self) -> dict[str, str]:
        if self.output_tokens is None:
            return {}
        return {"x-mock-output-tokens": str(self.output_tokens)}

    def chat(self) -> tuple[str, Decimal]:
        """One chat completion with the tenant's key (raises what the SDK raises)."""
        raw = self.client.chat.completions.with_raw_response.create(
            model=CHAT_MODEL, messages=MESSAGES, max_tokens=16, extra_headers=self.extra_headers()
        )
        completion = raw.parse()
        request_id = raw.headers.get("x-request-id")
        cost = raw.headers.get("x-tollgate-cost")
        assert request_id, f"no x-request-id: {dict(raw.headers)}"
        assert cost is not None and re.fullmatch(r"\d+(\.\d+)?", cost), (
            f"x-tollgate-cost {cost!r}: {dict(raw.headers)}"
        )
        if self.output_tokens is not None:
            assert completion.usage is not None
            assert completion.usage.completion_tokens == self.output_tokens, completion.usage
        self.served.append((request_id, Decimal(cost)))
        self.last_served_at = time.monotonic()
        return request_id, Decimal(cost)

    def grant(self, amount: Decimal) -> str:
        amount = amount.normalize()
        assert amount > 0 and -amount.as_tuple().exponent <= 12, amount
        g = call(
            self.billing,
            "POST",
            f"/admin/tenants/{self.tenant}/credits",
            201,
            json={"amount": f"{amount:f}"},
        )
        assert dec(g["amount"]) == amount, g
        self.grants.append(amount)
        return g["id"]

    def balance(self) -> dict[str, Any]:
        return call(self.billing, "GET", f"/admin/tenants/{self.tenant}/balance", 200)

    def context(self) -> str:
        try:
            balance = self.balance()
        except AssertionError as exc:
            balance = str(exc)
        return (
            f"tenant {self.tenant}: granted {self.granted} in {self.grants}, spent {self.spent} "
            f"in {len(self.served)} requests {[str(c) for _, c in self.served]}\n"
            f"billing balance: {balance}\nwebhooks received:\n{self.receiver.describe()}"
        )

    def wait_balance(self, timeout: float = 5) -> dict[str, Any]:
        """Billing's balance once it has priced every request served (granted − spent)."""
        want = self.granted - self.spent
        deadline = time.monotonic() + timeout
        while True:
            b = self.balance()
            if dec(b["balance"]) == want:
                return b
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"billing's balance is {b['balance']}, not granted − spent = {want}, "
                    f"{timeout} s after the last request (billing prices new usage within 2 s)\n"
                    + self.context()
                )
            time.sleep(0.1)

    def wait_webhook(
        self,
        event_type: str,
        predicate: Callable[[dict[str, Any]], bool] | None = None,
        since: int = 0,
        timeout: float = 10,
    ) -> tuple[Delivery, dict[str, Any]]:
        """A delivery of `event_type` for this tenant whose data satisfies `predicate`; verified."""

        def matches(d: Delivery) -> bool:
            body = d.json
            if not isinstance(body, dict) or not isinstance(body.get("data"), dict):
                return False
            data = body["data"]
            return data.get("tenant_id") == self.tenant and (predicate is None or predicate(data))

        try:
            d = self.receiver.wait_for(event_type, matches, timeout=timeout, since=since)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.context()}") from None
        body = verify(d, self.webhook_secret)
        assert body["type"] == event_type, body
        assert body["data"]["tenant_id"] == self.tenant, body
        return d, body


def same_money(value: Any, want: Decimal) -> bool:
    try:
        return value is not None and Decimal(str(value)) == want
    except ArithmeticError:
        return False


def refused_openai(life: Life) -> openai.RateLimitError:
    with pytest.raises(openai.RateLimitError) as info:
        life.chat()
    exc = info.value
    assert exc.status_code == 429, exc
    assert is_refusal(exc), f"429 but not insufficient_quota: code={exc.code} body={exc.body}"
    return exc


def usage_rows(ch: ClickHouse, tenant: str) -> list[dict[str, Any]]:
    return ch.query(
        "SELECT request_id, requested_model, toString(price_version) AS price_version, "
        "input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, "
        "toString(cost) AS cost "
        f"FROM {ch.database}.usage WHERE tenant_id = {sql_string(tenant)}"
    )


# ---------------------------------------------------------------- the tenant's life


def test_tenant_life(
    stack: Stack,
    billing: httpx.Client,
    webhook_receiver: WebhookReceiver,
    clickhouse: ClickHouse,
    wait_usage: Callable[..., dict[str, Any]],
    price_book: PriceBook | None,
    mock_headers_forwarded: bool,
    client: openai.OpenAI,
) -> None:
    life = Life(stack, billing, webhook_receiver, tenant=f"life_{secrets.token_hex(6)}")
    life.output_tokens = LIFE_OUTPUT_TOKENS if mock_headers_forwarded else None
    try:
        _live(life, clickhouse, wait_usage, price_book, client)
    finally:
        if life._client is not None:
            life._client.close()
        if life.webhook_id:
            # The receiver goes away with this test: stop billing from retrying into it.
            billing.delete(f"/admin/tenants/{life.tenant}/webhooks/{life.webhook_id}")


def _live(
    life: Life,
    ch: ClickHouse,
    wait_usage: Callable[..., dict[str, Any]],
    price_book: PriceBook | None,
    demo_client: openai.OpenAI,
) -> None:
    billing, receiver, tenant = life.billing, life.receiver, life.tenant

    # 1. The tenant, its key, its webhook endpoint.
    t = call(
        billing,
        "POST",
        "/admin/tenants",
        201,
        json={"id": tenant, "name": "A tenant's life", "billing": "prepaid"},
    )
    assert t["id"] == tenant and t["billing"] == "prepaid", t
    k = call(billing, "POST", f"/admin/tenants/{tenant}/keys", 201, json={"name": "life key"})
    assert k["secret"] and k["id"] and k.get("tenant_id", tenant) == tenant, {
        n: v for n, v in k.items() if n != "secret"
    }
    life.key, life.key_id = k["secret"], k["id"]
    w = call(billing, "POST", f"/admin/tenants/{tenant}/webhooks", 201, json={"url": receiver.url})
    assert w["id"] and str(w.get("secret", "")).startswith("whsec_"), w
    life.webhook_id, life.webhook_secret = w["id"], w["secret"]

    # A new price-book version of mock-gpt at the prices in force (other tests' figures stay).
    before = call(billing, "GET", "/admin/prices", 200)
    prices = before["models"].get(CHAT_MODEL)
    assert prices, f"{CHAT_MODEL} is not in billing's price book in force: {before}"
    put = call(
        billing,
        "PUT",
        f"/admin/prices/{CHAT_MODEL}",
        201,
        json={n: v for n, v in prices.items() if n.endswith("_per_million") and v is not None},
    )
    put_at = time.monotonic()
    version = int(put["version"])
    assert version > int(before["version"]), (before, put)
    book = call(billing, "GET", "/admin/prices", 200)
    assert int(book["version"]) == version, f"version {version} is not in force: {book}"
    assert {n: Decimal(v) for n, v in book["models"][CHAT_MODEL].items() if v is not None} == {
        n: Decimal(v) for n, v in prices.items() if v is not None
    }, (book, prices)
    assert call(billing, "GET", "/admin/prices", 200, params={"version": version}) == book
    per_million = prices_by_column({n: Decimal(v) for n, v in prices.items() if v is not None})

    # The key reaches the gateway; with no credit yet, a prepaid tenant is refused.
    deadline = time.monotonic() + 5
    while True:
        try:
            life.chat()
        except openai.AuthenticationError:
            assert time.monotonic() < deadline, "the new key was still unknown after 5 s"
            time.sleep(0.1)
            continue
        except openai.RateLimitError as exc:
            assert is_refusal(exc), f"429 but not insufficient_quota: {exc.body}"
            break
        raise AssertionError(f"a prepaid tenant without credit was served\n{life.context()}")

    # The gateway prices at the new version within 2 s of the PUT.
    time.sleep(max(0.0, put_at + 2.0 - time.monotonic()))
    probe = demo_client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=MESSAGES, max_tokens=4
    )
    probe_row = wait_usage(probe.headers.get("x-request-id"), timeout=20)
    assert int(probe_row["price_version"]) == version, (
        f"a request 2 s after PUT /admin/prices was priced at version "
        f"{probe_row['price_version']}, not {version}: {probe_row}"
    )

    # First grant: enough for about two requests (estimated from the price), then measure one.
    out_tokens = life.output_tokens or 16
    estimate = (
        PROMPT_TOKENS_BOUND * per_million["input_tokens"]
        + out_tokens * per_million["output_tokens"]
    ) / Decimal(1_000_000)
    assert estimate > 0, prices
    first_grant = life.grant(pico(2 * estimate, ROUND_UP))
    life.wait_webhook("credits.granted", lambda d: d.get("grant_id") == first_grant)
    deadline = time.monotonic() + 3
    while True:
        try:
            request_id, cost = life.chat()
            break
        except openai.RateLimitError as exc:
            assert is_refusal(exc), exc.body
            assert time.monotonic() < deadline, (
                "still refused 3 s after a grant (a grant lifts a refusal within 2 s)\n"
                + life.context()
            )
            time.sleep(0.1)
    assert cost > 0, cost
    row = wait_usage(request_id, timeout=20)
    assert Decimal(str(row["cost"])) == cost, (row, cost)
    if price_book is not None:
        assert price_book.cost(row) == cost, (
            f"x-tollgate-cost {cost} != the price book at version {row['price_version']}: "
            f"{price_book.cost(row)} ({row})"
        )

    # Second grant: the credit is CREDIT_IN_REQUESTS requests in all.
    second = pico(CREDIT_IN_REQUESTS * cost - life.granted)
    assert second > 0, (
        f"the first grant ({life.granted}) already exceeds {CREDIT_IN_REQUESTS} requests of "
        f"{cost}: the estimate {estimate} is too far off"
    )
    second_grant = life.grant(second)
    life.wait_webhook("credits.granted", lambda d: d.get("grant_id") == second_grant)
    credit = life.granted
    life.wait_balance()

    # 2. Spend. Paced while under 80 % (billing sees each request, so quota.warning is
    # deterministic), then as fast as a sequential client goes, until refused.
    spending = receiver.mark()
    for _ in range(int(CREDIT_IN_REQUESTS) + 2):
        if life.spent / credit >= WARNING_FRACTION:
            break
        try:
            life.chat()
        except openai.RateLimitError as exc:
            raise AssertionError(
                f"refused ({exc.body}) with {credit - life.spent} of {credit} left\n"
                + life.context()
            ) from None
        b = life.wait_balance()
        want = "warning" if life.spent / credit >= WARNING_FRACTION else "ok"
        assert b["state"] == want, (
            f"billing's state is {b['state']!r} at {life.spent / credit:.1%} used, not {want!r}\n"
            + life.context()
        )
    refusal: openai.RateLimitError | None = None
    for _ in range(50):
        try:
            life.chat()
        except openai.RateLimitError as exc:
            assert is_refusal(exc), f"429 but not insufficient_quota: {exc.body}"
            refusal = exc
            break
    assert refusal is not None, "50 requests past the warning and never refused\n" + life.context()
    largest = max(c for _, c in life.served)
    overspend = life.spent - credit
    assert overspend < largest, (
        f"overspend {overspend} is not below one request ({largest}): more than one request "
        f"past zero on one gateway replica\n" + life.context()
    )
    assert overspend >= 0, (
        f"refused with {-overspend} of credit left (spent {life.spent} of {credit})\n"
        + life.context()
    )
    refused_openai(life)  # not a fluke
    with anthropic.Anthropic(
        base_url=life.stack.gateway_url, api_key=life.key, max_retries=0, timeout=HTTP_TIMEOUT
    ) as aclient:
        with pytest.raises(anthropic.BadRequestError) as info:
            aclient.messages.create(model=CLAUDE_MODEL, max_tokens=16, messages=MESSAGES)
    aerr = info.value
    assert aerr.status_code == 400, aerr
    abody = aerr.body if isinstance(aerr.body, dict) else {}
    assert (abody.get("error") or {}).get("type") == "invalid_request_error", abody
    assert "credit balance is too low" in str(aerr).lower(), aerr

    # 3. Billing agrees, and says so by webhook: quota.warning, then quota.exhausted.
    seen = life.wait_balance()
    tenant_view = httpx.get(
        life.stack.billing_url + "/v1/billing/balance",
        headers={"Authorization": f"Bearer {life.key}"},
        timeout=HTTP_TIMEOUT,
    )
    assert tenant_view.status_code == 200, tenant_view.text
    assert dec(tenant_view.json()["balance"]) == credit - life.spent, (tenant_view.json(), seen)
    assert seen["state"] == "exhausted", f"billing's state is {seen['state']!r}\n{life.context()}"
    exhausted, body = life.wait_webhook(
        "quota.exhausted", lambda d: same_money(d.get("limit"), credit), since=spending
    )
    assert body["data"].get("state", "exhausted") == "exhausted", body
    warning, wbody = life.wait_webhook(
        "quota.warning", lambda d: same_money(d.get("limit"), credit), since=spending, timeout=1
    )
    assert warning.received_at <= exhausted.received_at, (
        "quota.exhausted arrived before quota.warning\n" + life.context()
    )
    assert same_money(wbody["data"].get("threshold"), WARNING_FRACTION), wbody

    # 4. Top up: requests flow again within 2 s, and quota.restored arrives.
    topup = max(CENT, (4 * largest).quantize(CENT, rounding=ROUND_UP))
    topping = receiver.mark()
    topup_grant = life.grant(topup)
    granted_at = time.monotonic()
    while True:
        try:
            life.chat()
            break
        except openai.RateLimitError as exc:
            assert is_refusal(exc), exc.body
            assert time.monotonic() - granted_at < 3, (
                "still refused 3 s after the top-up (a grant lifts a refusal within 2 s)\n"
                + life.context()
            )
            time.sleep(0.05)
    lifted_after = time.monotonic() - granted_at
    life.chat()
    life.wait_webhook("credits.granted", lambda d: d.get("grant_id") == topup_grant, since=topping)
    life.wait_webhook(
        "quota.restored", lambda d: same_money(d.get("limit"), life.granted), since=topping
    )
    assert life.wait_balance()["state"] in ("ok", "warning"), life.context()

    # 5. Finalize: the invoice is the metered usage priced at the version in force.
    deadline = time.monotonic() + 20
    while True:
        rows = usage_rows(ch, tenant)
        if len(rows) >= len(life.served) or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    served = dict(life.served)
    assert sorted(r["request_id"] for r in rows) == sorted(served), (
        f"tollgate.usage has {len(rows)} rows for {tenant}, the gateway served "
        f"{len(served)} requests: {sorted(r['request_id'] for r in rows)} vs {sorted(served)}"
    )
    for r in rows:
        assert Decimal(r["cost"]) == served[r["request_id"]], (r, served[r["request_id"]])
        assert int(r["price_version"]) == version, (
            f"usage priced at version {r['price_version']}, not {version} in force: {r}"
        )
    life.wait_balance()
    # The period ends at finalize's second, exclusive: let the last request's second pass.
    time.sleep(max(0.0, life.last_served_at + 1.1 - time.monotonic()))
    invoicing = receiver.mark()
    inv = call(billing, "POST", f"/admin/tenants/{tenant}/invoices/finalize", 200)
    assert inv["tenant_id"] == tenant and inv["status"] == "finalized", inv
    assert inv["currency"] == "USD", inv

    grouped = ch.query(
        "SELECT requested_model, toString(price_version) AS price_version, "
        "toString(sum(input_tokens)) AS input_tokens, "
        "toString(sum(output_tokens)) AS output_tokens, "
        "toString(sum(cache_read_tokens)) AS cache_read_tokens, "
        "toString(sum(cache_write_tokens)) AS cache_write_tokens, count() AS requests "
        f"FROM {ch.database}.usage WHERE tenant_id = {sql_string(tenant)} "
        "GROUP BY requested_model, price_version"
    )
    assert price_book is not None, "no price book from billing"
    expected: list[tuple[str, int, str, int, Decimal, Decimal]] = []
    for g in grouped:
        models = price_book.models_at(g["price_version"])
        assert models is not None and g["requested_model"] in models, (g, models)
        per_token = {
            column: p / Decimal(1_000_000)
            for column, p in prices_by_column(models[g["requested_model"]]).items()
        }
        for kind, column in TOKEN_KINDS:
            quantity = int(g[column])
            if quantity:
                unit = per_token[column]
                expected.append(
                    (g["requested_model"], int(g["price_version"]), kind, quantity, unit,
                     round_line(quantity * unit))
                )
    kind_order = {kind: i for i, (kind, _) in enumerate(TOKEN_KINDS)}
    expected.sort(key=lambda e: (e[0], kind_order[e[2]], e[1], e[4]))
    lines = inv["lines"]
    for line in lines:
        assert MONEY_2DP.match(line["amount"]), f"line amount not at 2 places: {line}"
    got = [
        (ln["model"], int(ln["price_version"]), ln["token_kind"], int(ln["quantity"]),
         dec(ln["unit_price"]), dec(ln["amount"]))
        for ln in lines
    ]
    assert got == expected, (
        f"invoice lines differ from the metered usage priced at version {version}:\n"
        f"  invoice:  {got}\n  expected: {expected}\n  usage: {grouped}"
    )
    assert [int(ln["line_no"]) for ln in lines] == list(range(1, len(lines) + 1)), lines
    subtotal = sum((e[5] for e in expected), Decimal(0))
    credits_applied = min(subtotal, floor_cent(life.granted))
    for name, want in (
        ("subtotal", subtotal),
        ("credits_applied", credits_applied),
        ("total", subtotal - credits_applied),
    ):
        assert MONEY_2DP.match(inv[name]), f"{name} not at 2 places: {inv}"
        assert dec(inv[name]) == want, (
            f"invoice {name} {inv[name]} != {want} (lines {expected}, credits {life.granted})"
        )

    # Finance's SQL says the same.
    fin = ch.query(
        "SELECT tenant_id, toString(status) AS status, toString(subtotal) AS subtotal, "
        "toString(credits_applied) AS credits_applied, toString(total) AS total "
        f"FROM {ch.database}.invoices WHERE invoice_id = {sql_string(inv['id'])}"
    )
    assert len(fin) == 1, f"invoices rows for {inv['id']}: {fin}"
    assert fin[0]["tenant_id"] == tenant and fin[0]["status"] == "finalized", fin
    for name in ("subtotal", "credits_applied", "total"):
        assert Decimal(fin[0][name]) == dec(inv[name]), (name, fin, inv)
    fin_lines = ch.query(
        "SELECT toString(sum(amount)) AS amount, count() AS n "
        f"FROM {ch.database}.invoice_lines WHERE invoice_id = {sql_string(inv['id'])}"
    )
    assert Decimal(fin_lines[0]["amount"]) == dec(inv["subtotal"]), (fin_lines, inv)
    assert int(fin_lines[0]["n"]) == len(lines), (fin_lines, lines)
    ch_lines = ch.query(
        "SELECT line_no, model, token_kind, toString(quantity) AS quantity, "
        "toString(unit_price) AS unit_price, toString(amount) AS amount, "
        "toString(price_version) AS price_version "
        f"FROM {ch.database}.invoice_lines WHERE invoice_id = {sql_string(inv['id'])} "
        "ORDER BY line_no"
    )
    assert [
        (ln["model"], int(ln["price_version"]), ln["token_kind"], int(ln["quantity"]),
         Decimal(ln["unit_price"]), Decimal(ln["amount"]))
        for ln in ch_lines
    ] == got, (ch_lines, lines)

    _, fbody = life.wait_webhook(
        "invoice.finalized", lambda d: d.get("invoice_id") == inv["id"], since=invoicing
    )
    for name in ("subtotal", "credits_applied", "total"):
        assert same_money(fbody["data"].get(name), dec(inv[name])), (fbody, inv)

    # The tenant's key sees the invoice; another tenant's key never does.
    mine = httpx.get(
        life.stack.billing_url + "/v1/billing/invoices",
        headers={"Authorization": f"Bearer {life.key}"},
        timeout=HTTP_TIMEOUT,
    )
    assert mine.status_code == 200, mine.text
    listed = [i for i in mine.json()["data"] if i["id"] == inv["id"]]
    assert len(listed) == 1 and listed[0]["status"] == "finalized", mine.json()
    assert all(i["tenant_id"] == tenant for i in mine.json()["data"]), mine.json()
    for name in ("subtotal", "credits_applied", "total"):
        assert listed[0][name] == inv[name], (listed, inv)
    theirs = httpx.get(
        life.stack.billing_url + "/v1/billing/invoices",
        headers={"Authorization": f"Bearer {life.stack.demo_key}"},
        timeout=HTTP_TIMEOUT,
    )
    assert theirs.status_code == 200, theirs.text
    leaked = [
        i for i in theirs.json()["data"] if i.get("id") == inv["id"] or i.get("tenant_id") == tenant
    ]
    assert not leaked, f"another tenant's key sees {tenant}'s invoices: {leaked}"

    # The tenant's usage API counts what the gateway served.
    usage = httpx.get(
        life.stack.billing_url + "/v1/billing/usage",
        params={"group_by": "model"},
        headers={"Authorization": f"Bearer {life.key}"},
        timeout=HTTP_TIMEOUT,
    )
    assert usage.status_code == 200, usage.text
    by_model = {u["model"]: u for u in usage.json()["data"]}
    assert set(by_model) == {CHAT_MODEL}, usage.json()
    assert int(by_model[CHAT_MODEL]["requests"]) == len(life.served), usage.json()
    assert dec(by_model[CHAT_MODEL]["cost"]) == life.spent, (usage.json(), life.spent)

    # 6. Revoke the key: the gateway refuses it within seconds.
    assert call(billing, "DELETE", f"/admin/keys/{life.key_id}", 204) is None
    revoked_at = time.monotonic()
    assert call(billing, "GET", f"/admin/keys/{life.key_id}", 200)["revoked"] is True
    while True:
        try:
            life.chat()
        except openai.AuthenticationError as exc:
            assert exc.status_code == 401, exc
            break
        except openai.RateLimitError as exc:
            assert is_refusal(exc), exc.body
        assert time.monotonic() - revoked_at < 5, (
            "the revoked key was still accepted 5 s after DELETE /admin/keys\n" + life.context()
        )
        time.sleep(0.1)
    after_revoke = httpx.get(
        life.stack.billing_url + "/v1/billing/balance",
        headers={"Authorization": f"Bearer {life.key}"},
        timeout=HTTP_TIMEOUT,
    )
    assert after_revoke.status_code == 401, after_revoke.text
    api_error_of(after_revoke)
    print(
        f"{tenant}: {len(life.served)} requests of ~{largest} USD, credit {credit} overspent by "
        f"{overspend}; top-up lifted the refusal in {lifted_after:.2f} s; invoice {inv['id']} "
        f"subtotal {inv['subtotal']} credits {inv['credits_applied']} total {inv['total']}"
    )


# ---------------------------------------------------------------- errors and the document


def test_admin_errors_and_openapi(stack: Stack, billing: httpx.Client) -> None:
    base = stack.billing_url
    tenant = f"err_{secrets.token_hex(6)}"

    def expect(r: httpx.Response, status: int) -> dict[str, Any]:
        assert r.status_code == status, (
            f"{r.request.method} {r.request.url.path} -> {r.status_code}, expected {status}: "
            f"{r.text[:1000]}"
        )
        return api_error_of(r)

    new = {"id": tenant, "billing": "prepaid"}
    expect(httpx.post(base + "/admin/tenants", json=new, timeout=HTTP_TIMEOUT), 401)
    expect(
        httpx.post(
            base + "/admin/tenants",
            json=new,
            headers={"Authorization": "Bearer not-the-admin-key"},
            timeout=HTTP_TIMEOUT,
        ),
        401,
    )
    bad_id = {"id": "no spaces, please", "billing": "prepaid"}
    expect(billing.post("/admin/tenants", json=bad_id), 400)
    expect(billing.post("/admin/tenants", json={"id": tenant, "billing": "free"}), 400)
    expect(
        billing.post(
            "/admin/tenants", content=b"{not json", headers={"content-type": "application/json"}
        ),
        400,
    )
    expect(billing.get(f"/admin/tenants/nope_{secrets.token_hex(6)}"), 404)
    unknown = f"nope_{secrets.token_hex(6)}"
    expect(billing.post(f"/admin/tenants/{unknown}/credits", json={"amount": "1"}), 404)
    assert billing.post("/admin/tenants", json=new).status_code == 201
    expect(billing.post("/admin/tenants", json=new), 409)
    expect(billing.post(f"/admin/tenants/{tenant}/credits", json={"amount": "-1"}), 400)
    expect(httpx.get(base + "/v1/billing/balance", timeout=HTTP_TIMEOUT), 401)
    expect(
        httpx.get(
            base + "/v1/billing/balance",
            headers={"Authorization": "Bearer sk-tg-not-a-key"},
            timeout=HTTP_TIMEOUT,
        ),
        401,
    )

    r = httpx.get(base + "/openapi.json", timeout=HTTP_TIMEOUT)
    assert r.status_code == 200, r.text[:500]
    doc = r.json()
    assert isinstance(doc, dict) and str(doc.get("openapi", "")).startswith("3."), (
        f"/openapi.json is not an OpenAPI 3.x document: {str(doc)[:500]}"
    )
    assert isinstance(doc.get("paths"), dict) and "/admin/tenants" in doc["paths"], list(
        doc.get("paths") or {}
    )
