"""Request decoding/validation, error bodies, sampling mapping and response shapes."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from dynrt.frontend import errors
from dynrt.frontend.errors import OpenAIError
from dynrt.frontend.openai_protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatChoice,
    AssistantMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    UsageInfo,
    decode_chat_request,
    decode_completion_request,
)
from dynrt.frontend.sampling import to_sampling_params
from dynrt.runtime.protocol import SamplingParams

MESSAGES = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "messages": MESSAGES, **fields}).encode()


def completion(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "prompt": "hi", **fields}).encode()


def chat_error(body: bytes) -> OpenAIError:
    with pytest.raises(OpenAIError) as info:
        decode_chat_request(body)
    return info.value


def completion_error(body: bytes) -> OpenAIError:
    with pytest.raises(OpenAIError) as info:
        decode_completion_request(body)
    return info.value


def body_of(error: OpenAIError) -> dict[str, Any]:
    body = json.loads(error.to_body())
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# --- decoding: accepted requests --------------------------------------------------


def test_chat_request_full() -> None:
    req = decode_chat_request(
        chat(
            messages=[
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": None},
            ],
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=5,
            max_completion_tokens=7,
            temperature=0,
            top_p=0.5,
            top_k=40,
            seed=3,
            stop="END",
            n=1,
            ignore_eos=True,
            min_tokens=2,
            user="u",
            presence_penalty=0.5,
            frequency_penalty=-0.5,
            logprobs=False,
            tools=[],
            tool_choice="none",
            response_format={"type": "text"},
            metadata={"k": "v"},
            store=False,
            service_tier="auto",
        )
    )
    assert isinstance(req, ChatCompletionRequest)
    assert req.stream and req.include_usage()
    assert req.stop_strings() == ["END"]
    assert req.requested_max_tokens() == (7, "max_completion_tokens")
    assert req.template_messages() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": ""},
    ]


def test_chat_defaults() -> None:
    req = decode_chat_request(chat())
    assert not req.stream and not req.include_usage()
    assert req.stop_strings() == []
    assert req.requested_max_tokens() == (None, "max_tokens")


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("hello", ["hello"]), (["hello"], ["hello"]), ([1, 2, 3], [[1, 2, 3]]), ([[4, 5]], [[4, 5]]),
     (["a", "b"], ["a", "b"]), ([[1], [2, 3]], [[1], [2, 3]])],
)
def test_completion_prompt_forms(prompt: Any, expected: list[str | list[int]]) -> None:
    req = decode_completion_request(completion(prompt=prompt, stop=["a", "b"], echo=False))
    assert isinstance(req, CompletionRequest)
    assert req.prompt_inputs() == expected
    assert req.stop_strings() == ["a", "b"]


# --- decoding: errors -------------------------------------------------------------


@pytest.mark.parametrize("body", [b"{bad json", b"", b'{"model": "m",', b"\xff\xfe"])
def test_malformed_json(body: bytes) -> None:
    error = chat_error(body)
    assert error.status == 400
    detail = body_of(error)
    assert detail["type"] == "invalid_request_error"
    assert detail["param"] is None
    assert detail["message"].startswith("The request body is not valid JSON")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"[]", None),
        (chat(messages=[{"role": 5, "content": "x"}]), "messages[0].role"),
        (chat(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
        (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
        (chat(messages=[{"role": "user", "content": [{"type": "text", "text": 1}]}]), "messages[0].content[0].text"),
        (chat(messages="hi"), "messages"),
        (chat(max_tokens="5"), "max_tokens"),
        (chat(max_tokens=0), "max_tokens"),
        (chat(max_completion_tokens=-1), "max_completion_tokens"),
        (chat(temperature=2.5), "temperature"),
        (chat(temperature=-0.1), "temperature"),
        (chat(top_p=0), "top_p"),
        (chat(top_p=1.5), "top_p"),
        (chat(top_k=-2), "top_k"),
        (chat(min_tokens=-1), "min_tokens"),
        (chat(presence_penalty=3), "presence_penalty"),
        (chat(frequency_penalty=-3), "frequency_penalty"),
        (chat(stream="yes"), "stream"),
        (chat(stream=True, stream_options={"include_usage": "yes"}), "stream_options.include_usage"),
        (chat(stop=[1]), "stop[0]"),
        (chat(seed=1.5), "seed"),
        (chat(n=0), "n"),
        (chat(model=3), "model"),
    ],
)
def test_wrong_type_or_value_names_param(body: bytes, param: str | None) -> None:
    error = chat_error(body)
    assert error.status == 400
    detail = body_of(error)
    assert detail["type"] == "invalid_request_error"
    assert detail["param"] == param
    assert "Traceback" not in detail["message"]
    if param:
        assert f"'{param}'" in detail["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
        (b'{"model": "m"}', "messages"),
        (chat(messages=[{"content": "x"}]), "messages[0].role"),
        (chat(messages=[{"role": "user"}]), "messages[0].content"),
        (chat(messages=[{"role": "user", "content": [{"text": "x"}]}]), "messages[0].content[0].type"),
    ],
)
def test_missing_field_names_it(body: bytes, param: str) -> None:
    error = chat_error(body)
    assert (error.status, error.param) == (400, param)
    assert "missing required field" in body_of(error)["message"]


def test_missing_prompt() -> None:
    error = completion_error(b'{"model": "m"}')
    assert (error.status, error.param) == (400, "prompt")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0].type",
        ),
    ],
)
# tools, tool_choice, response_format and history tool_calls are supported now:
# tests/unit/test_chat_tools.py and test_structured_output.py.
def test_chat_unsupported_fields_rejected(fields: dict[str, Any], param: str) -> None:
    error = chat_error(chat(**fields))
    assert error.status == 400
    detail = body_of(error)
    assert detail == {
        "message": detail["message"],
        "type": "invalid_request_error",
        "param": param,
        "code": "unsupported_parameter",
    }
    assert param in detail["message"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"echo": True, "logprobs": 1}, "echo"),
        ({"suffix": "tail"}, "suffix"),
        ({"best_of": 2}, "best_of"),
        ({"stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options.continuous_usage_stats"),
        ({"spaces_between_special_tokens": False}, "spaces_between_special_tokens"),
    ],
)
def test_completion_unsupported_fields_rejected(fields: dict[str, Any], param: str) -> None:
    error = completion_error(completion(**fields))
    assert (error.status, error.param, error.code) == (400, param, "unsupported_parameter")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": []}, "messages"),
        ({"stop": ""}, "stop"),
        ({"stop": [str(i) for i in range(17)]}, "stop"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text"),
    ],
)
def test_chat_invalid_values(fields: dict[str, Any], param: str) -> None:
    error = chat_error(chat(**fields))
    assert (error.status, error.param, error.type) == (400, param, "invalid_request_error")


@pytest.mark.parametrize("prompt", [[1, "a"], ["a", 1], [-1, 2], {"a": 1}, 5])
def test_completion_bad_prompt(prompt: Any) -> None:
    error = completion_error(completion(prompt=prompt))
    assert error.status == 400
    assert error.param is not None and error.param.startswith("prompt")


# --- errors module ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status", "type_", "param", "code", "headers"),
    [
        (errors.bad_request("bad", "x"), 400, "invalid_request_error", "x", None, {}),
        (errors.unauthorized(), 401, "invalid_request_error", None, "invalid_api_key", {"WWW-Authenticate": "Bearer"}),
        (errors.model_not_found("gpt"), 404, "invalid_request_error", "model", "model_not_found", {}),
        (errors.body_too_large(4 << 20), 413, "invalid_request_error", None, "request_too_large", {}),
        (errors.overloaded(2.5), 503, "server_error", None, "overloaded", {"Retry-After": "3"}),
        (errors.no_instances("m", 1), 503, "server_error", None, "no_instances", {"Retry-After": "1"}),
        (
            errors.context_length_exceeded(100, 90, 20, "max_tokens"),
            400,
            "invalid_request_error",
            "max_tokens",
            "context_length_exceeded",
            {},
        ),
        (errors.internal(), 500, "server_error", None, "internal_error", {}),
        (errors.not_found("/x"), 404, "invalid_request_error", None, "not_found", {}),
        (errors.method_not_allowed("GET", "/x"), 405, "invalid_request_error", None, "method_not_allowed", {}),
        (errors.draining(), 503, "service_unavailable", None, "draining", {"Retry-After": "1"}),
        (errors.worker_failed("gone"), 503, "service_unavailable", None, "worker_failed", {"Retry-After": "1"}),
        # What admission and the migration layer raise, as the client sees it.
        (errors.to_openai(errors.Overloaded(2.5)), 503, "server_error", None, "overloaded", {"Retry-After": "3"}),
        (errors.to_openai(errors.NoLiveInstance("m")), 503, "server_error", None, "no_instances", {"Retry-After": "2"}),
        (errors.to_openai(errors.InvalidRequest("bad ids")), 400, "invalid_request_error", None, None, {}),
        (
            errors.to_openai(errors.MigrationExhausted("the migration limit (3) is reached")),
            503,
            "service_unavailable",
            None,
            "worker_failed",
            {"Retry-After": "1"},
        ),
    ],
)
def test_error_constructors(
    error: OpenAIError, status: int, type_: str, param: str | None, code: str | None, headers: dict[str, str]
) -> None:
    assert error.status == status
    assert error.headers == headers
    detail = body_of(error)
    assert detail == {"message": error.message, "type": type_, "param": param, "code": code}
    assert detail["message"]


def test_error_messages() -> None:
    assert "gpt" in errors.model_not_found("gpt").message
    assert "4194304" in errors.body_too_large(4 << 20).message
    message = errors.context_length_exceeded(100, 90, 20, "max_tokens").message
    assert "100" in message and "110" in message
    assert "Traceback" not in errors.internal().message
    assert errors.to_openai(errors.InvalidRequest("bad ids")).message == "bad ids"
    assert errors.worker_failed("gone").message == "The request could not be completed: gone"


# --- sampling params ----------------------------------------------------------------


def params(body: bytes, prompt_len: int = 10, context: int = 100, default: int = 50) -> SamplingParams:
    req = decode_chat_request(body)
    return to_sampling_params(
        req, prompt_len=prompt_len, context_length=context, default_max_tokens=default, stop_token_ids=[2, 7],
        vocab_size=1000,
    )


def test_sampling_mapping() -> None:
    sp = params(chat(max_tokens=20, temperature=0.5, top_p=0.9, top_k=5, seed=7, min_tokens=3, ignore_eos=True))
    assert sp == SamplingParams(
        max_tokens=20,
        min_tokens=3,
        temperature=0.5,
        top_p=0.9,
        top_k=5,
        seed=7,
        stop_token_ids=[2, 7],
        ignore_eos=True,
    )


def test_sampling_defaults() -> None:
    sp = params(chat())
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.seed) == (50, 1.0, 1.0, -1, None)
    assert params(chat(top_k=0)).top_k == -1


def test_max_completion_tokens_wins() -> None:
    assert params(chat(max_tokens=5, max_completion_tokens=9)).max_tokens == 9
    assert params(chat(max_tokens=5)).max_tokens == 5


def test_default_max_tokens_capped_by_context() -> None:
    assert params(chat(), prompt_len=90, context=100, default=50).max_tokens == 10
    assert params(chat(), prompt_len=10, context=100, default=50).max_tokens == 50


def test_context_length_exceeded() -> None:
    with pytest.raises(OpenAIError) as info:
        params(chat(max_tokens=91), prompt_len=10, context=100)
    assert (info.value.status, info.value.param, info.value.code) == (400, "max_tokens", "context_length_exceeded")
    with pytest.raises(OpenAIError) as info:
        params(chat(max_completion_tokens=91), prompt_len=10, context=100)
    assert info.value.param == "max_completion_tokens"
    with pytest.raises(OpenAIError) as info:
        params(chat(), prompt_len=100, context=100)
    assert (info.value.param, info.value.code) == ("messages", "context_length_exceeded")
    assert params(chat(max_tokens=90), prompt_len=10, context=100).max_tokens == 90


def test_completion_context_param_and_empty_prompt() -> None:
    req = decode_completion_request(completion())
    with pytest.raises(OpenAIError) as info:
        to_sampling_params(req, prompt_len=100, context_length=100, default_max_tokens=16, stop_token_ids=[],
                           vocab_size=1000)
    assert info.value.param == "prompt"
    with pytest.raises(OpenAIError) as info:
        to_sampling_params(req, prompt_len=0, context_length=100, default_max_tokens=16, stop_token_ids=[],
                           vocab_size=1000)
    assert (info.value.status, info.value.param) == (400, "prompt")


def test_min_tokens_over_max_tokens() -> None:
    with pytest.raises(OpenAIError) as info:
        params(chat(max_tokens=3, min_tokens=4))
    assert (info.value.status, info.value.param) == (400, "min_tokens")


# --- responses ----------------------------------------------------------------------


def test_chat_response_shape() -> None:
    response = ChatCompletionResponse(
        id="chatcmpl-1",
        created=5,
        model="m",
        choices=[ChatChoice(message=AssistantMessage(content="hi"), finish_reason="stop")],
        usage=UsageInfo.of(3, 2, cached_tokens=1),
    )
    assert json.loads(msgspec.json.encode(response)) == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 5,
        "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "logprobs": None, "finish_reason": "stop"}
        ],
        "usage": {
            "prompt_tokens": 3,
            "completion_tokens": 2,
            "total_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 1},
        },
    }


def test_completion_response_shape() -> None:
    response = CompletionResponse(
        id="cmpl-1",
        created=5,
        model="m",
        choices=[CompletionChoice(text="hi", finish_reason="length")],
        usage=UsageInfo.of(3, 2),
    )
    decoded = json.loads(msgspec.json.encode(response))
    assert decoded["object"] == "text_completion"
    assert decoded["choices"] == [{"index": 0, "text": "hi", "logprobs": None, "finish_reason": "length"}]
    assert decoded["usage"]["total_tokens"] == 5


def test_models_list_shape() -> None:
    models = ModelList(data=[ModelCard(id="m", created=1)])
    assert json.loads(msgspec.json.encode(models)) == {
        "object": "list",
        "data": [{"id": "m", "object": "model", "created": 1, "owned_by": "dynrt", "max_model_len": None}],
    }


def test_openai_client_types_parse_responses() -> None:
    """The official client's own models accept our bodies."""
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    chat_body = ChatCompletionResponse(
        id="chatcmpl-1",
        created=5,
        model="m",
        choices=[ChatChoice(message=AssistantMessage(content="hi"), finish_reason="stop")],
        usage=UsageInfo.of(3, 2),
    )
    parsed = ChatCompletion.model_validate_json(msgspec.json.encode(chat_body))
    assert parsed.choices[0].message.content == "hi"
    completion_body = CompletionResponse(
        id="cmpl-1",
        created=5,
        model="m",
        choices=[CompletionChoice(text="x", finish_reason="stop")],
        usage=UsageInfo.of(1, 1),
    )
    assert Completion.model_validate_json(msgspec.json.encode(completion_body)).choices[0].text == "x"


