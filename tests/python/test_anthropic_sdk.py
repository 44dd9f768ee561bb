"""The gateway's Anthropic surface and cross-format translation through the official SDKs (issue 6).

Anthropic-format clients use `anthropic.Anthropic(base_url=$TOLLGATE_GATEWAY_URL, api_key=...)`;
OpenAI-format clients `openai.OpenAI(base_url=$TOLLGATE_GATEWAY_URL/v1, ...)`. Clients never retry
(`max_retries=0`). The demo models are `mock-claude` (an Anthropic-format upstream) and `mock-gpt`
(an OpenAI-format upstream, so Anthropic clients reach it through the translator), and
`mock-embed`. `x-mock-*` request headers are forwarded to the mock upstream, which makes replies
deterministic (see tests/src/mock.rs): prompt tokens are the whitespace-separated words of all text
plus 3 per message (Anthropic's top-level `system` counts its words but is no message), and the
reply has at most 16 one-token words.

Usage is checked against the `tollgate.usage` row of the request's id (`request-id` ==
`x-request-id`).
"""

from __future__ import annotations

import base64
import itertools
import json
import math
import re
import socket
import struct
import time
from decimal import Decimal
from typing import Any, Callable, Iterable

import anthropic
import httpx
import httpx2
import openai
import pytest

from conftest import HTTP_TIMEOUT, ClickHouse, PriceBook, Stack, sql_string

# Chat models, by the format of the upstream that serves them.
CLAUDE = "mock-claude"  # Anthropic-format upstream
GPT = "mock-gpt"  # OpenAI-format upstream (translated for Anthropic clients)
EMBED = "mock-embed"
CHAT_MODELS = (CLAUDE, GPT)
PROVIDER = {CLAUDE: "anthropic", GPT: "openai", EMBED: "openai"}
TOOL = "get_weather"
WEATHER_TOOL = {
    "name": TOOL,
    "description": "The current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"text": {"type": "string", "description": "the city"}},
        "required": ["text"],
    },
}
OPENAI_WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": TOOL,
        "description": "The current weather in a city",
        "parameters": WEATHER_TOOL["input_schema"],
    },
}
USER = "Say something about toll gates in a few words."
MESSAGES = [{"role": "user", "content": USER}]
# Most events / chunks any single stream in this suite may yield before the test gives up on it.
MAX_EVENTS = 5000
STREAM_EVENT_TYPES = (
    "message_start",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
)
DECIMAL_STRING = re.compile(r"^[0-9]+(\.[0-9]+)?$")


# ---------------------------------------------------------------- clients and fixtures


def anthropic_client(stack: Stack, **kwargs: Any) -> anthropic.Anthropic:
    kwargs.setdefault("max_retries", 0)
    kwargs.setdefault("timeout", HTTP_TIMEOUT)
    if "api_key" not in kwargs and "auth_token" not in kwargs:
        kwargs["api_key"] = stack.demo_key
    return anthropic.Anthropic(base_url=stack.gateway_url, **kwargs)


@pytest.fixture(scope="module")
def aclient(stack: Stack) -> Iterable[anthropic.Anthropic]:
    c = anthropic_client(stack)
    yield c
    c.close()


@pytest.fixture
def aclient_for(stack: Stack) -> Iterable[Callable[..., anthropic.Anthropic]]:
    """`aclient_for(key, **kwargs)`: an Anthropic client with that key (closed after the test)."""
    made: list[anthropic.Anthropic] = []

    def build(api_key: str, **kwargs: Any) -> anthropic.Anthropic:
        c = anthropic_client(stack, api_key=api_key, **kwargs)
        made.append(c)
        return c

    yield build
    for c in made:
        c.close()


# The price book in the gateway's config (set once per module by `_load_prices`).
PRICES: PriceBook | None = None


@pytest.fixture(scope="module", autouse=True)
def _load_prices(price_book: PriceBook | None) -> None:
    global PRICES
    PRICES = price_book


@pytest.fixture(scope="module", autouse=True)
def _mock_headers_reach_both_upstreams(aclient: anthropic.Anthropic) -> None:
    """Most tests here steer the mock by `x-mock-*` headers; make sure both demo chat
    deployments forward them (ask for 23 output tokens; the default is at most 16)."""
    for model in CHAT_MODELS:
        m = aclient.messages.create(
            model=model,
            max_tokens=64,
            messages=MESSAGES,
            extra_headers={"x-mock-output-tokens": "23"},
        )
        assert m.usage.output_tokens == 23, (
            f"the gateway does not forward x-mock-* headers to {model}'s upstream: {m.usage}"
        )


# ---------------------------------------------------------------- helpers


def words(text: str) -> int:
    return len(text.split())


def prompt_rule(messages: list[dict[str, Any]], system_words: int = 0) -> int:
    """The mock's prompt count for text-only messages: words + 3 per message (+ system words)."""

    def text_of(content: Any) -> str:
        if isinstance(content, str):
            return content
        return " ".join(b.get("text", "") for b in content if isinstance(b, dict))

    return max(1, sum(words(text_of(m["content"])) + 3 for m in messages) + system_words)


def system_words(system: Any) -> int:
    if isinstance(system, str):
        return words(system)
    return sum(words(b["text"]) for b in system)


def request_id_of(headers: Any) -> str:
    """The request id of an Anthropic-route response: `request-id` and `x-request-id`, equal."""
    rid = headers.get("x-request-id")
    assert rid, f"response without x-request-id: {dict(headers)}"
    assert headers.get("request-id") == rid, (
        f"request-id {headers.get('request-id')!r} != x-request-id {rid!r}: {dict(headers)}"
    )
    return rid


def openai_request_id_of(headers: Any) -> str:
    rid = headers.get("x-request-id")
    assert rid, f"response without x-request-id: {dict(headers)}"
    return rid


def cost_of(headers: Any) -> Decimal:
    """`x-tollgate-cost` of a plain response that reached an upstream (with its siblings)."""
    assert headers.get("x-tollgate-deployment"), f"no x-tollgate-deployment: {dict(headers)}"
    retries = headers.get("x-tollgate-retries")
    assert retries is not None and retries.isdigit(), f"x-tollgate-retries {retries!r}"
    cost = headers.get("x-tollgate-cost")
    assert cost is not None and DECIMAL_STRING.match(cost), f"x-tollgate-cost {cost!r}"
    return Decimal(cost)


def check_price(row: dict[str, Any]) -> None:
    expected = PRICES.cost(row) if PRICES is not None else None
    if expected is not None:
        assert row["cost"] == expected, f"cost {row['cost']} != price book {expected}: {row}"


