"""Wire protocol: every message that crosses NATS or etcd, as msgspec Structs.

Frames on a response stream and messages on a control subject are tagged unions
(``tag_field="t"``) so one decoder handles every kind. Everything is encoded with
msgpack (``encode``/``decode_*`` below); etcd values are JSON so operators can read
them with ``etcdctl``.
"""

from __future__ import annotations

from typing import Literal

import msgspec

# ---------------------------------------------------------------------------
# Generate request (frontend -> worker)
# ---------------------------------------------------------------------------


class StructuredOutput(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Constrained decoding, passed to vLLM's structured output backend
    (``vllm.sampling_params.StructuredOutputsParams``). Exactly one of the constraint
    fields is set. ``json`` is the JSON schema as JSON text (the wire carries no
    free-form objects)."""

    json: str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    structural_tag: str | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """Sampling parameters, mapped 1:1 onto the engine's (vLLM's names and defaults).

    Stop strings, ``include_stop_str_in_output`` and ``skip_special_tokens`` are not
    here: the frontend detokenizes and applies them. ``logprobs``: ``None`` = no
    logprobs; ``k >= 0`` = the sampled token's logprob and the ``k`` most likely."""

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    seed: int | None = None
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int | None = None
    structured: StructuredOutput | None = None


class GenerateRequest(msgspec.Struct, kw_only=True):
    """Generate from token ids. A migrated request carries prompt + generated ids so far
    in ``token_ids`` and ``sampling.max_tokens`` reduced by what was already produced;
    ``num_prior_output_tokens`` tells the engine how many of ``token_ids`` are output:
    the engine must treat them as output, not prompt, wherever that matters
    (presence/frequency penalties count them; a structured-output grammar is advanced
    over them before the first new token)."""

    request_id: str
    model: str
    token_ids: list[int]
    sampling: SamplingParams
    frontend_id: str = ""
    num_prior_output_tokens: int = 0
    attempt: int = 0
    # The standalone router that chose this instance ("" = the frontend's own router).
    # The worker counts received requests under it as well as under ``frontend_id``
    # (``LoadReport.received``).
    router_id: str = ""
    # Resumable stream (issue 18): > 0 = when its frontend goes away (its etcd key
    # vanishes, or a ``Cancel(mode="detach")``) the worker keeps generating for this
    # many seconds, keeping the output, so a frontend can reattach (a request with the
    # ``Dynrt-Reattach-From`` header, runtime/endpoint.py). 0 = aborted as before.
    resume_grace: float = 0.0


# ---------------------------------------------------------------------------
# Response frames (worker -> frontend, on the per-request reply subject)
# ---------------------------------------------------------------------------


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


FinishReason = Literal["stop", "length", "cancelled", "abort"]


class TokenLogprobs(msgspec.Struct, frozen=True, array_like=True):
    """Logprobs of one generated token: the sampled token's, then the ``k`` most likely
    tokens' ids and logprobs, most likely first (``SamplingParams.logprobs == k``; the
    sampled token is among them only if it ranks in the top ``k``). vLLM's OpenAI server
    lists the sampled token first, then these without it: ``k`` entries in chat
    ``top_logprobs``, up to ``k + 1`` in completions ``top_logprobs``."""

    logprob: float
    top_ids: list[int] = []
    top_logprobs: list[float] = []


class TokenFrame(msgspec.Struct, tag="tok", tag_field="t", kw_only=True, omit_defaults=True):
    """New token ids; the last frame of a request carries ``finish_reason``.
    ``logprobs`` (requested ones only) has one entry per id in ``token_ids``."""

    token_ids: list[int]
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    logprobs: list[TokenLogprobs] | None = None


# in_flight: the request id is already being served here (a resumed request routed to
# the worker still running it: the caller reattaches instead).
ErrorCode = Literal["bad_request", "busy", "engine_error", "not_found", "internal", "cancelled", "in_flight"]


class ErrorFrame(msgspec.Struct, tag="err", tag_field="t", kw_only=True):
    """The request failed on the worker. ``code == "busy"`` means retry elsewhere."""

    code: ErrorCode
    message: str


class HeartbeatFrame(msgspec.Struct, tag="hb", tag_field="t"):
    """Sent on an idle stream so the caller can tell a slow stream from a dead one."""


