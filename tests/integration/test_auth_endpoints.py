"""API keys, admin keys, vLLM's tokenizer endpoints and hostile request bodies, end to
end: real etcd and NATS, one mock worker, three ``dynrt frontend`` processes and a
standalone ``dynrt router``.

* ``fe_keys``: API keys from two ``--api-key`` flags and an ``--api-key-file``, an admin
  key from ``--admin-api-key-file``.
* ``fe_env``: API keys from ``DYNRT_API_KEY`` (comma-separated), no admin key (its state
  changes take the API keys).
* ``fe_open``: no key at all (development: everything open).
* ``router``: ``dynrt router --admin-api-key ...`` (its ``POST /busy_threshold``).

Every refused request must be an OpenAI error body with the status the case names:
never a 5xx, a stack trace or a hang.
"""

from __future__ import annotations

import asyncio
import gzip
import importlib.metadata
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from dynrt.runtime.embedded import EtcdServer, NatsServer
from dynrt.runtime.mock_tokenizer import mock_tokenizer
from harness.frontend import FrontendProcess
from harness.metrics import metric, parse_metrics
from harness.processes import SystemPortProcess
from harness.worker import WorkerProcess

pytestmark = pytest.mark.timeout(120)

MODEL = "mock-model"
CONTEXT_LENGTH = 512
TOK = mock_tokenizer()
KEYS = ["sk-flag-one-" + uuid.uuid4().hex[:6], "sk-flag-two-" + uuid.uuid4().hex[:6]]
FILE_KEY = "sk-file-" + uuid.uuid4().hex[:6]
ENV_KEYS = ["sk-env-a-" + uuid.uuid4().hex[:6], "sk-env-b-" + uuid.uuid4().hex[:6]]
ADMIN_KEY = "admin-" + uuid.uuid4().hex[:8]
ROUTER_ADMIN_KEY = "router-admin-" + uuid.uuid4().hex[:8]
ERROR_KEYS = {"message", "type", "param", "code"}
MESSAGES = [{"role": "system", "content": "You are a quiet worker."},
            {"role": "user", "content": "Tell me about the river and the old house."}]
PROMPT = "Once upon a time the river ran through the old town"


@dataclass
class Deployment:
    worker: WorkerProcess
    fe_keys: FrontendProcess
    fe_env: FrontendProcess
    fe_open: FrontendProcess
    router: SystemPortProcess
    http: aiohttp.ClientSession

    @property
    def router_url(self) -> str:
        return f"http://127.0.0.1:{self.router.port}"