def check_facts(row: dict[str, Any], model: str, *, streamed: bool, api: str) -> None:
    assert row["estimated"] == 0, row
    assert row["streamed"] == (1 if streamed else 0), row
    if "requested_model" in row:
        assert row["requested_model"] == model, row
    if "provider" in row:
        assert row["provider"] == PROVIDER[model], row
    if "api" in row:
        assert row["api"] == api, row
    check_price(row)


def check_anthropic_row(
    row: dict[str, Any], usage: Any, model: str, *, streamed: bool
) -> None:
    """The usage row holds exactly the tokens the Anthropic SDK reported."""
    assert row["input_tokens"] == usage.input_tokens, (row, usage)
    assert row["cache_read_tokens"] == (usage.cache_read_input_tokens or 0), (row, usage)
    assert row["cache_write_tokens"] == (usage.cache_creation_input_tokens or 0), (row, usage)
    assert row["output_tokens"] == usage.output_tokens, (row, usage)
    check_facts(row, model, streamed=streamed, api="anthropic_messages")


def check_openai_row(
    row: dict[str, Any], usage: Any, model: str, *, streamed: bool, api: str = "openai_chat"
) -> None:
    """The usage row holds exactly the tokens the OpenAI SDK reported."""
    prompt_in_row = row["input_tokens"] + row["cache_read_tokens"] + row["cache_write_tokens"]
    assert prompt_in_row == usage.prompt_tokens, (row, usage)
    details = getattr(usage, "prompt_tokens_details", None)
    cached = (details.cached_tokens or 0) if details is not None else 0
    assert row["cache_read_tokens"] == cached, (row, usage)
    if api == "openai_embeddings":
        assert row["output_tokens"] == 0, row
    else:
        assert row["output_tokens"] == usage.completion_tokens, (row, usage)
    check_facts(row, model, streamed=streamed, api=api)


def check_message(message: Any, model: str) -> None:
    """A plain text answer (Anthropic shape)."""
    assert message.type == "message" and message.role == "assistant", message
    assert message.id, message
    assert message.content and message.content[0].type == "text", message
    assert message.content[0].text.strip(), message
    assert message.stop_reason == "end_turn", message
    assert message.usage.input_tokens > 0, message.usage
    assert 0 < message.usage.output_tokens <= 16, message.usage


def check_anthropic_error(exc: anthropic.APIStatusError, status: int, error_type: str) -> str:
    """Anthropic's error shape: the status, request ids, `{"type": "error", "error": {"type",
    "message"}}`; returns the message."""
    resp = exc.response
    assert exc.status_code == status, f"expected {status}, got {exc.status_code}: {resp.text[:500]}"
    rid = request_id_of(resp.headers)
    assert exc.request_id == rid
    ctype = resp.headers.get("content-type", "")
    assert ctype.startswith("application/json"), f"{status} error with content-type {ctype!r}"
    body = exc.body
    assert isinstance(body, dict) and body.get("type") == "error", f"not an Anthropic error: {body}"
    err = body.get("error")
    assert isinstance(err, dict), body
    assert err.get("type") == error_type, f"error.type is not {error_type!r}: {body}"
    assert isinstance(err.get("message"), str) and err["message"], body
    return err["message"]


def check_raw_anthropic_error(resp: httpx.Response, status: int, error_type: str) -> None:
    assert resp.status_code == status, (
        f"expected {status}, got {resp.status_code}: {resp.text[:500]}"
    )
    request_id_of(resp.headers)
    body = resp.json()
    assert body.get("type") == "error", body
    assert body["error"]["type"] == error_type, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body


def bounded(iterable: Iterable[Any], limit: int = MAX_EVENTS) -> list[Any]:
    items = list(itertools.islice(iterable, limit + 1))
    assert len(items) <= limit, "stream did not end"
    return items


def stream_message(
    client: anthropic.Anthropic, **kwargs: Any
) -> tuple[str, list[Any], Any]:
    """`client.messages.stream(**kwargs)`: (request id, the events, the final message)."""
    with client.messages.stream(**kwargs) as stream:
        rid = request_id_of(stream.response.headers)
        ctype = stream.response.headers.get("content-type", "")
        assert ctype.startswith("text/event-stream"), ctype
        events = bounded(stream)
        final = stream.get_final_message()
    return rid, events, final


def streamed_input_tokens(start_usage: Any, delta_usage: Any) -> int:
    """Input tokens of a raw stream: `message_delta`'s when it has them (a translated stream
    only learns them at the end; the SDK's accumulator prefers them), else `message_start`'s."""
    late = getattr(delta_usage, "input_tokens", None)
    return late if late is not None else start_usage.input_tokens


def check_event_sequence(events: list[Any]) -> list[str]:
    """The raw Anthropic event types of an SDK stream, in Anthropic's order."""
    types = [e.type for e in events if e.type in STREAM_EVENT_TYPES]
    for t in STREAM_EVENT_TYPES:
        assert t in types, f"no {t} in {types}"
    assert types[0] == "message_start" and types.count("message_start") == 1, types
    assert types[-1] == "message_stop" and types.count("message_stop") == 1, types
    assert types[-2] == "message_delta" and types.count("message_delta") == 1, types
    first_start = types.index("content_block_start")
    assert types.index("content_block_delta") > first_start, types
    last_stop = len(types) - 1 - types[::-1].index("content_block_stop")
    last_delta = len(types) - 1 - types[::-1].index("content_block_delta")
    assert last_stop > last_delta, types
    assert types.count("content_block_start") == types.count("content_block_stop"), types
    return types


