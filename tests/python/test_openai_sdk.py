"""The gateway's OpenAI surface through the official `openai` SDK (issue 4).

Every request goes through `openai.OpenAI(base_url=$TOLLGATE_GATEWAY_URL/v1, api_key=...)` unless
the case needs bytes the SDK cannot send (no key, malformed JSON, an oversized body), which use
raw httpx. Clients never retry (`max_retries=0`), so each status the gateway answers is the one
the test sees. Usage is checked against the `tollgate.usage` row of the request's `x-request-id`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from conftest import CHAT_MODEL, DEMO_MODELS, HTTP_TIMEOUT, PriceBook, Stack

# Most chunks any single stream in this suite may yield before the test gives up on it.
MAX_CHUNKS = 5000
MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Say something about toll gates in a few words."},
]
DECIMAL_STRING = re.compile(r"^[0-9]+(\.[0-9]+)?$")


# ---------------------------------------------------------------- helpers


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    """Checks the error response an SDK exception carries; returns its `error` object."""
    return check_error_response(exc.response, exc.status_code)


def check_error_response(resp: Any, status: int) -> dict[str, Any]:
    """An OpenAI-shaped error: the status, `x-request-id`, JSON `{"error": {message, type, param,
    code}}`. `resp` is an httpx (or the SDK's httpx2) response."""
    assert resp.status_code == status, (
        f"expected {status}, got {resp.status_code}: {resp.text[:500]}"
    )
    assert resp.headers.get("x-request-id"), f"{status} without x-request-id: {dict(resp.headers)}"
    ctype = resp.headers.get("content-type", "")
    assert ctype.startswith("application/json"), f"{status} error with content-type {ctype!r}"
    body = resp.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), (
        f"not an OpenAI error: {body}"
    )
    err = body["error"]
    missing = {"message", "type", "param", "code"} - set(err)
    assert not missing, f"error object lacks {sorted(missing)}: {body}"
    assert isinstance(err["message"], str) and err["message"], body
    assert isinstance(err["type"], str) and err["type"], body
    assert err["param"] is None or isinstance(err["param"], str), body
    assert err["code"] is None or isinstance(err["code"], str), body
    return err


def request_id_of(headers: Any) -> str:
    rid = headers.get("x-request-id")
    assert rid, f"response without x-request-id: {dict(headers)}"
    return rid


def check_plain_headers(headers: Any) -> Decimal:
    """The headers of a plain response that reached an upstream; returns x-tollgate-cost."""
    request_id_of(headers)
    assert headers.get("x-tollgate-deployment"), f"no x-tollgate-deployment: {dict(headers)}"
    retries = headers.get("x-tollgate-retries")
    assert retries is not None and retries.isdigit(), f"x-tollgate-retries {retries!r}"
    cost = headers.get("x-tollgate-cost")
    assert cost is not None and DECIMAL_STRING.match(cost), (
        f"x-tollgate-cost {cost!r} is not a plain decimal"
    )
    return Decimal(cost)


# The price book in the gateway's config (set once per session by `_load_prices`).
PRICES: PriceBook | None = None


@pytest.fixture(scope="module", autouse=True)
def _load_prices(price_book: PriceBook | None) -> None:
    global PRICES
    PRICES = price_book


def check_row_tokens(
    row: dict[str, Any],
    usage: Any,
    *,
    streamed: bool,
    requested_model: str = CHAT_MODEL,
    headers: Any = None,
) -> None:
    """The usage row carries exactly the tokens the client saw (OpenAI usage object), the
    request's facts, and the cost the price book gives for those tokens."""
    prompt_in_row = row["input_tokens"] + row["cache_read_tokens"] + row["cache_write_tokens"]
    assert prompt_in_row == usage.prompt_tokens, (row, usage)
    assert row["output_tokens"] == usage.completion_tokens, (row, usage)
    details = getattr(usage, "prompt_tokens_details", None)
    cached = (details.cached_tokens or 0) if details is not None else 0
    assert row["cache_read_tokens"] == cached, (row, usage)
    cdetails = getattr(usage, "completion_tokens_details", None)
    reasoning = (cdetails.reasoning_tokens or 0) if cdetails is not None else 0
    assert row["reasoning_tokens"] == reasoning, (row, usage)
    assert row["estimated"] == 0, row
    assert row["streamed"] == (1 if streamed else 0), row
    if "requested_model" in row:
        assert row["requested_model"] == requested_model, row
    if "provider" in row:
        assert row["provider"] == "openai", row
    if headers is not None and "deployment" in row and headers.get("x-tollgate-deployment"):
        assert row["deployment"] == headers.get("x-tollgate-deployment"), row
    expected = PRICES.cost(row) if PRICES is not None else None
    if expected is not None:
        assert row["cost"] == expected, f"cost {row['cost']} != price book {expected}: {row}"