class MigrateFrame(msgspec.Struct, tag="mig", tag_field="t", kw_only=True):
    """The worker is going away (drain timeout passed): continue this request elsewhere."""

    reason: str = "drain"


class EndFrame(msgspec.Struct, tag="end", tag_field="t"):
    """Transport-level end of stream: nothing follows."""


Frame = TokenFrame | ErrorFrame | HeartbeatFrame | MigrateFrame | EndFrame

# ---------------------------------------------------------------------------
# Control messages (on ``{instance subject}.control``)
# ---------------------------------------------------------------------------

CancelMode = Literal["stop", "kill", "detach"]


class Cancel(msgspec.Struct, tag="cancel", tag_field="t", kw_only=True):
    """``stop``: finish after the current step (finish_reason "cancelled").
    ``kill``: abort now. Either frees the request's KV blocks. ``detach`` (resumable
    requests only; others are killed): the caller stops reading but the request goes on
    for its ``resume_grace``, waiting for a frontend to reattach."""

    request_id: str
    mode: CancelMode = "kill"


class Ping(msgspec.Struct, tag="ping", tag_field="t", kw_only=True):
    nonce: int = 0


class Pong(msgspec.Struct, tag="pong", tag_field="t", kw_only=True):
    nonce: int = 0
    instance_id: str = ""
    in_flight: int = 0


class DumpCachedBlocks(msgspec.Struct, tag="dump", tag_field="t"):
    """Ask a worker for every block hash in its prefix cache (router resync)."""


class CachedBlocks(msgspec.Struct, tag="blocks", tag_field="t", kw_only=True):
    instance_id: str
    block_hashes: list[int]
    last_event_id: int


Control = Cancel | Ping | DumpCachedBlocks
ControlReply = Pong | CachedBlocks

# ---------------------------------------------------------------------------
# Discovery records (etcd values, JSON)
# ---------------------------------------------------------------------------


class TokenizerSpec(msgspec.Struct, frozen=True, kw_only=True):
    """How a frontend gets the model's tokenizer: ``mock`` (built in) or ``hf``
    (a Hugging Face tokenizer from ``path``; ``gguf_file`` when it lives in a GGUF)."""

    kind: Literal["mock", "hf"] = "mock"
    path: str = ""
    gguf_file: str = ""


class InstanceRecord(msgspec.Struct, frozen=True, kw_only=True):
    instance_id: str
    namespace: str
    component: str
    endpoint: str
    model: str
    subject: str
    engine: str
    block_size: int
    kv_blocks_total: int
    context_length: int
    max_num_seqs: int
    tokenizer: TokenizerSpec
    host: str = "127.0.0.1"
    pid: int = 0
    system_port: int = 0
    started_at: float = 0.0
    # Set by a worker that is shutting down gracefully: routers stop sending it new
    # requests, but its open streams are left to finish (they migrate only if the key
    # is deleted while they are still open, or on a MigrateFrame).
    draining: bool = False
    # The controller's replica this process is ("" = not launched by a controller).
    replica_id: str = ""
    # Published by a worker while its engine loads (``subject`` is "" then): shown by
    # ``dynrt status``, never routed to; the ready record replaces it. ``started_at`` of
    # a loading record is when loading began.
    loading: bool = False

    @property
    def routable(self) -> bool:
        """A record requests may be sent to (draining ones aside): not a loading one."""
        return bool(self.subject) and not self.loading

    @property
    def control_subject(self) -> str:
        return control_subject(self.subject)


class FrontendRecord(msgspec.Struct, frozen=True, kw_only=True):
    frontend_id: str
    host: str
    http_port: int
    pid: int = 0
    started_at: float = 0.0


# ---------------------------------------------------------------------------
# Router inputs (workers publish; routers consume)
# ---------------------------------------------------------------------------


class KvBlockStored(msgspec.Struct, tag="stored", tag_field="t", kw_only=True):
    """Blocks now in the prefix cache. ``block_hashes`` are chained hashes
    (``dynrt.runtime.block_hash``); ``parent_hash`` is the hash before the first one."""

    block_hashes: list[int]
    parent_hash: int | None = None


class KvBlockRemoved(msgspec.Struct, tag="removed", tag_field="t", kw_only=True):
    block_hashes: list[int]


class KvAllCleared(msgspec.Struct, tag="cleared", tag_field="t"):
    pass