def wait_rows(
    ch: ClickHouse, sql: str, timeout: float = 15, what: str = "rows"
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = ch.query(sql)
        if rows:
            return rows
        if time.monotonic() >= deadline:
            raise AssertionError(f"no {what} within {timeout} s: {sql}")
        time.sleep(0.2)


def b64_floats(data: str) -> list[float]:
    raw = base64.b64decode(data)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


# ---------------------------------------------------------------- messages, plain


@pytest.mark.parametrize("model", CHAT_MODELS)
def test_messages_plain(
    aclient: anthropic.Anthropic, wait_usage, model: str
) -> None:
    raw = aclient.messages.with_raw_response.create(model=model, max_tokens=64, messages=MESSAGES)
    rid = request_id_of(raw.headers)
    cost = cost_of(raw.headers)
    assert raw.headers.get("x-tollgate-retries") == "0"
    message = raw.parse()
    check_message(message, model)
    assert message.usage.input_tokens == prompt_rule(MESSAGES), message.usage
    assert (message.usage.cache_read_input_tokens or 0) == 0, message.usage
    assert (message.usage.cache_creation_input_tokens or 0) == 0, message.usage

    row = wait_usage(rid)
    check_anthropic_row(row, message.usage, model, streamed=False)
    assert row["tenant_id"] == "demo", row
    assert row["cost"] == cost, f"x-tollgate-cost {cost} != usage.cost {row['cost']}"
    assert cost > 0, f"the demo price book prices {model}"
    if "deployment" in row:
        assert row["deployment"] == raw.headers.get("x-tollgate-deployment"), row


@pytest.mark.parametrize("model", CHAT_MODELS)
def test_messages_max_tokens_and_token_kinds(
    aclient: anthropic.Anthropic, wait_usage, model: str
) -> None:
    """max_tokens reaches the upstream (translated too); cache-read tokens keep their kind."""
    message = aclient.messages.create(model=model, max_tokens=3, messages=MESSAGES)
    assert message.usage.output_tokens == 3, message.usage
    assert message.stop_reason in ("end_turn", "max_tokens"), message

    raw = aclient.messages.with_raw_response.create(
        model=model,
        max_tokens=64,
        messages=MESSAGES,
        extra_headers={"x-mock-cached-tokens": "7", "x-mock-output-tokens": "5"},
    )
    message = raw.parse()
    usage = message.usage
    assert usage.cache_read_input_tokens == 7, usage
    assert usage.input_tokens == prompt_rule(MESSAGES), usage  # cache reads are not input
    assert usage.output_tokens == 5, usage
    row = wait_usage(request_id_of(raw.headers))
    check_anthropic_row(row, usage, model, streamed=False)
    assert row["cache_read_tokens"] == 7, row
    assert row["cost"] == cost_of(raw.headers), row


@pytest.mark.parametrize("how", ["api_key", "auth_token", "x-api-key"])
def test_auth_styles(stack: Stack, how: str) -> None:
    """`api_key=` and `auth_token=` (both Bearer in current SDKs) and a bare `x-api-key` header
    (older SDKs, curl); the header the gateway saw is checked on the wire."""
    sent: list[httpx2.Request] = []
    http_client = anthropic.DefaultHttpxClient(event_hooks={"request": [sent.append]})
    kwargs: dict[str, Any] = {"http_client": http_client}
    extra: dict[str, Any] = {}
    if how == "api_key":
        kwargs["api_key"] = stack.demo_key
    elif how == "auth_token":
        kwargs["auth_token"] = stack.demo_key
    else:
        kwargs["api_key"] = "placeholder-not-sent"
        extra = {"Authorization": anthropic.Omit(), "x-api-key": stack.demo_key}
    with anthropic_client(stack, **kwargs) as c:
        message = c.messages.create(
            model=CLAUDE, max_tokens=8, messages=MESSAGES, extra_headers=extra
        )
        assert message.content[0].text.strip()
        count = c.messages.count_tokens(model=CLAUDE, messages=MESSAGES, extra_headers=extra)
        assert count.input_tokens > 0
    assert sent, "no request seen"
    for req in sent:
        if how == "x-api-key":
            assert "authorization" not in req.headers, dict(req.headers)
            assert req.headers.get("x-api-key") == stack.demo_key
        else:
            assert req.headers.get("authorization") == f"Bearer {stack.demo_key}"


@pytest.mark.parametrize("version", [None, "2023-06-01", "2099-12-31"])
def test_any_anthropic_version(http: httpx.Client, demo_key: str, version: str | None) -> None:
    headers = {"x-api-key": demo_key}
    if version is not None:
        headers["anthropic-version"] = version
    r = http.post(
        "/v1/messages",
        json={"model": CLAUDE, "max_tokens": 8, "messages": MESSAGES},
        headers=headers,
    )
    assert r.status_code == 200, r.text
    request_id_of(r.headers)
    body = r.json()
    assert body["type"] == "message" and body["content"][0]["type"] == "text", body


# ---------------------------------------------------------------- messages, streamed


@pytest.mark.parametrize("model", CHAT_MODELS)
def test_messages_stream(aclient: anthropic.Anthropic, wait_usage, model: str) -> None:
    rid, events, final = stream_message(aclient, model=model, max_tokens=64, messages=MESSAGES)
    check_event_sequence(events)
    text_deltas = "".join(
        e.delta.text
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "text_delta"
    )
    assert text_deltas.strip(), "no text_delta in the stream"
    check_message(final, model)
    assert final.content[0].text == text_deltas
    # The mock is deterministic: the stream's usage is the plain reply's.
    assert final.usage.input_tokens == prompt_rule(MESSAGES), final.usage
    assert 0 < final.usage.output_tokens <= 16
    row = wait_usage(rid)
    check_anthropic_row(row, final.usage, model, streamed=True)
    assert row["cost"] > 0, row


@pytest.mark.parametrize("model", CHAT_MODELS)
def test_messages_stream_token_kinds(aclient: anthropic.Anthropic, wait_usage, model: str) -> None:
    rid, events, final = stream_message(
        aclient,
        model=model,
        max_tokens=64,
        messages=MESSAGES,
        extra_headers={"x-mock-cached-tokens": "11", "x-mock-output-tokens": "9"},
    )
    check_event_sequence(events)
    usage = final.usage
    assert usage.cache_read_input_tokens == 11, usage
    assert usage.input_tokens == prompt_rule(MESSAGES), usage
    assert usage.output_tokens == 9, usage
    row = wait_usage(rid)
    check_anthropic_row(row, usage, model, streamed=True)


@pytest.mark.parametrize("model", CHAT_MODELS)
def test_messages_create_stream_true(aclient: anthropic.Anthropic, wait_usage, model: str) -> None:
    """The lower-level `messages.create(stream=True)`: raw events, usage from message_start and
    message_delta."""
    raw = aclient.messages.with_raw_response.create(
        model=model, max_tokens=64, messages=MESSAGES, stream=True
    )
    rid = request_id_of(raw.headers)
    events = bounded(raw.parse())
    check_event_sequence(events)
    start = events[0]
    delta = [e for e in events if e.type == "message_delta"][0]
    assert delta.delta.stop_reason == "end_turn", delta
    input_tokens = streamed_input_tokens(start.message.usage, delta.usage)
    assert input_tokens == prompt_rule(MESSAGES), (start.message.usage, delta.usage)
    row = wait_usage(rid)
    assert row["input_tokens"] == input_tokens, row
    assert row["output_tokens"] == delta.usage.output_tokens, (row, delta.usage)
    assert row["streamed"] == 1 and row["estimated"] == 0, row


@pytest.mark.parametrize("model", CHAT_MODELS)
def test_messages_stream_wire_format(http: httpx.Client, demo_key: str, model: str) -> None:
    """Anthropic's SSE framing: every event is an `event: <type>` line and a `data: <json>` line
    whose `type` is the same; pings only between message_start and message_stop."""
    body = {"model": model, "max_tokens": 64, "messages": MESSAGES, "stream": True}
    with http.stream(
        "POST", "/v1/messages", json=body, headers={"authorization": f"Bearer {demo_key}"}
    ) as r:
        assert r.status_code == 200, r.read()
        assert r.headers.get("content-type", "").startswith("text/event-stream")
        request_id_of(r.headers)
        lines = bounded(r.iter_lines(), 4 * MAX_EVENTS)
    events: list[tuple[str, dict[str, Any]]] = []
    pending: str | None = None
    for line in lines:
        if not line:
            continue
        if line.startswith("event:"):
            assert pending is None, f"two event: lines in a row ({pending!r}, {line!r})"
            pending = line[len("event:") :].strip()
        elif line.startswith("data:"):
            assert pending is not None, f"data: without event: {line!r}"
            data = json.loads(line[len("data:") :])
            assert data.get("type") == pending, f"event {pending!r} carries {data}"
            events.append((pending, data))
            pending = None
        else:
            assert line.startswith(":"), f"unexpected SSE line {line!r}"
    assert pending is None
    types = [t for t, _ in events]
    assert types[0] == "message_start" and types[-1] == "message_stop", types
    core = [t for t in types if t != "ping"]
    assert set(core) == set(STREAM_EVENT_TYPES), types
    assert all(t in (*STREAM_EVENT_TYPES, "ping") for t in types), types
    start = events[0][1]["message"]
    assert start["role"] == "assistant" and start["content"] == [], start
    delta = [d for t, d in events if t == "message_delta"][0]
    assert delta["delta"]["stop_reason"] == "end_turn", delta
    assert delta["usage"]["output_tokens"] > 0, delta
    input_tokens = delta["usage"].get("input_tokens")
    if input_tokens is None:
        input_tokens = start["usage"]["input_tokens"]
    assert input_tokens == prompt_rule(MESSAGES), (start, delta)


# ---------------------------------------------------------------- count_tokens


@pytest.mark.parametrize("model", CHAT_MODELS)
def test_count_tokens_records_no_usage(
    aclient: anthropic.Anthropic, clickhouse: ClickHouse, model: str
) -> None:
    system = "You are a terse assistant."
    raw = aclient.messages.with_raw_response.count_tokens(
        model=model, system=system, messages=MESSAGES
    )
    rid = request_id_of(raw.headers)
    count = raw.parse()
    assert isinstance(count.input_tokens, int) and count.input_tokens > 0, count
    if model == CLAUDE:
        # Counted by the upstream's own count endpoint: exactly what a message would use.
        expected = prompt_rule(MESSAGES, system_words(system))
        assert count.input_tokens == expected, count
        message = aclient.messages.create(
            model=model, max_tokens=8, system=system, messages=MESSAGES
        )
        assert message.usage.input_tokens == count.input_tokens, (message.usage, count)

    # A token_count event reaches ClickHouse ...
    rows = wait_rows(
        clickhouse,
        f"SELECT * FROM {clickhouse.database}.token_counts WHERE request_id = {sql_string(rid)}",
        what=f"token_counts row for count_tokens request {rid}",
    )
    assert len(rows) == 1, rows
    tc = rows[0]
    assert int(tc["input_tokens"]) == count.input_tokens, tc
    assert tc["model"] == model, tc
    assert tc["tenant_id"] == "demo", tc
    assert tc["source"] == ("upstream" if model == CLAUDE else "tokenizer"), tc
    # ... and no usage row, ever: it is never billed.
    time.sleep(2.5)
    assert clickhouse.usage_rows(rid) == [], f"count_tokens request {rid} left a usage row"


@pytest.mark.parametrize("model", CHAT_MODELS)
def test_count_tokens_with_tools_and_blocks(aclient: anthropic.Anthropic, model: str) -> None:
    count = aclient.messages.count_tokens(
        model=model,
        system=[{"type": "text", "text": "Use tools when they help."}],
        tools=[WEATHER_TOOL],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        ],
    )
    assert count.input_tokens > 0, count