def collect(stream: Any) -> list[Any]:
    chunks = list(itertools.islice(stream, MAX_CHUNKS + 1))
    assert len(chunks) <= MAX_CHUNKS, "stream did not end"
    return chunks


def chat_text(chunks: list[Any]) -> str:
    return "".join(
        (choice.delta.content or "") for chunk in chunks for choice in chunk.choices if choice.delta
    )


# ---------------------------------------------------------------- models


def test_models_list_has_demo_models(client: openai.OpenAI) -> None:
    raw = client.models.with_raw_response.list()
    request_id_of(raw.headers)
    body = raw.http_response.json()
    assert body.get("object") == "list", body
    models = list(raw.parse())
    ids = [m.id for m in models]
    for model in DEMO_MODELS:
        assert model in ids, f"{model} missing from {ids}"
    assert len(ids) == len(set(ids)), f"duplicate ids: {ids}"
    for m in models:
        assert m.object == "model", m
        assert isinstance(m.created, int), m
        assert isinstance(m.owned_by, str), m


def test_models_list_only_allowed_models(make_key, client_for) -> None:
    key = make_key(models=["mock-gpt"])
    assert [m.id for m in client_for(key).models.list()] == ["mock-gpt"]
    key = make_key(models=["mock-gpt", "mock-embed"])
    assert sorted(m.id for m in client_for(key).models.list()) == ["mock-embed", "mock-gpt"]


# ---------------------------------------------------------------- chat, plain


def test_chat_plain(client: openai.OpenAI, wait_usage) -> None:
    raw = client.chat.completions.with_raw_response.create(model=CHAT_MODEL, messages=MESSAGES)
    completion = raw.parse()
    cost = check_plain_headers(raw.headers)
    assert raw.headers.get("x-tollgate-retries") == "0"
    assert completion.object == "chat.completion"
    assert completion.id
    assert len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content.strip()
    assert choice.finish_reason == "stop"
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens > 0
    assert 0 < usage.completion_tokens <= 16  # the mock's default reply
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    row = wait_usage(request_id_of(raw.headers))
    check_row_tokens(row, usage, streamed=False, headers=raw.headers)
    assert row["tenant_id"] == "demo", row
    assert row["cost"] == cost, f"x-tollgate-cost {cost} != usage.cost {row['cost']}"
    assert cost > 0, "the demo price book prices mock-gpt"


def test_chat_plain_max_tokens(client: openai.OpenAI, wait_usage) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=MESSAGES, max_tokens=3
    )
    completion = raw.parse()
    assert completion.usage is not None and completion.usage.completion_tokens == 3
    row = wait_usage(request_id_of(raw.headers))
    check_row_tokens(row, completion.usage, streamed=False, headers=raw.headers)
    assert row["cost"] == check_plain_headers(raw.headers)


def test_request_ids_are_unique(client: openai.OpenAI) -> None:
    ids = {
        request_id_of(
            client.chat.completions.with_raw_response.create(
                model=CHAT_MODEL, messages=MESSAGES, max_tokens=1
            ).headers
        )
        for _ in range(5)
    }
    assert len(ids) == 5, ids


@pytest.mark.parametrize("header", ["authorization", "x-api-key", "X-API-Key"])
def test_auth_header_styles(http: httpx.Client, demo_key: str, header: str) -> None:
    value = f"Bearer {demo_key}" if header == "authorization" else demo_key
    r = http.post(
        "/v1/chat/completions",
        json={"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 2},
        headers={header: value},
    )
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "chat.completion"
    r = http.get("/v1/models", headers={header: value})
    assert r.status_code == 200, r.text


@pytest.mark.needs_mock_headers
def test_chat_cache_and_reasoning_tokens(
    client: openai.OpenAI, wait_usage, mock_headers_forwarded: bool
) -> None:
    """Token kinds: cached prompt tokens and reasoning tokens reach the row as the kinds they are."""
    if not mock_headers_forwarded:
        pytest.skip("the gateway does not forward x-mock-* headers to the mock upstream")
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL,
        messages=MESSAGES,
        extra_headers={"x-mock-cached-tokens": "7", "x-mock-reasoning-tokens": "5"},
    )
    completion = raw.parse()
    usage = completion.usage
    assert usage is not None
    assert (
        usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 7
    )
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 5
    row = wait_usage(request_id_of(raw.headers))
    check_row_tokens(row, usage, streamed=False, headers=raw.headers)
    assert row["cache_read_tokens"] == 7 and row["input_tokens"] == usage.prompt_tokens - 7, row
    assert row["reasoning_tokens"] == 5, row
    assert row["cost"] == check_plain_headers(raw.headers)