# --- issue 16: every sampling field, unknown fields, logprobs, n ----------------------


def test_every_sampling_field_is_mapped() -> None:
    sp = params(chat(temperature=0.3, top_p=0.8, top_k=7, min_p=0.05, presence_penalty=0.5, frequency_penalty=-1,
                     repetition_penalty=1.2, logit_bias={"5": 250, "6": -3.5}, seed=11, stop_token_ids=[9, 2],
                     allowed_token_ids=[5, 6, 9], bad_words=["bad"], logprobs=True, top_logprobs=3, min_tokens=1,
                     max_completion_tokens=12))
    assert sp == SamplingParams(
        max_tokens=12, min_tokens=1, temperature=0.3, top_p=0.8, top_k=7, min_p=0.05, presence_penalty=0.5,
        frequency_penalty=-1.0, repetition_penalty=1.2, logit_bias={5: 100.0, 6: -3.5},  # clamped as vLLM does
        allowed_token_ids=[5, 6, 9], bad_words=["bad"], seed=11, stop_token_ids=[9, 2, 7], logprobs=3)
    assert params(chat(logprobs=True)).logprobs == 0  # the sampled token's only
    assert params(chat()).logprobs is None
    comp = decode_completion_request(completion(logprobs=2))
    assert to_sampling_params(comp, prompt_len=1, context_length=100, default_max_tokens=4, stop_token_ids=[],
                              vocab_size=10).logprobs == 2