# ---------------------------------------------------------------- system prompts, multi-turn


SYSTEMS = {
    "string": "You are a terse assistant who likes bridges.",
    "blocks": [
        {"type": "text", "text": "You are a terse assistant."},
        {"type": "text", "text": "You like bridges and toll gates."},
    ],
}


@pytest.mark.parametrize("kind", list(SYSTEMS))
@pytest.mark.parametrize("model", CHAT_MODELS)
def test_system_prompt(aclient: anthropic.Anthropic, wait_usage, model: str, kind: str) -> None:
    """The system prompt reaches the upstream: it adds exactly its words to the prompt (an
    Anthropic upstream), or its words and one message (the OpenAI upstream's system message)."""
    system = SYSTEMS[kind]
    raw = aclient.messages.with_raw_response.create(
        model=model, max_tokens=32, system=system, messages=MESSAGES
    )
    message = raw.parse()
    check_message(message, model)
    extra = system_words(system) + (3 if model == GPT else 0)
    assert message.usage.input_tokens == prompt_rule(MESSAGES) + extra, (
        f"system prompt ({kind}) did not reach {model}'s upstream intact: {message.usage}"
    )
    row = wait_usage(request_id_of(raw.headers))
    check_anthropic_row(row, message.usage, model, streamed=False)

    rid, events, final = stream_message(
        aclient, model=model, max_tokens=32, system=system, messages=MESSAGES
    )
    check_event_sequence(events)
    assert final.usage.input_tokens == message.usage.input_tokens, final.usage
    check_anthropic_row(wait_usage(rid), final.usage, model, streamed=True)