# ---------------------------------------------------------------- chat, streamed


def test_chat_stream_without_include_usage(client: openai.OpenAI, wait_usage) -> None:
    reference = client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES)
    assert reference.usage is not None

    raw = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=MESSAGES, stream=True
    )
    request_id = request_id_of(raw.headers)
    assert raw.headers.get("content-type", "").startswith("text/event-stream")
    chunks = collect(raw.parse())
    assert chunks, "empty stream"
    for chunk in chunks:
        assert chunk.object == "chat.completion.chunk", chunk
        assert chunk.usage is None, f"usage chunk without include_usage: {chunk}"
        assert chunk.choices, f"chunk with empty choices without include_usage: {chunk}"
    assert len({c.id for c in chunks}) == 1, "chunks of one stream carry different ids"
    assert chat_text(chunks).strip(), "no text in the stream"
    assert chunks[-1].choices[0].finish_reason == "stop"

    # The mock is deterministic: the stream's upstream usage equals the plain reply's.
    row = wait_usage(request_id)
    check_row_tokens(row, reference.usage, streamed=True, headers=raw.headers)
    assert row["cost"] > 0, row


def test_chat_stream_with_include_usage(client: openai.OpenAI, wait_usage) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    request_id = request_id_of(raw.headers)
    chunks = collect(raw.parse())
    assert len(chunks) >= 2
    last = chunks[-1]
    assert last.choices == [], f"last chunk has choices: {last}"
    assert last.usage is not None, f"last chunk has no usage: {last}"
    for chunk in chunks[:-1]:
        assert chunk.usage is None, f"usage before the last chunk: {chunk}"
        assert chunk.choices, f"empty choices before the last chunk: {chunk}"
    assert chat_text(chunks).strip()
    assert chunks[-2].choices[0].finish_reason == "stop"
    usage = last.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    row = wait_usage(request_id)
    check_row_tokens(row, usage, streamed=True, headers=raw.headers)


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_stream_wire_format(http: httpx.Client, demo_key: str, include_usage: bool) -> None:
    """OpenAI's exact SSE framing: `data:` lines only, JSON chunks, then `data: [DONE]`; with
    include_usage the last chunk before [DONE] has `choices: []` and usage."""
    body: dict[str, Any] = {"model": CHAT_MODEL, "messages": MESSAGES, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    with http.stream(
        "POST", "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {demo_key}"}
    ) as r:
        assert r.status_code == 200, r.read()
        assert r.headers.get("content-type", "").startswith("text/event-stream")
        request_id_of(r.headers)
        lines = list(itertools.islice(r.iter_lines(), 4 * MAX_CHUNKS))
    data = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), f"non-data SSE line: {line!r}"
        data.append(line[len("data: ") :])
    assert data and data[-1] == "[DONE]", data[-3:]
    assert data.count("[DONE]") == 1

    chunks = [json.loads(d) for d in data[:-1]]
    usage_chunks = [c for c in chunks if c.get("usage")]
    if include_usage:
        assert usage_chunks == [chunks[-1]], "usage must be only in the last chunk"
        assert chunks[-1]["choices"] == []
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            assert isinstance(chunks[-1]["usage"][key], int)
    else:
        assert usage_chunks == [], "usage chunk relayed although the client did not ask"
        assert all(c["choices"] for c in chunks), "chunk with empty choices"


# ---------------------------------------------------------------- legacy completions


def test_completions_plain(client: openai.OpenAI, wait_usage) -> None:
    raw = client.completions.with_raw_response.create(
        model=CHAT_MODEL, prompt="Say this is a test", max_tokens=7
    )
    completion = raw.parse()
    cost = check_plain_headers(raw.headers)
    assert completion.object == "text_completion"
    assert len(completion.choices) == 1
    assert completion.choices[0].text.strip()
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens == 7
    row = wait_usage(request_id_of(raw.headers))
    check_row_tokens(row, usage, streamed=False, headers=raw.headers)
    assert row["cost"] == cost