KvEventData = KvBlockStored | KvBlockRemoved | KvAllCleared


class KvEvent(msgspec.Struct, kw_only=True):
    """One cache change; ``event_id`` increases by exactly 1 per worker, so a gap
    tells a router it missed something and must resync."""

    event_id: int
    data: KvEventData


class KvEventBatch(msgspec.Struct, kw_only=True):
    instance_id: str
    model: str
    events: list[KvEvent]


class LoadReport(msgspec.Struct, kw_only=True):
    instance_id: str = ""
    model: str = ""
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    running: int = 0
    waiting: int = 0
    active_prefill_tokens: int = 0
    timestamp: float = 0.0
    # Requests the worker has received since it started (cumulative), per sender: every
    # request counts under its ``frontend_id`` and, if set, its ``router_id``. The load
    # figures above already include every request counted here, so a router drops its
    # pending assignments up to that count (``dynrt.router.cost.PendingAssignments``).
    # ``None``: a worker that does not count (routers then absorb by time).
    received: dict[str, int] | None = None
    # The longest the worker goes between reports, even idle (``--load-heartbeat``):
    # routers take an instance whose reports stop for a few of these as hung
    # (``RouterState.is_suspect``). 0: a worker without a heartbeat, never suspected.
    heartbeat: float = 0.0
    # The worker's recent prefilling steps, fitted as ``prefill_base_seconds +
    # tokens / prefill_tokens_per_s`` (beside its decode batch, when it is decoding now;
    # ``dynrt.worker.prefill_rate``), and the mean wall time of its recent steps: routers
    # project a request's time to first token from them (``dynrt.router.ttft``).
    # 0: unknown (no prefill / no step seen yet, or an engine that cannot measure it).
    prefill_tokens_per_s: float = 0.0
    prefill_base_seconds: float = 0.0
    step_seconds: float = 0.0

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


# ---------------------------------------------------------------------------
# Standalone router (frontend -> `dynrt router`)
# ---------------------------------------------------------------------------


class RouteRequest(msgspec.Struct, kw_only=True):
    model: str
    token_ids: list[int]
    exclude: list[str] = []
    request_id: str = ""
    continuing: bool = False  # a request already streaming (migrating): no TTFT objective


class RouteDecision(msgspec.Struct, kw_only=True):
    """``instance_id`` set: use it. Empty: ``busy`` (all over threshold; retry after
    ``retry_after`` s) or no live instance."""

    instance_id: str = ""
    overlap_blocks: int = 0
    busy: bool = False
    retry_after: float = 0.0
    reason: str = ""
    # The standalone router's id: the frontend copies it into ``GenerateRequest.router_id``.
    router_id: str = ""


class RouteComplete(msgspec.Struct, kw_only=True):
    """A frontend tells the standalone router a request it routed has ended."""

    instance_id: str
    request_id: str


# ---------------------------------------------------------------------------
# Resumable streams: checkpoints in a JetStream key-value bucket
# (runtime/stream_checkpoints.py). One key per request; its messages are a full
# ``StreamCheckpoint`` (written with a rollup header, so it replaces the key's earlier
# messages) followed by ``CheckpointDelta``s, each adding what was generated since.
# ---------------------------------------------------------------------------


class StreamCheckpoint(msgspec.Struct, tag="snap", tag_field="t", kw_only=True):
    """Everything needed to continue a streamed completion on another frontend and
    worker: the prompt, the sampling parameters the frontend sent, the token ids
    generated so far, and the sequence number of the last SSE event the client was
    sent (its id is ``f"{request_id}.{last_event_seq}"``; what the number counts is the
    frontend's: events, or output tokens covered). ``key_hash``: HMAC-SHA256 of the API key
    that started the request, keyed by the request id (never the key itself;
    ``checkpoint_log.api_key_hash``). Times are Unix seconds of the writer's clock."""

    request_id: str
    key_hash: bytes
    model: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    output_token_ids: list[int] = []
    # How many of ``output_token_ids`` each delta the frontend turned into events had,
    # in order: a resuming frontend replays the same deltas, so its SSE events (and
    # their count) come out as the ones the client was sent.
    delta_sizes: list[int] = []
    last_event_seq: int = 0
    instance_id: str = ""  # the worker instance serving it (at the last write)
    frontend_id: str = ""  # the frontend writing it
    created: float = 0.0
    updated: float = 0.0