@pytest.fixture(scope="module")
async def dep(etcd_server: EtcdServer, nats_server: NatsServer,
              tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Deployment]:
    tmp = tmp_path_factory.mktemp("auth")
    ns = "t" + uuid.uuid4().hex[:10]
    conn = dict(namespace=ns, etcd_endpoints=etcd_server.endpoint, nats_url=nats_server.url)
    key_file = tmp / "api-keys"
    key_file.write_text(f"# clients\n\n{FILE_KEY}\n")
    admin_file = tmp / "admin-key"
    admin_file.write_text(ADMIN_KEY + "\n")
    router_admin_file = tmp / "router-admin-key"
    router_admin_file.write_text(ROUTER_ADMIN_KEY)
    started: list[Any] = []
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))
    try:
        worker = WorkerProcess(tmp, **conn, speedup="inf", name="worker",  # type: ignore[arg-type]
                               args=["--context-length", str(CONTEXT_LENGTH)])
        started.append(worker)
        await worker.start()
        fe_keys = FrontendProcess(tmp, **conn, name="fe_keys",  # type: ignore[arg-type]
                                  args=["--api-key", KEYS[0], "--api-key", KEYS[1], "--api-key-file", str(key_file),
                                        "--admin-api-key-file", str(admin_file)])
        fe_env = FrontendProcess(tmp, **conn, name="fe_env",  # type: ignore[arg-type]
                                 env={"DYNRT_API_KEY": f" {ENV_KEYS[0]}, {ENV_KEYS[1]} "})
        fe_open = FrontendProcess(tmp, **conn, name="fe_open", args=["--max-body-bytes", "65536"])  # type: ignore[arg-type]
        router = SystemPortProcess(tmp, "router", ["router", "--namespace", ns, "--etcd-endpoints",
                                                   etcd_server.endpoint, "--nats-url", nats_server.url,
                                                   "--admin-api-key-file", str(router_admin_file)])
        started += [fe_keys, fe_env, fe_open, router]
        await asyncio.gather(fe_keys.start(), fe_env.start(), fe_open.start(), router.start())
        yield Deployment(worker, fe_keys, fe_env, fe_open, router, http)
    finally:
        await http.close()
        await asyncio.gather(*(p.stop() for p in started))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def request(dep: Deployment, method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
                  content_type: str | None = "application/json") -> tuple[int, Any]:
    """(status, parsed JSON body); ``body`` bytes are sent as they are."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    all_headers = {**({"Content-Type": content_type} if content_type else {}), **(headers or {})}
    async with dep.http.request(method, url, data=data, headers=all_headers) as response:
        raw = await response.read()
        assert response.content_type == "application/json", (response.status, raw[:300])
        return response.status, json.loads(raw)


def assert_error(status: int, body: Any, expected: int, code: str | None = None, param: str | None = "-",
                 message_has: str = "") -> dict[str, Any]:
    assert status == expected, (status, body)
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    error = body["error"]
    assert error["message"] and "Traceback" not in error["message"], error
    if code is not None:
        assert error["code"] == code, error
    if param != "-":
        assert error["param"] == param, error
    assert message_has in error["message"], error
    return error  # type: ignore[no-any-return]


async def metrics(dep: Deployment, url: str) -> dict[Any, float]:
    async with dep.http.get(f"{url}/metrics") as response:
        return parse_metrics(await response.text())


# ---------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------


async def test_every_configured_key_is_accepted_and_wrong_ones_are_refused_and_counted(dep: Deployment) -> None:
    fe = dep.fe_keys
    for key in [*KEYS, FILE_KEY]:
        status, body = await request(dep, "GET", f"{fe.url}/v1/models", headers=bearer(key))
        assert status == 200 and [m["id"] for m in body["data"]] == [MODEL], body
        status, body = await request(dep, "POST", f"{fe.url}/tokenize", {"model": MODEL, "prompt": "hi"},
                                     headers=bearer(key))
        assert status == 200, body
    for key in ENV_KEYS:
        status, body = await request(dep, "GET", f"{dep.fe_env.url}/v1/models", headers=bearer(key))
        assert status == 200, body
    # case-insensitive scheme (RFC 7235), as vLLM
    status, _ = await request(dep, "GET", f"{fe.url}/v1/models", headers={"Authorization": f"bearer {KEYS[1]}"})
    assert status == 200

    before = await metrics(dep, fe.url)
    refused = [({"Authorization": "Bearer " + KEYS[0][:-1]}, "invalid"),  # a prefix of a real key
               ({"Authorization": f"Bearer {KEYS[0]}x"}, "invalid"),
               ({"Authorization": f"Bearer {ENV_KEYS[0]}"}, "invalid"),  # another frontend's key
               ({"Authorization": f"Bearer {ADMIN_KEY}"}, "invalid"),  # admin keys are not API keys
               ({}, "missing"), ({"Authorization": KEYS[0]}, "missing"),
               ({"Authorization": f"Basic {KEYS[0]}"}, "missing"), ({"Authorization": "Bearer "}, "missing")]
    for headers, _ in refused:
        status, body = await request(dep, "GET", f"{fe.url}/v1/models", headers=headers)
        assert_error(status, body, 401, code="invalid_api_key", param=None, message_has="API key")
    for path, payload in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]}),
                          ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES}),
                          ("/v1/completions", {"model": MODEL, "prompt": "x"})):
        status, body = await request(dep, "POST", f"{fe.url}{path}", payload, headers=bearer("nope"))
        assert_error(status, body, 401, code="invalid_api_key")
    after = await metrics(dep, fe.url)
    name = "dynrt_frontend_auth_failures_total"
    for reason in ("invalid", "missing"):
        expected = sum(1 for _, r in refused if r == reason)
        assert metric(after, name, endpoint="/v1/models", reason=reason) \
            - metric(before, name, endpoint="/v1/models", reason=reason) == expected
    assert metric(after, name, endpoint="/tokenize", reason="invalid") \
        - metric(before, name, endpoint="/tokenize", reason="invalid") == 1

    # read-only operations endpoints stay open to probes and scrapers
    for path in ("/health", "/live", "/metrics", "/version", "/busy_threshold"):
        async with dep.http.get(f"{fe.url}{path}") as response:
            assert response.status == 200, path


async def test_state_changes_need_the_admin_key(dep: Deployment) -> None:
    url = f"{dep.fe_keys.url}/busy_threshold"
    status, original = await request(dep, "GET", url)
    assert status == 200 and original["kv_usage"] == 0.95
    for headers in ({}, bearer(KEYS[0]), bearer(FILE_KEY), bearer("admin")):
        status, body = await request(dep, "POST", url, {"kv_usage": 0.5}, headers=headers)
        assert_error(status, body, 401, code="invalid_api_key", message_has="admin API key")
    assert (await request(dep, "GET", url))[1] == original  # nothing changed
    try:
        status, now = await request(dep, "POST", url, {"kv_usage": 0.5}, headers=bearer(ADMIN_KEY))
        assert status == 200 and now["kv_usage"] == 0.5
        assert (await request(dep, "GET", url))[1]["kv_usage"] == 0.5
    finally:
        status, _ = await request(dep, "POST", url, {"kv_usage": original["kv_usage"]}, headers=bearer(ADMIN_KEY))
        assert status == 200
    samples = await metrics(dep, dep.fe_keys.url)
    assert metric(samples, "dynrt_frontend_auth_failures_total", endpoint="/busy_threshold", reason="invalid") >= 3
    assert metric(samples, "dynrt_frontend_auth_failures_total", endpoint="/busy_threshold", reason="missing") >= 1

    # no admin key configured: state changes take the API keys (never open while keys are set)
    url = f"{dep.fe_env.url}/busy_threshold"
    for headers in ({}, bearer("wrong")):
        status, body = await request(dep, "POST", url, {"kv_usage": 0.9}, headers=headers)
        assert_error(status, body, 401, code="invalid_api_key")
    status, now = await request(dep, "POST", url, {"kv_usage": 0.95}, headers=bearer(ENV_KEYS[1]))
    assert status == 200 and now["kv_usage"] == 0.95
    # no key at all (development): open
    status, now = await request(dep, "POST", f"{dep.fe_open.url}/busy_threshold", {"kv_usage": 0.95})
    assert status == 200 and now["kv_usage"] == 0.95


async def test_standalone_router_busy_threshold_needs_its_admin_key(dep: Deployment) -> None:
    url = f"{dep.router_url}/busy_threshold"
    status, original = await request(dep, "GET", url)
    assert status == 200 and original == {"kv_usage": 0.95, "queue_depth": None, "prefill_tokens": None,
                                         "ttft_slo": None}
    before = await metrics(dep, dep.router_url)
    for headers in ({}, bearer(ADMIN_KEY), bearer(KEYS[0])):
        status, body = await request(dep, "POST", url, {"queue_depth": 0}, headers=headers)
        assert_error(status, body, 401, code="invalid_api_key", param=None)
    after = await metrics(dep, dep.router_url)
    name = "dynrt_router_auth_failures_total"
    assert metric(after, name, endpoint="/busy_threshold", reason="invalid") \
        - metric(before, name, endpoint="/busy_threshold", reason="invalid") == 2
    assert metric(after, name, endpoint="/busy_threshold", reason="missing") \
        - metric(before, name, endpoint="/busy_threshold", reason="missing") == 1
    assert (await request(dep, "GET", url))[1] == original
    try:
        status, now = await request(dep, "POST", url, {"queue_depth": 0}, headers=bearer(ROUTER_ADMIN_KEY))
        assert status == 200 and now == {**original, "queue_depth": 0}
        status, body = await request(dep, "POST", url, {"queue_depth": -3}, headers=bearer(ROUTER_ADMIN_KEY))
        assert_error(status, body, 400)
        status, body = await request(dep, "POST", url, {"queue_dept": 1}, headers=bearer(ROUTER_ADMIN_KEY))
        assert_error(status, body, 400, message_has="queue_dept")  # a misspelt field is not ignored
    finally:
        status, now = await request(dep, "POST", url, {"queue_depth": None}, headers=bearer(ROUTER_ADMIN_KEY))
        assert status == 200 and now == original
    for path in ("/health", "/live", "/metrics"):
        async with dep.http.get(f"{dep.router_url}{path}") as response:
            assert response.status == 200, path
    status, body = await request(dep, "GET", f"{dep.router_url}/nope")
    assert_error(status, body, 404)


# ---------------------------------------------------------------------------
# /tokenize, /detokenize, /version
# ---------------------------------------------------------------------------


async def test_tokenize_detokenize_round_trip(dep: Deployment) -> None:
    fe, key = dep.fe_keys, bearer(KEYS[0])
    status, body = await request(dep, "POST", f"{fe.url}/tokenize", {"model": MODEL, "prompt": PROMPT}, headers=key)
    ids = TOK.encode(PROMPT)
    assert status == 200 and body == {"count": len(ids), "max_model_len": CONTEXT_LENGTH, "tokens": ids,
                                      "token_strs": None}
    status, body = await request(dep, "POST", f"{fe.url}/detokenize", {"model": MODEL, "tokens": ids}, headers=key)
    assert status == 200 and body == {"prompt": PROMPT}
    # model may be left out (one model served); token strings on request
    status, body = await request(dep, "POST", f"{fe.url}/tokenize", {"prompt": "the river", "return_token_strs": True},
                                 headers=key)
    assert status == 200 and body["token_strs"] == ["the", " river"] and body["count"] == 2

    # messages: exactly the prompt the chat endpoint builds (its usage.prompt_tokens)
    status, body = await request(dep, "POST", f"{fe.url}/tokenize", {"model": MODEL, "messages": MESSAGES},
                                 headers=key)
    assert status == 200 and body["tokens"] == TOK.apply_chat_template(MESSAGES)
    status, plain = await request(dep, "POST", f"{fe.url}/tokenize",
                                  {"messages": MESSAGES, "add_generation_prompt": False}, headers=key)
    assert status == 200 and plain["tokens"] == TOK.apply_chat_template(MESSAGES, add_generation_prompt=False)
    status, chat = await request(dep, "POST", f"{fe.url}/v1/chat/completions",
                                 {"model": MODEL, "messages": MESSAGES, "max_tokens": 1}, headers=key)
    assert status == 200 and chat["usage"]["prompt_tokens"] == body["count"]
    # detokenize keeps special tokens (vLLM decodes with skip_special_tokens=False)
    status, text = await request(dep, "POST", f"{fe.url}/detokenize", {"tokens": body["tokens"]}, headers=key)
    assert status == 200 and text["prompt"].startswith("<bos><|system|>You are a quiet worker.<|end|><|user|>")
    assert text["prompt"].endswith("<|end|><|assistant|>")


async def test_tokenizer_endpoints_refuse_bad_requests(dep: Deployment) -> None:
    url = dep.fe_open.url
    cases: list[tuple[str, dict[str, Any], int, str | None, str | None]] = [
        ("/tokenize", {"model": "no-such-model", "prompt": "x"}, 404, "model", "model_not_found"),
        ("/detokenize", {"model": "no-such-model", "tokens": [1]}, 404, "model", "model_not_found"),
        ("/tokenize", {"prompt": "x", "messages": MESSAGES}, 400, "prompt", None),
        ("/tokenize", {"model": MODEL}, 400, "prompt", None),
        ("/tokenize", {"prompt": "x", "temperature": 1}, 400, "temperature", None),  # unknown field
        ("/tokenize", {"prompt": 5}, 400, "prompt", None),
        ("/tokenize", {"messages": "hi"}, 400, "messages", None),
        ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role", None),
        ("/tokenize", {"messages": MESSAGES, "chat_template": "{{ 1 }}"}, 400, "chat_template", None),
        ("/tokenize", {"messages": MESSAGES, "add_special_tokens": True}, 400, "add_special_tokens",
         "unsupported_parameter"),
        ("/tokenize", {"messages": MESSAGES, "continue_final_message": True}, 400, "continue_final_message", None),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens[0]", None),
        ("/detokenize", {"tokens": [5, TOK.vocab_size]}, 400, "tokens[1]", None),
        ("/detokenize", {"tokens": [2**64]}, 400, "tokens[0]", None),
        ("/detokenize", {"tokens": "1 2"}, 400, "tokens", None),
        ("/detokenize", {}, 400, "tokens", None),
    ]
    for path, payload, expected, param, code in cases:
        status, body = await request(dep, "POST", f"{url}{path}", payload)
        assert_error(status, body, expected, code=code, param=param)


async def test_version(dep: Deployment) -> None:
    status, body = await request(dep, "GET", f"{dep.fe_keys.url}/version")  # open, as on vLLM
    assert status == 200 and body == {"version": importlib.metadata.version("dynrt")}


# ---------------------------------------------------------------------------
# hostile bodies on every POST endpoint
# ---------------------------------------------------------------------------

POST_ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize", "/busy_threshold"]
_DEEP = 20_000  # 40 kB: under fe_open's body limit, far past msgspec's recursion limit


def _valid(path: str) -> dict[str, Any]:
    return {"/v1/chat/completions": {"model": MODEL, "messages": MESSAGES, "max_tokens": 1},
            "/v1/completions": {"model": MODEL, "prompt": PROMPT, "max_tokens": 1},
            "/tokenize": {"model": MODEL, "prompt": PROMPT},
            "/detokenize": {"model": MODEL, "tokens": [300, 301]},
            "/busy_threshold": {"kv_usage": 0.95}}[path]


# Per endpoint: a string field, a number field, and a field where any JSON is decoded
# (where deep nesting reaches the decoder's recursion limit).
_FIELDS = {"/v1/chat/completions": ("model", "max_tokens", "logit_bias"),
           "/v1/completions": ("model", "max_tokens", "logit_bias"),
           "/tokenize": ("prompt", "prompt", "prompt"),
           "/detokenize": ("model", "tokens", "tokens"),
           "/busy_threshold": ("kv_usage", "kv_usage", "kv_usage")}


def _with(path: str, field: str, fragment: bytes) -> bytes:
    """The endpoint's valid body with ``field``'s value replaced by raw JSON bytes."""
    return json.dumps({**_valid(path), field: "@@"}).encode().replace(b'"@@"', fragment)


def hostile_bodies(path: str) -> list[tuple[str, bytes, dict[str, str], int]]:
    """(what, body, extra headers, expected status)."""
    valid = json.dumps(_valid(path)).encode()
    text, number, anything = _FIELDS[path]
    none: dict[str, str] = {}
    return [
        ("invalid UTF-8 in a string", _with(path, text, b'"mock\xff\xfe"'),
         none, 400),
        ("overlong UTF-8", _with(path, text, b'"a\xc0\xafb"'), none, 400),
        ("invalid UTF-8 in a key", valid.replace(b'"' + text.encode() + b'"', b'"' + text.encode() + b'\xff"', 1),
         none, 400),
        ("lone surrogate escape", _with(path, text, b'"\\ud800"'), none, 400),
        ("raw NUL byte", _with(path, text, b'"a\x00b"'), none, 400),
        ("empty body", b"", none, 400),
        ("a JSON array", b"[]", none, 400),
        ("a JSON string", b'"hello"', none, 400),
        ("JSON null", b"null", none, 400),
        ("a JSON number", b"12", none, 400),
        ("truncated JSON", valid[:-3], none, 400),
        ("wrong types", json.dumps({k: {"a": 1} for k in _valid(path)}).encode(), none, 400),
        ("huge float", _with(path, number, b"1e999"), none, 400),
        ("huge integer", _with(path, number, b"1" + b"0" * 5000), none, 400),
        ("deep arrays", _with(path, anything, b"[" * _DEEP + b"]" * _DEEP), none, 400),
        ("deep objects", _with(path, anything, b'{"a":' * 5000 + b"1" + b"}" * 5000), none, 400),
        ("text/plain", valid, {"Content-Type": "text/plain"}, 415),
        ("form encoded", valid, {"Content-Type": "application/x-www-form-urlencoded"}, 415),
        ("gzip", gzip.compress(valid), {"Content-Encoding": "gzip"}, 415),
        ("huge body", _with(path, text, b'"' + b"a" * 70_000 + b'"'), none, 413),
    ]


@pytest.mark.parametrize("path", POST_ENDPOINTS)
async def test_hostile_bodies_get_openai_errors(dep: Deployment, path: str) -> None:
    url = f"{dep.fe_open.url}{path}"
    for what, body, headers, expected in hostile_bodies(path):
        status, answer = await request(dep, "POST", url, body, headers=headers)
        assert status == expected, (what, status, answer)
        error = assert_error(status, answer, expected)
        assert error["type"] == "invalid_request_error", (what, error)
    # no Content-Type at all: 415 (as vLLM)
    status, answer = await request(dep, "POST", url, json.dumps(_valid(path)).encode(), content_type=None)
    assert_error(status, answer, 415, code="unsupported_media_type")
    # a charset parameter is fine, and the valid body works after all of the above
    status, answer = await request(dep, "POST", url, _valid(path), content_type="application/json; charset=utf-8")
    assert status == 200, answer


async def test_hostile_sampling_values_are_400s(dep: Deployment) -> None:
    """Values that pass JSON decoding but are out of any engine's range (int64 and
    msgpack's limits included): 400, or at least never a 5xx (fields this server may
    still ignore)."""
    big = 10**30
    chat = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1}
    completion = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1}
    refused = [{"max_tokens": big}, {"top_k": big}, {"top_k": -big}, {"min_tokens": big}, {"seed": big},
               {"temperature": 1e308}, {"top_p": -1e308}, {"stop": ["\u0000"] * 20}, {"model": MODEL + "\u0000"},
               {"n": big}, {"presence_penalty": 1e308}]
    maybe = [{"stop_token_ids": [big]}, {"logit_bias": {str(big): 1}}, {"allowed_token_ids": [big]},
             {"min_p": 1e308}, {"repetition_penalty": -1.0}, {"logprobs": True, "top_logprobs": big},
             {"bad_words": ["x" * 10_000]}, {"max_completion_tokens": big}]
    for path, base in (("/v1/chat/completions", chat), ("/v1/completions", completion)):
        for extra in refused + maybe:
            if path == "/v1/completions" and ("max_completion_tokens" in extra or "top_logprobs" in extra):
                continue
            status, answer = await request(dep, "POST", f"{dep.fe_open.url}{path}", {**base, **extra})
            assert status < 500, (path, extra, answer)
            if extra in refused:
                assert 400 <= status < 500, (path, extra, answer)
            if status != 200:
                assert_error(status, answer, status)


async def test_unauthenticated_body_is_not_read(dep: Deployment) -> None:
    """Without a key the 401 comes before the body is read: a body larger than the limit
    still gets 401, not 413."""
    status, body = await request(dep, "POST", f"{dep.fe_keys.url}/v1/completions", b"x" * 5_000_000)
    assert_error(status, body, 401)


async def test_chunked_and_truncated_bodies(dep: Deployment) -> None:
    """A chunked body past the limit is a 413 too; a body cut short (the client closes
    its side mid-body) breaks nothing: the frontend answers the next request."""
    url = f"{dep.fe_open.url}/v1/completions"

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"model": "mock-model", "prompt": "'
        for _ in range(20):
            yield b"a" * 10_000
        yield b'"}'

    async with dep.http.post(url, data=chunks(), headers={"Content-Type": "application/json"}) as response:
        assert response.status == 413 and (await response.json())["error"]["code"] == "request_too_large"

    reader, writer = await asyncio.open_connection("127.0.0.1", dep.fe_open.port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"model\": \"mock-model\", \"pro")
    await writer.drain()
    writer.write_eof()
    answer = await asyncio.wait_for(reader.read(), 10)  # the server closes (or answers 400): never hangs
    assert not answer or answer.startswith(b"HTTP/1.1 4"), answer[:200]
    writer.close()
    status, body = await request(dep, "POST", url, {"model": MODEL, "prompt": PROMPT, "max_tokens": 1})
    assert status == 200, body
    for fe in (dep.fe_open, dep.fe_keys, dep.fe_env):  # after every test of the module: no 500 was logged
        log = fe.log_text()
        assert "unhandled_error" not in log and "Traceback" not in log, fe.log_tail()