@pytest.mark.parametrize("include_usage", [False, True])
def test_completions_stream(client: openai.OpenAI, wait_usage, include_usage: bool) -> None:
    kwargs: dict[str, Any] = {}
    if include_usage:
        kwargs["stream_options"] = {"include_usage": True}
    raw = client.completions.with_raw_response.create(
        model=CHAT_MODEL, prompt="Say this is a test", max_tokens=7, stream=True, **kwargs
    )
    request_id = request_id_of(raw.headers)
    chunks = collect(raw.parse())
    text = "".join(choice.text for chunk in chunks for choice in chunk.choices)
    assert text.strip()
    row = wait_usage(request_id)
    assert row["streamed"] == 1 and row["estimated"] == 0, row
    if include_usage:
        last = chunks[-1]
        assert last.choices == [] and last.usage is not None, last
        assert all(c.usage is None for c in chunks[:-1])
        assert last.usage.completion_tokens == 7
        check_row_tokens(row, last.usage, streamed=True)
    else:
        assert all(c.usage is None for c in chunks), "usage relayed without include_usage"
        assert all(c.choices for c in chunks), "chunk with empty choices without include_usage"
        assert row["output_tokens"] == 7, row


# ---------------------------------------------------------------- errors: routes


def test_404_unknown_route(http: httpx.Client, demo_key: str) -> None:
    r = http.get("/v1/no-such-route", headers={"authorization": f"Bearer {demo_key}"})
    check_error_response(r, 404)


@pytest.mark.parametrize("method,path", [("GET", "/v1/chat/completions"), ("DELETE", "/v1/models")])
def test_405_wrong_method(http: httpx.Client, demo_key: str, method: str, path: str) -> None:
    """Bad input gets an error in OpenAI's shape with a request id, whatever the route."""
    r = http.request(method, path, headers={"authorization": f"Bearer {demo_key}"})
    check_error_response(r, 405)


# ---------------------------------------------------------------- errors: 401


@pytest.mark.parametrize(
    "method,path",
    [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models")],
)
def test_401_missing_key(http: httpx.Client, method: str, path: str) -> None:
    body = {"model": CHAT_MODEL, "messages": MESSAGES, "prompt": "x"} if method == "POST" else None
    r = http.request(method, path, json=body)
    check_error_response(r, 401)


@pytest.mark.parametrize(
    "authorization", ["Bearer", "Bearer tg_test_", "Basic dXNlcjpwYXNz", "tg_test_no_scheme"]
)
def test_401_malformed_authorization(http: httpx.Client, authorization: str) -> None:
    r = http.post(
        "/v1/chat/completions",
        json={"model": CHAT_MODEL, "messages": MESSAGES},
        headers={"authorization": authorization},
    )
    check_error_response(r, 401)


def _key_for(kind: str, make_key) -> str:
    if kind == "unknown":
        return "tg_test_" + "0" * 32
    if kind == "revoked":
        return make_key(revoked=True)
    if kind == "disabled":
        return make_key(disabled=True)
    if kind == "expired":
        return make_key(expires_at=datetime.now(timezone.utc) - timedelta(minutes=5))
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["unknown", "revoked", "disabled", "expired"])
def test_401_bad_keys(kind: str, make_key, client_for) -> None:
    c = client_for(_key_for(kind, make_key))
    with pytest.raises(openai.AuthenticationError) as info:
        c.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES)
    error_of(info.value)
    with pytest.raises(openai.AuthenticationError) as info:
        c.models.list()
    error_of(info.value)
    with pytest.raises(openai.AuthenticationError) as info:
        c.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, stream=True)
    error_of(info.value)


@pytest.mark.parametrize("change", ["revoked", "disabled"])
def test_key_change_takes_effect_within_seconds(change: str, make_key, client_for) -> None:
    """Keys are cached, but the gateway watches the bucket: a key used a moment ago and then
    revoked or disabled is refused within seconds (bounded here at 10 s)."""
    key = make_key(name="soon changed")
    c = client_for(key)
    assert c.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=1).choices
    make_key(secret=str(key), tenant=key.tenant, key_id=key.key_id, **{change: True})
    deadline = time.monotonic() + 10
    while True:
        try:
            c.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=1)
        except openai.AuthenticationError as exc:
            error_of(exc)
            return
        if time.monotonic() > deadline:
            pytest.fail(f"key still accepted 10 s after being {change}")
        time.sleep(0.25)