@pytest.mark.parametrize(("fields", "param"), [
    ({"logit_bias": {"1000": 1}}, "logit_bias"), ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"allowed_token_ids": [999, 1000]}, "allowed_token_ids"), ({"stop_token_ids": [1000]}, "stop_token_ids"),
])
def test_token_ids_checked_against_the_vocabulary(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(OpenAIError) as info:
        params(chat(**fields))
    assert (info.value.status, info.value.param) == (400, param)
    assert "1000" in info.value.message or "-1" in info.value.message


@pytest.mark.parametrize(("fields", "param"), [
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"top_logprobs": 3}, "top_logprobs"),  # needs logprobs=true, as in vLLM
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),  # vLLM's default max_logprobs is 20
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -2}, "top_logprobs"),
    ({"min_p": 1.5}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"temperature": 2.5}, "temperature"),
    ({"top_k": -2}, "top_k"), ({"bad_words": [""]}, "bad_words"), ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids[0]"), ({"n": 0}, "n"), ({"n": 129}, "n"),
    ({"n": 2, "temperature": 0}, "n"),  # vLLM: n must be 1 when using greedy sampling
])
def test_sampling_values_refused_as_vllm_refuses_them(fields: dict[str, Any], param: str) -> None:
    error = chat_error(chat(**fields))
    assert (error.status, error.param) == (400, param)