class CheckpointDelta(msgspec.Struct, tag="delta", tag_field="t", kw_only=True, omit_defaults=True):
    """What changed since the previous message of the key: new output token ids, the
    last SSE event's sequence number now, and the serving instance if it changed
    (migration)."""

    output_token_ids: list[int] = []
    delta_sizes: list[int] = []
    last_event_seq: int = 0
    updated: float = 0.0
    instance_id: str | None = None


CheckpointEntry = StreamCheckpoint | CheckpointDelta


# ---------------------------------------------------------------------------
# Encoding helpers. Encoders/decoders are built once: msgspec is fastest that way.
# ---------------------------------------------------------------------------

_encoder = msgspec.msgpack.Encoder()
encode = _encoder.encode

frame_decoder = msgspec.msgpack.Decoder(Frame)
control_decoder = msgspec.msgpack.Decoder(Control)
control_reply_decoder = msgspec.msgpack.Decoder(ControlReply)
generate_request_decoder = msgspec.msgpack.Decoder(GenerateRequest)
kv_event_batch_decoder = msgspec.msgpack.Decoder(KvEventBatch)
load_report_decoder = msgspec.msgpack.Decoder(LoadReport)
route_request_decoder = msgspec.msgpack.Decoder(RouteRequest)
route_decision_decoder = msgspec.msgpack.Decoder(RouteDecision)
route_complete_decoder = msgspec.msgpack.Decoder(RouteComplete)
checkpoint_entry_decoder = msgspec.msgpack.Decoder(CheckpointEntry)

_json_encoder = msgspec.json.Encoder()
encode_json = _json_encoder.encode
instance_record_decoder = msgspec.json.Decoder(InstanceRecord)
frontend_record_decoder = msgspec.json.Decoder(FrontendRecord)


# ---------------------------------------------------------------------------
# Names (docs/architecture.md, "Names on the wire and in etcd")
# ---------------------------------------------------------------------------


def instance_key(namespace: str, component: str, endpoint: str, instance_id: str) -> str:
    return f"dynrt/{namespace}/instances/{component}/{endpoint}/{instance_id}"


def instances_prefix(namespace: str) -> str:
    return f"dynrt/{namespace}/instances/"


def frontend_key(namespace: str, frontend_id: str) -> str:
    return f"dynrt/{namespace}/frontends/{frontend_id}"


def frontends_prefix(namespace: str) -> str:
    return f"dynrt/{namespace}/frontends/"


def controller_prefix(namespace: str) -> str:
    return f"dynrt/{namespace}/controller/"


def request_subject(namespace: str, component: str, endpoint: str, instance_id: str) -> str:
    return f"dynrt.{namespace}.{component}.{endpoint}.{instance_id}"


def control_subject(request_subject_: str) -> str:
    return f"{request_subject_}.control"


def safe_token(name: str, keep: str = "-_") -> str:
    """``name`` as one token of a name: every character that is neither alphanumeric nor
    in ``keep`` becomes '_'. Model names hold '/', '.', ':'; none may stand inside one
    NATS subject token (the default ``keep``)."""
    return "".join(c if c.isalnum() or c in keep else "_" for c in name)


def kv_events_subject(namespace: str, model: str) -> str:
    return f"dynrt.{namespace}.kv_events.{safe_token(model)}"


def kv_events_subject_wildcard(namespace: str) -> str:
    """Every model's ``kv_events_subject`` (what routers subscribe to)."""
    return f"dynrt.{namespace}.kv_events.*"


def load_subject(namespace: str, model: str) -> str:
    return f"dynrt.{namespace}.load.{safe_token(model)}"


def load_subject_wildcard(namespace: str) -> str:
    """Every model's ``load_subject`` (what routers and the controller subscribe to)."""
    return f"dynrt.{namespace}.load.*"


def router_subject(namespace: str) -> str:
    return f"dynrt.{namespace}.router.route"


def router_complete_subject(namespace: str) -> str:
    return f"dynrt.{namespace}.router.complete"


def stream_checkpoints_bucket(namespace: str) -> str:
    """The JetStream key-value bucket of a namespace's resumable-stream checkpoints
    (bucket names allow letters, digits, '-' and '_')."""
    return f"dynrt_{safe_token(namespace)}_stream_checkpoints"