def test_key_models_change_takes_effect_within_seconds(make_key, client_for) -> None:
    key = make_key()
    c = client_for(key)
    assert c.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=1).choices
    make_key(secret=str(key), tenant=key.tenant, key_id=key.key_id, models=["mock-embed"])
    deadline = time.monotonic() + 10
    while True:
        try:
            c.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=1)
        except openai.PermissionDeniedError as exc:
            error_of(exc)
            return
        if time.monotonic() > deadline:
            pytest.fail("mock-gpt still allowed 10 s after the key's models became [mock-embed]")
        time.sleep(0.25)


def test_key_expiring_later_works(make_key, client_for) -> None:
    key = make_key(expires_at=datetime.now(timezone.utc) + timedelta(hours=1))
    completion = client_for(key).chat.completions.create(
        model=CHAT_MODEL, messages=MESSAGES, max_tokens=1
    )
    assert completion.choices


def test_restricted_key_usage_row_names_its_tenant(make_key, client_for, wait_usage) -> None:
    key = make_key(models=["mock-gpt"])
    raw = client_for(key).chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=MESSAGES, max_tokens=2
    )
    row = wait_usage(request_id_of(raw.headers))
    assert row["tenant_id"] == key.tenant and row["key_id"] == key.key_id, row
    check_row_tokens(row, raw.parse().usage, streamed=False)


# ---------------------------------------------------------------- errors: 403, 404, 400


def test_403_model_not_allowed(make_key, client_for) -> None:
    c = client_for(make_key(models=["mock-gpt"]))
    with pytest.raises(openai.PermissionDeniedError) as info:
        c.chat.completions.create(model="mock-claude", messages=MESSAGES)
    error_of(info.value)
    with pytest.raises(openai.PermissionDeniedError) as info:
        c.completions.create(model="mock-claude", prompt="hi")
    error_of(info.value)


@pytest.mark.parametrize("restricted", [False, True])
def test_404_unknown_model(restricted: bool, client: openai.OpenAI, make_key, client_for) -> None:
    c = client_for(make_key(models=["mock-gpt"])) if restricted else client
    for call in (
        lambda: c.chat.completions.create(model="no-such-model-xyz", messages=MESSAGES),
        lambda: c.chat.completions.create(
            model="no-such-model-xyz", messages=MESSAGES, stream=True
        ),
        lambda: c.completions.create(model="no-such-model-xyz", prompt="hi"),
    ):
        with pytest.raises(openai.NotFoundError) as info:
            call()
        err = error_of(info.value)
        assert err["code"] == "model_not_found", err


def test_400_messages_not_a_list(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=CHAT_MODEL, messages="hello")  # type: ignore[arg-type]
    error_of(info.value)


def test_400_missing_messages(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.post(
            "/chat/completions",
            body={"model": CHAT_MODEL},
            cast_to=httpx.Response,
        )
    error_of(info.value)


def test_400_missing_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.post("/chat/completions", body={"messages": MESSAGES}, cast_to=httpx.Response)
    error_of(info.value)


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "mock-gpt", "messages": [',
        b"not json at all",
        b"",
        b"[]",
        b'{"model": 42, "messages": []}',
        b'{"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}',
        b'{"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}',
    ],
    ids=[
        "truncated",
        "not-json",
        "empty",
        "array",
        "model-number",
        "stream-string",
        "max-tokens-string",
    ],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_400_malformed_bodies(http: httpx.Client, demo_key: str, path: str, body: bytes) -> None:
    r = http.post(
        path,
        content=body,
        headers={"authorization": f"Bearer {demo_key}", "content-type": "application/json"},
    )
    check_error_response(r, 400)


def test_413_body_over_limit(stack: Stack, demo_key: str) -> None:
    filler = b"a" * (17 * 1024 * 1024)
    body = b'{"model":"mock-gpt","messages":[{"role":"user","content":"' + filler + b'"}]}'
    with httpx.Client(base_url=stack.gateway_url, timeout=HTTP_TIMEOUT) as c:
        r = c.post(
            "/v1/chat/completions",
            content=body,
            headers={"authorization": f"Bearer {demo_key}", "content-type": "application/json"},
        )
    check_error_response(r, 413)


# ---------------------------------------------------------------- errors: 429


def _check_429(exc: openai.RateLimitError, kind: str) -> dict[str, Any]:
    err = error_of(exc)
    headers = exc.response.headers
    retry_after = headers.get("retry-after")
    assert retry_after is not None, f"429 without Retry-After: {dict(headers)}"
    assert re.fullmatch(r"[0-9]+(\.[0-9]+)?", retry_after.strip()), f"Retry-After {retry_after!r}"
    assert any(h.lower().startswith("x-ratelimit-") for h in headers), dict(headers)
    assert headers.get(f"x-ratelimit-limit-{kind}"), f"no x-ratelimit-limit-{kind}: {dict(headers)}"
    assert headers.get(f"x-ratelimit-remaining-{kind}") is not None, dict(headers)
    said = " ".join(str(err.get(k) or "") for k in ("message", "type", "code")).lower()
    words = {"requests": ("request", "rpm"), "tokens": ("token", "tpm")}[kind]
    assert any(w in said for w in words), f"429 does not say which limit was hit: {err}"
    return err


def test_429_rpm(make_key, client_for) -> None:
    c = client_for(make_key(rpm=2))
    for _ in range(2):
        c.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=1)
    with pytest.raises(openai.RateLimitError) as info:
        c.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=1)
    _check_429(info.value, "requests")
    assert info.value.response.headers.get("x-ratelimit-limit-requests") == "2"
    assert info.value.response.headers.get("x-ratelimit-remaining-requests") == "0"
    # Other keys are not affected.
    c2 = client_for(make_key(rpm=2))
    assert c2.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=1).choices