def test_completion_logprobs_limit_and_echo() -> None:
    assert completion_error(completion(logprobs=21)).param == "logprobs"
    assert decode_completion_request(completion(logprobs=20)).top_logprobs_count() == 20
    assert decode_completion_request(completion(echo=True, best_of=1)).echo
    assert completion_error(completion(prompt=["a", [1]])).param == "prompt"
    assert completion_error(completion(prompt=["a", ""])).param == "prompt"
    assert completion_error(completion(prompt=["a"] * 65, n=2)).param == "n"  # 130 choices


@pytest.mark.parametrize(("body", "param"), [
    (chat(repetition_penalti=1), "repetition_penalti"),
    (chat(guided_jsn={}), "guided_jsn"),
    (chat(stream=True, stream_options={"include_usage": True, "extra": 1}), "stream_options.extra"),
    (chat(messages=[{"role": "user", "content": "x", "extra": 1}]), "messages[0].extra"),
    (chat(messages=[{"role": "user", "content": [{"type": "text", "text": "x", "extra": 1}]}]),
     "messages[0].content[0].extra"),
    (completion(best_of=1, use_beam_search=False), "use_beam_search"),
])
def test_unknown_fields_are_named(body: bytes, param: str) -> None:
    decode = decode_completion_request if b'"prompt"' in body else decode_chat_request
    with pytest.raises(OpenAIError) as info:
        decode(body)
    detail = body_of(info.value)
    assert (info.value.status, detail["param"], detail["code"]) == (400, param, "unknown_parameter")
    assert param in detail["message"]