MULTI_TURN = [
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "My name is Ada."},
            {"type": "text", "text": "I collect toll tickets."},
        ],
    },
    {"role": "assistant", "content": [{"type": "text", "text": "Nice to meet you, Ada."}]},
    {"role": "user", "content": "What do I collect?"},
    {"role": "assistant", "content": "Toll tickets."},
    {"role": "user", "content": [{"type": "text", "text": "And my name?"}]},
]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("model", CHAT_MODELS)
def test_multi_turn_content_blocks(
    aclient: anthropic.Anthropic, wait_usage, model: str, stream: bool
) -> None:
    """Every turn and every text block reaches the upstream (translated too)."""
    system = "Answer from the conversation."
    kwargs = dict(model=model, max_tokens=32, system=system, messages=MULTI_TURN)
    if stream:
        rid, events, message = stream_message(aclient, **kwargs)
        check_event_sequence(events)
    else:
        raw = aclient.messages.with_raw_response.create(**kwargs)
        rid, message = request_id_of(raw.headers), raw.parse()
    check_message(message, model)
    extra = words(system) + (3 if model == GPT else 0)
    assert message.usage.input_tokens == prompt_rule(MULTI_TURN) + extra, message.usage
    check_anthropic_row(wait_usage(rid), message.usage, model, streamed=stream)


# ---------------------------------------------------------------- tool use


def _tool_follow_up(first: Any, question: list[dict[str, Any]]) -> list[dict[str, Any]]:
    tool_use = [b for b in first.content if b.type == "tool_use"]
    assert len(tool_use) == 1, first.content
    return [
        *question,
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": b.id, "name": b.name, "input": b.input}
                if b.type == "tool_use"
                else {"type": "text", "text": b.text}
                for b in first.content
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": tool_use[0].id,
                    "content": TOOL_RESULT,
                }
            ],
        },
    ]


def _check_tool_use(message: Any) -> Any:
    assert message.stop_reason == "tool_use", message
    blocks = [b for b in message.content if b.type == "tool_use"]
    assert len(blocks) == 1, message.content
    block = blocks[0]
    assert block.name == TOOL, block
    assert block.id, block
    assert isinstance(block.input, dict) and isinstance(block.input.get("text"), str), block
    return block


QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOL_RESULT = "Sunny, 21 degrees."


@pytest.mark.parametrize("model", CHAT_MODELS)
def test_tool_use_round_trip(aclient: anthropic.Anthropic, wait_usage, model: str) -> None:
    raw = aclient.messages.with_raw_response.create(
        model=model,
        max_tokens=64,
        tools=[WEATHER_TOOL],
        messages=QUESTION,
        extra_headers={"x-mock-tool-call": TOOL},
    )
    first = raw.parse()
    _check_tool_use(first)
    row = wait_usage(request_id_of(raw.headers))
    check_anthropic_row(row, first.usage, model, streamed=False)
    assert row["cost"] == cost_of(raw.headers), row

    follow_up = _tool_follow_up(first, QUESTION)
    raw = aclient.messages.with_raw_response.create(
        model=model, max_tokens=64, tools=[WEATHER_TOOL], messages=follow_up
    )
    second = raw.parse()
    check_message(second, model)
    # The tool result's text reached the upstream (the mock counts tool_result contents).
    assert second.usage.input_tokens >= first.usage.input_tokens + words(TOOL_RESULT), (
        first.usage,
        second.usage,
    )
    check_anthropic_row(
        wait_usage(request_id_of(raw.headers)), second.usage, model, streamed=False
    )


@pytest.mark.parametrize("model", CHAT_MODELS)
def test_tool_use_round_trip_streamed(
    aclient: anthropic.Anthropic, wait_usage, model: str
) -> None:
    rid, events, first = stream_message(
        aclient,
        model=model,
        max_tokens=64,
        tools=[WEATHER_TOOL],
        messages=QUESTION,
        extra_headers={"x-mock-tool-call": TOOL},
    )
    check_event_sequence(events)
    starts = [e for e in events if e.type == "content_block_start"]
    assert any(
        s.content_block.type == "tool_use" and s.content_block.name == TOOL for s in starts
    ), starts
    partial = "".join(
        e.delta.partial_json
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
    )
    assert partial, "no input_json_delta in the stream"
    block = _check_tool_use(first)
    assert json.loads(partial) == block.input, (partial, block.input)
    delta = [e for e in events if e.type == "message_delta"][0]
    assert delta.delta.stop_reason == "tool_use", delta
    check_anthropic_row(wait_usage(rid), first.usage, model, streamed=True)

    rid, events, second = stream_message(
        aclient,
        model=model,
        max_tokens=64,
        tools=[WEATHER_TOOL],
        messages=_tool_follow_up(first, QUESTION),
    )
    check_event_sequence(events)
    check_message(second, model)
    check_anthropic_row(wait_usage(rid), second.usage, model, streamed=True)


# ---------------------------------------------------------------- errors


def test_401_bad_key(aclient_for) -> None:
    # A fresh client (connection) per call: after a 401 the gateway may close a keep-alive
    # connection it did not announce as closing (see test_401_before_body_connection_reuse).
    bad = "tg_test_" + "0" * 32
    with pytest.raises(anthropic.AuthenticationError) as info:
        aclient_for(bad).messages.create(model=CLAUDE, max_tokens=8, messages=MESSAGES)
    check_anthropic_error(info.value, 401, "authentication_error")
    with pytest.raises(anthropic.AuthenticationError) as info:
        with aclient_for(bad).messages.stream(model=CLAUDE, max_tokens=8, messages=MESSAGES) as s:
            bounded(s)
    check_anthropic_error(info.value, 401, "authentication_error")
    with pytest.raises(anthropic.AuthenticationError) as info:
        aclient_for(bad).messages.count_tokens(model=CLAUDE, messages=MESSAGES)
    check_anthropic_error(info.value, 401, "authentication_error")