def test_429_tpm(make_key, client_for) -> None:
    c = client_for(make_key(tpm=60))
    prompt = " ".join(["word"] * 30)
    for _ in range(6):
        try:
            c.chat.completions.create(
                model=CHAT_MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=16
            )
        except openai.RateLimitError as exc:
            _check_429(exc, "tokens")
            assert exc.response.headers.get("x-ratelimit-limit-tokens") == "60"
            return
    pytest.fail("6 requests of ~46 tokens each never hit a 60-token-per-minute limit")


@pytest.mark.needs_mock_headers
def test_429_concurrency(make_key, client_for, mock_headers_forwarded: bool) -> None:
    if not mock_headers_forwarded:
        pytest.skip("needs a slow stream: the gateway does not forward x-mock-* headers")
    key = make_key(max_concurrency=1)
    c = client_for(key)
    stream = c.chat.completions.create(
        model=CHAT_MODEL,
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-mock-output-tokens": "2000", "x-mock-chunk-delay-ms": "5"},
    )
    try:
        next(iter(stream))
        with pytest.raises(openai.RateLimitError) as info:
            c.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=1)
        err = error_of(info.value)
        assert info.value.response.headers.get("retry-after"), dict(info.value.response.headers)
        assert "concurren" in (err["message"] + (err["code"] or "")).lower(), err
    finally:
        stream.close()
    # The slot is released once the stream is gone.
    deadline = time.monotonic() + 10
    while True:
        try:
            c.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=1)
            break
        except openai.RateLimitError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_concurrency_slot_released_after_errors(
    make_key, client_for, failing_model: str | None
) -> None:
    """Refused, failed and streamed requests all give their concurrency slot back."""
    c = client_for(make_key(max_concurrency=1))
    failing: list[Any] = [
        lambda: c.chat.completions.create(model="no-such-model-xyz", messages=MESSAGES),
        lambda: c.chat.completions.create(model=CHAT_MODEL, messages="x"),  # type: ignore[arg-type]
    ]
    if failing_model is not None:
        failing.append(lambda: c.chat.completions.create(model=failing_model, messages=MESSAGES))
        failing.append(
            lambda: c.chat.completions.create(model=failing_model, messages=MESSAGES, stream=True)
        )
    for call in failing * 2:
        with pytest.raises(openai.APIStatusError) as info:
            call()
        assert info.value.status_code != 429, f"slot leaked: {info.value.response.text[:300]}"
    for _ in range(3):
        collect(c.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, stream=True))
        assert c.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=1).choices


# ---------------------------------------------------------------- errors: upstream failures


def test_upstream_failure_model(client: openai.OpenAI, failing_model) -> None:
    if failing_model is None:
        pytest.skip(
            "the demo config lists no model whose upstream always fails (named like `mock-broken`, "
            "or set TOLLGATE_FAILING_MODEL): upstream failure mapping not tested"
        )
    model = failing_model
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model=model, messages=MESSAGES, stream=stream)
        assert info.value.status_code in (502, 503, 504), info.value
        assert isinstance(info.value, openai.InternalServerError)
        error_of(info.value)


# ---------------------------------------------------------------- concurrency