def test_pass_through_fields_are_accepted() -> None:
    from dynrt.frontend.openai_protocol import PASS_THROUGH_FIELDS

    values = {"user": "u", "metadata": {"a": "b"}, "store": True, "service_tier": "default",
              "prompt_cache_key": "k", "safety_identifier": "s"}
    assert set(values) == set(PASS_THROUGH_FIELDS)
    decode_chat_request(chat(**values))
    decode_completion_request(completion(**values))
    decode_chat_request(chat(stream=True, stream_options={"include_usage": True, "include_obfuscation": False}))


def test_completion_max_tokens_defaults_to_16_as_in_vllm() -> None:
    req = decode_completion_request(completion())
    assert to_sampling_params(req, prompt_len=1, context_length=100, default_max_tokens=50, stop_token_ids=[],
                              vocab_size=10).max_tokens == 16
    req = decode_completion_request(completion(max_tokens=None))  # explicit null: fill the context
    assert to_sampling_params(req, prompt_len=1, context_length=100, default_max_tokens=50, stop_token_ids=[],
                              vocab_size=10).max_tokens == 50


def test_nulls_accepted_where_vllm_accepts_them() -> None:
    req = decode_chat_request(chat(stream=None, logprobs=None, top_logprobs=None, n=None, stop=None, seed=None))
    assert not req.stream and req.top_logprobs_count() is None and req.num_choices() == 1
    assert not decode_completion_request(completion(echo=None, logprobs=None, stream=None)).echo