def _read_http_response(sock: socket.socket, timeout: float) -> bytes | None:
    """One HTTP/1.1 response (headers and a content-length body) from `sock`, or None if nothing
    arrives within `timeout` s; b"" if the peer closed the connection first."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
            assert len(data) < 1 << 20
        head, _, rest = data.partition(b"\r\n\r\n")
        m = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
        length = int(m.group(1)) if m else 0
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return head + b"\r\n\r\n" + rest
    except (socket.timeout, TimeoutError):
        return data or None
    except (ConnectionResetError, BrokenPipeError):
        return data


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
def test_401_before_body_connection_reuse(stack: Stack, path: str) -> None:
    """A client that sends its headers and body in two writes, gets a 401 and reuses the
    keep-alive connection must get an answer to its next request, unless the 401 said
    `connection: close`."""
    url = httpx.URL(stack.gateway_url)
    body = json.dumps({"model": CLAUDE, "max_tokens": 8, "messages": MESSAGES}).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {url.host}\r\nx-api-key: tg_test_{'0' * 32}\r\n"
        f"anthropic-version: 2023-06-01\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((url.host, url.port or 80), timeout=5) as sock:
        sock.sendall(head)
        first = _read_http_response(sock, 0.5)  # the gateway may answer before the body
        try:
            sock.sendall(body)
        except (BrokenPipeError, ConnectionResetError):
            pass
        if first is None:
            first = _read_http_response(sock, 5)
        assert first and first.startswith(b"HTTP/1.1 401"), first
        if re.search(rb"(?im)^connection:\s*close\s*$", first.partition(b"\r\n\r\n")[0]):
            return  # announced: a client opens a new connection
        time.sleep(0.2)
        try:
            sock.sendall(head + body)
            second = _read_http_response(sock, 5)
        except (BrokenPipeError, ConnectionResetError) as exc:
            second = repr(exc).encode()
    assert second and second.startswith(b"HTTP/1.1 401"), (
        f"keep-alive connection dropped after a 401 that did not say `connection: close`: "
        f"second request got {second!r}"
    )


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
def test_401_missing_key(stack: Stack, path: str) -> None:
    # Its own connection, not the shared `http` client's
    # (see test_401_before_body_connection_reuse).
    with httpx.Client(base_url=stack.gateway_url, timeout=HTTP_TIMEOUT) as http:
        r = http.post(
            path,
            json={"model": CLAUDE, "max_tokens": 8, "messages": MESSAGES},
            headers={"anthropic-version": "2023-06-01"},
        )
    check_raw_anthropic_error(r, 401, "authentication_error")


def test_404_unknown_model(aclient: anthropic.Anthropic, make_key, aclient_for) -> None:
    restricted = aclient_for(make_key(models=[GPT]))
    for c in (aclient, restricted):  # 404 whatever the key's allow-list
        with pytest.raises(anthropic.NotFoundError) as info:
            c.messages.create(model="no-such-model-xyz", max_tokens=8, messages=MESSAGES)
        check_anthropic_error(info.value, 404, "not_found_error")
        with pytest.raises(anthropic.NotFoundError) as info:
            with c.messages.stream(model="no-such-model-xyz", max_tokens=8, messages=MESSAGES) as s:
                bounded(s)
        check_anthropic_error(info.value, 404, "not_found_error")
        with pytest.raises(anthropic.NotFoundError) as info:
            c.messages.count_tokens(model="no-such-model-xyz", messages=MESSAGES)
        check_anthropic_error(info.value, 404, "not_found_error")


def _post_messages(c: anthropic.Anthropic, body: dict[str, Any], path: str = "/v1/messages") -> Any:
    return c.post(path, body=body, cast_to=httpx2.Response)


@pytest.mark.parametrize("model", CHAT_MODELS)
def test_400_missing_max_tokens(aclient: anthropic.Anthropic, model: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        _post_messages(aclient, {"model": model, "messages": MESSAGES})
    message = check_anthropic_error(info.value, 400, "invalid_request_error")
    assert "max_tokens" in message, message


@pytest.mark.parametrize("model", CHAT_MODELS)
def test_400_empty_messages(aclient: anthropic.Anthropic, model: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        aclient.messages.create(model=model, max_tokens=8, messages=[])
    check_anthropic_error(info.value, 400, "invalid_request_error")
    with pytest.raises(anthropic.BadRequestError) as info:
        with aclient.messages.stream(model=model, max_tokens=8, messages=[]) as s:
            bounded(s)
    check_anthropic_error(info.value, 400, "invalid_request_error")


def test_400_count_tokens_without_messages(aclient: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        _post_messages(aclient, {"model": CLAUDE}, "/v1/messages/count_tokens")
    check_anthropic_error(info.value, 400, "invalid_request_error")


@pytest.mark.parametrize(
    "body",
    [b'{"model": "mock-claude", "max_tokens": 8, "messages": [', b"not json", b"", b"[]"],
    ids=["truncated", "not-json", "empty", "array"],
)
def test_400_malformed_bodies(http: httpx.Client, demo_key: str, body: bytes) -> None:
    r = http.post(
        "/v1/messages",
        content=body,
        headers={"x-api-key": demo_key, "content-type": "application/json"},
    )
    check_raw_anthropic_error(r, 400, "invalid_request_error")


def test_403_model_not_allowed(make_key, aclient_for) -> None:
    c = aclient_for(make_key(models=[GPT]))
    assert c.messages.create(model=GPT, max_tokens=4, messages=MESSAGES).content
    with pytest.raises(anthropic.PermissionDeniedError) as info:
        c.messages.create(model=CLAUDE, max_tokens=8, messages=MESSAGES)
    check_anthropic_error(info.value, 403, "permission_error")
    with pytest.raises(anthropic.PermissionDeniedError) as info:
        with c.messages.stream(model=CLAUDE, max_tokens=8, messages=MESSAGES) as s:
            bounded(s)
    check_anthropic_error(info.value, 403, "permission_error")


def test_429_rpm(make_key, aclient_for) -> None:
    c = aclient_for(make_key(rpm=1))
    assert c.messages.create(model=CLAUDE, max_tokens=4, messages=MESSAGES).content
    with pytest.raises(anthropic.RateLimitError) as info:
        c.messages.create(model=CLAUDE, max_tokens=4, messages=MESSAGES)
    check_anthropic_error(info.value, 429, "rate_limit_error")
    retry_after = info.value.response.headers.get("retry-after")
    assert retry_after and re.fullmatch(r"[0-9]+(\.[0-9]+)?", retry_after.strip()), dict(
        info.value.response.headers
    )


def test_upstream_failure_model(aclient: anthropic.Anthropic, failing_model: str | None) -> None:
    if failing_model is None:
        pytest.skip("the demo config lists no always-failing model (`mock-broken`)")
    for stream in (False, True):
        with pytest.raises(anthropic.APIStatusError) as info:
            if stream:
                with aclient.messages.stream(
                    model=failing_model, max_tokens=8, messages=MESSAGES
                ) as s:
                    bounded(s)
            else:
                aclient.messages.create(model=failing_model, max_tokens=8, messages=MESSAGES)
        exc = info.value
        assert exc.status_code >= 500, exc
        assert isinstance(exc, anthropic.InternalServerError), type(exc)
        body = exc.body
        assert isinstance(body, dict) and body.get("type") == "error", body
        assert body["error"]["type"] in ("api_error", "overloaded_error"), body
        request_id_of(exc.response.headers)


# ---------------------------------------------------------------- OpenAI SDK -> Anthropic upstream


OPENAI_MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": USER},
]
# Hoisted into Anthropic's `system` (words, no message); the user turn is words + 3.
OPENAI_PROMPT = words(OPENAI_MESSAGES[0]["content"]) + words(USER) + 3


def test_openai_chat_to_claude_plain(client: openai.OpenAI, wait_usage) -> None:
    raw = client.chat.completions.with_raw_response.create(model=CLAUDE, messages=OPENAI_MESSAGES)
    rid = openai_request_id_of(raw.headers)
    cost = cost_of(raw.headers)
    completion = raw.parse()
    assert completion.object == "chat.completion" and completion.id
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content.strip()
    assert choice.finish_reason == "stop", choice
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens == OPENAI_PROMPT, usage
    assert 0 < usage.completion_tokens <= 16, usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, usage
    row = wait_usage(rid)
    check_openai_row(row, usage, CLAUDE, streamed=False)
    assert row["cost"] == cost, (row, cost)


def test_openai_chat_to_claude_cached_tokens(client: openai.OpenAI, wait_usage) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=CLAUDE, messages=OPENAI_MESSAGES, extra_headers={"x-mock-cached-tokens": "7"}
    )
    usage = raw.parse().usage
    assert usage is not None
    assert usage.prompt_tokens == OPENAI_PROMPT + 7, usage  # OpenAI's prompt includes cache reads
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 7, usage
    row = wait_usage(openai_request_id_of(raw.headers))
    check_openai_row(row, usage, CLAUDE, streamed=False)
    assert row["cache_read_tokens"] == 7 and row["input_tokens"] == OPENAI_PROMPT, row


@pytest.mark.parametrize("include_usage", [False, True])
def test_openai_chat_to_claude_stream(
    client: openai.OpenAI, wait_usage, include_usage: bool
) -> None:
    kwargs: dict[str, Any] = {}
    if include_usage:
        kwargs["stream_options"] = {"include_usage": True}
    raw = client.chat.completions.with_raw_response.create(
        model=CLAUDE, messages=OPENAI_MESSAGES, stream=True, **kwargs
    )
    rid = openai_request_id_of(raw.headers)
    chunks = bounded(raw.parse())
    assert chunks
    for chunk in chunks:
        assert chunk.object == "chat.completion.chunk", chunk
    assert len({c.id for c in chunks}) == 1, "chunks of one stream carry different ids"
    text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices if ch.delta)
    assert text.strip(), "no text in the stream"
    finish = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert finish == ["stop"], finish
    row = wait_usage(rid)
    if include_usage:
        last = chunks[-1]
        assert last.choices == [] and last.usage is not None, last
        assert all(c.usage is None for c in chunks[:-1]), "usage before the last chunk"
        assert all(c.choices for c in chunks[:-1]), "empty choices before the last chunk"
        assert last.usage.prompt_tokens == OPENAI_PROMPT, last.usage
        assert last.usage.completion_tokens == words(text), (last.usage, text)
        check_openai_row(row, last.usage, CLAUDE, streamed=True)
    else:
        assert all(c.usage is None for c in chunks), "usage relayed without include_usage"
        assert all(c.choices for c in chunks), "chunk with empty choices without include_usage"
        assert row["input_tokens"] == OPENAI_PROMPT and row["output_tokens"] == words(text), row
        check_facts(row, CLAUDE, streamed=True, api="openai_chat")


def _openai_tool_calls(chunks: list[Any]) -> tuple[str, str, str]:
    deltas = [
        tc for c in chunks for ch in c.choices for tc in (ch.delta.tool_calls or []) if ch.delta
    ]
    name = "".join((tc.function.name or "") for tc in deltas if tc.function)
    args = "".join((tc.function.arguments or "") for tc in deltas if tc.function)
    ids = {tc.id for tc in deltas if tc.id}
    assert len(ids) == 1, f"tool call ids {ids}"
    return ids.pop(), name, args


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_openai_tool_calls_to_claude(client: openai.OpenAI, wait_usage, stream: bool) -> None:
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    headers = {"x-mock-tool-call": TOOL}
    if stream:
        raw = client.chat.completions.with_raw_response.create(
            model=CLAUDE,
            messages=question,
            tools=[OPENAI_WEATHER_TOOL],
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=headers,
        )
        chunks = bounded(raw.parse())
        call_id, name, arguments = _openai_tool_calls(chunks)
        finish = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
        assert finish == ["tool_calls"], finish
        assert chunks[-1].choices == [] and chunks[-1].usage is not None, chunks[-1]
        usage = chunks[-1].usage
    else:
        raw = client.chat.completions.with_raw_response.create(
            model=CLAUDE, messages=question, tools=[OPENAI_WEATHER_TOOL], extra_headers=headers
        )
        completion = raw.parse()
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        calls = choice.message.tool_calls
        assert calls and len(calls) == 1, choice
        call_id, name, arguments = calls[0].id, calls[0].function.name, calls[0].function.arguments
        usage = completion.usage
    assert name == TOOL
    assert call_id
    args = json.loads(arguments)
    assert isinstance(args, dict) and isinstance(args.get("text"), str), arguments
    check_openai_row(
        wait_usage(openai_request_id_of(raw.headers)), usage, CLAUDE, streamed=stream
    )

    # The tool result goes back; the model answers in text.
    follow_up = [
        *question,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": TOOL, "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": TOOL_RESULT},
    ]
    raw = client.chat.completions.with_raw_response.create(
        model=CLAUDE, messages=follow_up, tools=[OPENAI_WEATHER_TOOL]
    )
    completion = raw.parse()
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice
    assert isinstance(choice.message.content, str) and choice.message.content.strip(), choice
    assert not choice.message.tool_calls, choice
    check_openai_row(
        wait_usage(openai_request_id_of(raw.headers)), completion.usage, CLAUDE, streamed=False
    )


# ---------------------------------------------------------------- embeddings


EMBED_INPUTS = ["toll gates meter every token", "finance reads invoices"]


def test_embeddings_default_base64(client: openai.OpenAI, wait_usage) -> None:
    """The SDK asks for base64 when no encoding is given and decodes it into floats."""
    decoded: list[list[float]] = []
    raw = client.embeddings.with_raw_response.create(model=EMBED, input=EMBED_INPUTS)
    rid = openai_request_id_of(raw.headers)
    cost = cost_of(raw.headers)
    response = raw.parse()
    request_body = json.loads(raw.http_request.content)
    assert request_body.get("encoding_format") == "base64", request_body
    wire = raw.http_response.json()
    for item in wire["data"]:
        assert isinstance(item["embedding"], str), "base64 asked, not answered as a string"
        decoded.append(b64_floats(item["embedding"]))
    assert response.object == "list"
    assert [d.index for d in response.data] == [0, 1], response.data
    for d, vector in zip(response.data, decoded):
        assert len(d.embedding) > 0 and all(isinstance(x, float) for x in d.embedding)
        assert len(d.embedding) == len(vector)
        assert all(
            math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7) for a, b in zip(d.embedding, vector)
        )
    usage = response.usage
    assert usage.prompt_tokens == sum(words(s) for s in EMBED_INPUTS), usage
    assert usage.total_tokens == usage.prompt_tokens, usage
    row = wait_usage(rid)
    check_openai_row(row, usage, EMBED, streamed=False, api="openai_embeddings")
    assert row["input_tokens"] == usage.prompt_tokens and row["output_tokens"] == 0, row
    assert row["cost"] == cost, (row, cost)


def test_embeddings_float(client: openai.OpenAI, wait_usage) -> None:
    raw = client.embeddings.with_raw_response.create(
        model=EMBED, input=EMBED_INPUTS[0], encoding_format="float"
    )
    rid = openai_request_id_of(raw.headers)
    cost = cost_of(raw.headers)
    response = raw.parse()
    wire = raw.http_response.json()
    assert isinstance(wire["data"][0]["embedding"], list), "float asked, not answered as a list"
    assert len(response.data) == 1
    vector = response.data[0].embedding
    assert len(vector) > 0 and all(isinstance(x, float) for x in vector)
    # The same input through base64 is the same vector.
    again = client.embeddings.create(model=EMBED, input=EMBED_INPUTS[0]).data[0].embedding
    assert len(again) == len(vector)
    assert all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6) for a, b in zip(vector, again))
    usage = response.usage
    assert usage.prompt_tokens == words(EMBED_INPUTS[0]), usage
    row = wait_usage(rid)
    check_openai_row(row, usage, EMBED, streamed=False, api="openai_embeddings")
    assert row["input_tokens"] == usage.prompt_tokens and row["output_tokens"] == 0, row
    assert row["cost"] == cost, (row, cost)


# ---------------------------------------------------------------- the Responses API


@pytest.mark.parametrize("model", [GPT, "mock-claude"])
def test_responses_api(client: openai.OpenAI, wait_usage, model: str) -> None:
    """The Responses API, bridged over chat (OpenAI upstream) and over chat then Messages
    (Anthropic upstream): the SDK parses it, and usage is recorded like chat."""
    raw = client.responses.with_raw_response.create(model=model, input="hi", instructions="be brief")
    response = raw.parse()
    assert response.output_text.strip(), response
    row = wait_usage(openai_request_id_of(raw.headers))
    assert response.usage is not None
    assert row["input_tokens"] + row["cache_read_tokens"] == response.usage.input_tokens, row
    assert row["output_tokens"] == response.usage.output_tokens, row
    assert row["cost"] == Decimal(raw.headers["x-tollgate-cost"]), row


@pytest.mark.parametrize("model", [GPT, "mock-claude"])
def test_responses_api_streamed(client: openai.OpenAI, wait_usage, model: str) -> None:
    with client.responses.stream(model=model, input=[{"role": "user", "content": "hello there"}]) as stream:
        deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
        rid = openai_request_id_of(stream.response.headers) if hasattr(stream, "response") else None
    assert deltas and final.output_text == deltas
    assert final.usage is not None
    if rid:
        row = wait_usage(rid)
        assert row["streamed"] == 1 and row["estimated"] == 0, row
        assert row["output_tokens"] == final.usage.output_tokens, row


# ---------------------------------------------------------------- upstream faults on mock-claude
# Last in the file: they make the shared deployments fail, which may open a circuit breaker;
# `healthy_after` waits (bounded) until both chat models serve again.


@pytest.fixture
def healthy_after(aclient: anthropic.Anthropic) -> Any:
    yield
    deadline = time.monotonic() + 30
    for model in CHAT_MODELS:
        while True:
            try:
                aclient.messages.create(model=model, max_tokens=1, messages=MESSAGES)
                break
            except (anthropic.InternalServerError, anthropic.RateLimitError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


@pytest.mark.parametrize("model", CHAT_MODELS)
def test_upstream_cut_mid_stream(
    aclient: anthropic.Anthropic, wait_usage, healthy_after: None, model: str
) -> None:
    """An upstream that drops the stream: the SDK raises (an `error` event or a broken
    connection), and the usage row is estimated from what was streamed."""
    events: list[Any] = []
    error: BaseException | None = None
    with aclient.messages.stream(
        model=model, max_tokens=64, messages=MESSAGES, extra_headers={"x-mock-cut-after": "3"}
    ) as stream:
        rid = request_id_of(stream.response.headers)
        try:
            for event in stream:
                events.append(event)
                assert len(events) <= MAX_EVENTS
        except Exception as exc:  # noqa: BLE001 - any error the SDK raises tells the client
            error = exc
    assert error is not None, f"truncated stream ended without an error after {len(events)} events"
    assert "message_stop" not in [e.type for e in events], "message_stop after a cut"
    row = wait_usage(rid)
    assert row["estimated"] == 1 and row["streamed"] == 1, row
    assert row["input_tokens"] > 0 and row["output_tokens"] > 0, row
    check_price(row)


@pytest.mark.parametrize("status", [500, 503])
def test_upstream_5xx_by_header(
    aclient: anthropic.Anthropic, healthy_after: None, status: int
) -> None:
    for stream in (False, True):
        with pytest.raises(anthropic.APIStatusError) as info:
            kwargs = dict(
                model=CLAUDE,
                max_tokens=8,
                messages=MESSAGES,
                extra_headers={"x-mock-fail": str(status)},
            )
            if stream:
                with aclient.messages.stream(**kwargs) as s:
                    bounded(s)
            else:
                aclient.messages.create(**kwargs)
        exc = info.value
        assert isinstance(exc, anthropic.InternalServerError), (type(exc), exc)
        assert exc.status_code in (502, 503, 504, 529), exc
        body = exc.body
        assert isinstance(body, dict) and body.get("type") == "error", body
        assert body["error"]["type"] in ("api_error", "overloaded_error"), body
        request_id_of(exc.response.headers)