def test_50_concurrent_streams(stack: Stack, wait_usage) -> None:
    async def one(c: openai.AsyncOpenAI, i: int) -> tuple[str, Any, str]:
        raw = await c.chat.completions.with_raw_response.create(
            model=CHAT_MODEL,
            messages=[{"role": "user", "content": f"stream number {i}"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        rid = request_id_of(raw.headers)
        stream = raw.parse()  # the legacy raw response parses synchronously
        chunks = []
        async for chunk in stream:
            chunks.append(chunk)
            assert len(chunks) <= MAX_CHUNKS
        assert chunks and chunks[-1].usage is not None and chunks[-1].choices == []
        return rid, chunks[-1].usage, chat_text(chunks)

    async def run() -> list[tuple[str, Any, str]]:
        async with openai.AsyncOpenAI(
            base_url=stack.openai_base_url,
            api_key=stack.demo_key,
            max_retries=0,
            timeout=HTTP_TIMEOUT,
        ) as c:
            return await asyncio.wait_for(asyncio.gather(*(one(c, i) for i in range(50))), 45)

    results = asyncio.run(run())
    assert len(results) == 50
    assert len({rid for rid, _, _ in results}) == 50, "request ids repeat"
    for _, usage, text in results:
        assert text.strip() and usage.completion_tokens > 0
    for rid, usage, _ in results:
        check_row_tokens(wait_usage(rid, timeout=15), usage, streamed=True)


# ---------------------------------------------------------------- client disconnect


@pytest.mark.needs_mock_headers
def test_client_disconnect_mid_stream_is_estimated(
    client: openai.OpenAI, wait_usage, mock_headers_forwarded: bool
) -> None:
    if not mock_headers_forwarded:
        pytest.skip(
            "needs a long stream: the gateway does not forward x-mock-output-tokens / "
            "x-mock-chunk-delay-ms to the mock upstream"
        )
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL,
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-mock-output-tokens": "2000", "x-mock-chunk-delay-ms": "5"},
    )
    request_id = request_id_of(raw.headers)
    stream = raw.parse()
    it = iter(stream)
    got = [next(it), next(it)]
    assert all(c.choices for c in got)
    stream.close()
    started = time.monotonic()
    row = wait_usage(request_id, timeout=20)
    assert row["estimated"] == 1, row
    assert row["streamed"] == 1, row
    assert 0 < row["output_tokens"] < 2000, row
    assert row["input_tokens"] > 0, row
    expected = PRICES.cost(row) if PRICES is not None else None
    assert expected is None or row["cost"] == expected, (row, expected)
    # The usage came from the disconnect, not from the upstream running to its end (~10 s).
    assert time.monotonic() - started < 9, "usage row appeared only after the upstream finished"


# ---------------------------------------------------------------- upstream cut mid-stream


def _cut_stream(client: openai.OpenAI) -> tuple[str, list[Any], BaseException | None]:
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL,
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-mock-cut-after": "3"},
    )
    request_id = request_id_of(raw.headers)
    chunks: list[Any] = []
    error: BaseException | None = None
    try:
        for chunk in raw.parse():
            chunks.append(chunk)
            assert len(chunks) <= MAX_CHUNKS
    except Exception as exc:  # noqa: BLE001 - any error the SDK or httpx raises tells the client
        error = exc
    return request_id, chunks, error


@pytest.mark.needs_mock_headers
def test_upstream_cut_mid_stream_is_estimated(
    client: openai.OpenAI, wait_usage, mock_headers_forwarded: bool
) -> None:
    if not mock_headers_forwarded:
        pytest.skip("the gateway does not forward x-mock-cut-after to the mock upstream")
    request_id, chunks, _ = _cut_stream(client)
    chunk_text = chat_text(chunks)
    assert chunk_text, "no text before the cut"
    assert all(c.usage is None for c in chunks), "usage although the upstream never sent it"
    row = wait_usage(request_id)
    assert row["estimated"] == 1 and row["streamed"] == 1, row
    assert row["output_tokens"] > 0 and row["input_tokens"] > 0, (row, chunk_text)
    expected = PRICES.cost(row) if PRICES is not None else None
    assert expected is None or row["cost"] == expected, (row, expected)


@pytest.mark.needs_mock_headers
def test_upstream_cut_mid_stream_is_visible_to_the_client(
    client: openai.OpenAI, mock_headers_forwarded: bool
) -> None:
    """OpenAI's SDK raises on an `error` event or a broken connection; a stream that simply stops
    before `[DONE]` reads as a complete (shorter) answer."""
    if not mock_headers_forwarded:
        pytest.skip("the gateway does not forward x-mock-cut-after to the mock upstream")
    _, chunks, error = _cut_stream(client)
    assert error is not None, f"truncated stream ended without an error after {len(chunks)} chunks"


# ---------------------------------------------------------------- tool calls


@pytest.mark.needs_mock_headers
def test_tool_call_plain_and_streamed(
    client: openai.OpenAI, wait_usage, mock_headers_forwarded: bool
) -> None:
    if not mock_headers_forwarded:
        pytest.skip("the gateway does not forward x-mock-tool-call to the mock upstream")

    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"text": {"type": "string"}}},
            },
        }
    ]
    headers = {"x-mock-tool-call": "get_weather"}
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=MESSAGES, tools=tools, extra_headers=headers
    )
    completion = raw.parse()
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert calls and calls[0].function.name == "get_weather", choice
    assert isinstance(json.loads(calls[0].function.arguments), dict)
    check_row_tokens(wait_usage(request_id_of(raw.headers)), completion.usage, streamed=False)

    raw = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL,
        messages=MESSAGES,
        tools=tools,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=headers,
    )
    chunks = collect(raw.parse())
    name = "".join(
        (tc.function.name or "")
        for c in chunks
        for ch in c.choices
        for tc in (ch.delta.tool_calls or [])
        if tc.function
    )
    arguments = "".join(
        (tc.function.arguments or "")
        for c in chunks
        for ch in c.choices
        for tc in (ch.delta.tool_calls or [])
        if tc.function
    )
    assert name == "get_weather"
    assert isinstance(json.loads(arguments), dict), arguments
    finish = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert finish == ["tool_calls"], finish
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    check_row_tokens(
        wait_usage(request_id_of(raw.headers)), chunks[-1].usage, streamed=True, headers=raw.headers
    )


# ---------------------------------------------------------------- upstream failures by header
# Last in the file: they make the shared mock-gpt deployment fail, which may open its circuit
# breaker; `healthy_after` waits (bounded) until mock-gpt serves again.


@pytest.fixture
def healthy_after(client: openai.OpenAI) -> Any:
    yield
    deadline = time.monotonic() + 30
    while True:
        try:
            client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=1)
            return
        except (openai.InternalServerError, openai.RateLimitError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _fail_upstream(client: openai.OpenAI, status: int, stream: bool = False) -> Any:
    return client.chat.completions.create(
        model=CHAT_MODEL,
        messages=MESSAGES,
        stream=stream,
        extra_headers={"x-mock-fail": str(status)},
    )


@pytest.mark.needs_mock_headers
@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_upstream_5xx_by_header(
    client: openai.OpenAI, mock_headers_forwarded: bool, healthy_after: None, status: int
) -> None:
    if not mock_headers_forwarded:
        pytest.skip("the gateway does not forward x-mock-fail to the mock upstream")
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as info:
            _fail_upstream(client, status, stream)
        assert info.value.status_code in (502, 503, 504), (status, info.value)
        error_of(info.value)


@pytest.mark.needs_mock_headers
@pytest.mark.parametrize("status", [401, 403, 404])
def test_upstream_auth_and_not_found_are_not_blamed_on_the_client(
    client: openai.OpenAI, mock_headers_forwarded: bool, healthy_after: None, status: int
) -> None:
    """The client's key and model were accepted; an upstream 401/403/404 means the gateway's own
    provider credentials or upstream model name are wrong. Relaying it would make the SDK raise
    AuthenticationError / PermissionDeniedError / NotFoundError about a key and model that are
    fine: it is an upstream failure (502/503/504)."""
    if not mock_headers_forwarded:
        pytest.skip("the gateway does not forward x-mock-fail to the mock upstream")
    with pytest.raises(openai.APIStatusError) as info:
        _fail_upstream(client, status)
    assert info.value.status_code in (502, 503, 504), (
        f"upstream {status} reached the client as {info.value.status_code}: "
        f"{info.value.response.text[:300]}"
    )
    error_of(info.value)


@pytest.mark.needs_mock_headers
def test_upstream_429_carries_retry_after(
    client: openai.OpenAI, mock_headers_forwarded: bool, healthy_after: None
) -> None:
    """An upstream that rate-limits (after failover) reaches the client as a 429 with
    Retry-After, as every 429 does, or as an upstream failure (502/503/504)."""
    if not mock_headers_forwarded:
        pytest.skip("the gateway does not forward x-mock-fail to the mock upstream")
    with pytest.raises(openai.APIStatusError) as info:
        _fail_upstream(client, 429)
    error_of(info.value)
    if info.value.status_code == 429:
        headers = info.value.response.headers
        assert headers.get("retry-after"), f"429 without Retry-After: {dict(headers)}"
    else:
        assert info.value.status_code in (502, 503, 504), info.value
