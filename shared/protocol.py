"""Wire protocol between the cachemgr daemon (ZeroMQ ROUTER) and compute workers (DEALER).

Every frame is one msgpack-encoded msgspec Struct from a tagged union, one union per direction.
Token and page id arrays are raw little-endian int32 bytes (see shared.ids); request ids are 16 raw
bytes. Nothing is ever pickled.

Request lifecycle (worker's view)::

    daemon                                   worker
      | --- Dispatch(tokens, prefix pages, new pages) --> |  prefill the uncached suffix only
      | <-- Commit(tokens[:k*page], pages[:k]) ---------- |  after the kernels that wrote them finished
      | --- CommitAck(pages now backing the prefix) ----> |  use these ids from now on
      | <-- Generated(token ids) ... -------------------- |  streamed, a few tokens per frame
      | <-- PageRequest(n) ------------------------------ |  decode ran out of pages (chunks, not per token)
      | --- PagesGranted(ids) --------------------------> |
      | <-- Finished(reason, final commit) -------------- |  daemon commits full pages, releases the lease
"""

from __future__ import annotations

import enum

import msgspec

# 2: Dispatch.num_generated, Generated logprobs, SamplingParams.logprobs
# 3: SamplingParams penalties (presence, frequency, repetition), min_p, logit_bias, min_tokens,
#    prompt_logprobs; the PromptLogprobs message
# 4: SamplingParams.structured (grammar-constrained output)
PROTOCOL_VERSION = 5  # 5: Register.ready / Heartbeat.ready (a worker warming up takes no requests)
MAX_FRAME_BYTES = 64 * 1024 * 1024  # anything larger is dropped unread


class ErrorCode(enum.Enum):
    MALFORMED = "malformed"  # undecodable bytes, unknown tag, wrong field types
    BAD_VERSION = "bad_version"
    NOT_REGISTERED = "not_registered"
    UNKNOWN_REQUEST = "unknown_request"
    BAD_PAGES = "bad_pages"  # page ids not in the sender's lease, or not matching the tokens
    NO_ROOM = "no_room"
    TOO_LARGE = "too_large"
    INTERNAL = "internal"


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS or a stop string / stop token
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"  # the daemon aborted it (client gone) or an error


MAX_TOP_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI's top_logprobs limit)
MAX_LOGIT_BIAS_TOKENS = 1024  # entries of logit_bias a request may carry
MAX_STRUCTURED_SPEC_CHARS = 64 * 1024  # a JSON schema, regex or grammar a request may carry
STRUCTURED_KINDS = ("json_schema", "regex", "ebnf")


class StructuredOutput(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a request's output must match: a JSON schema (as JSON text), a regular expression or an EBNF
    grammar (xgrammar's dialect). Workers compile it against their vocabulary and mask every token that
    cannot continue a match (computeworker.engine.structured)."""

    kind: str  # one of STRUCTURED_KINDS
    spec: str


class SamplingParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Decoding parameters (OpenAI semantics, plus vLLM's top_k, min_p, repetition_penalty, min_tokens,
    stop_token_ids and ignore_eos). temperature 0 means greedy. The logits a token is drawn from are the
    model's, plus logit_bias, with EOS and stop tokens banned before min_tokens, then the repetition,
    frequency and presence penalties over the tokens generated so far (repetition: prompt tokens too);
    then the structured output's mask (tokens that cannot continue a match removed); then temperature,
    min_p, top-k and top-p (computeworker.engine.logits_processing, .structured and .sampling)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    # -1: none; k >= 0: each output token's log-probability and its k most likely alternatives
    logprobs: int = -1
    presence_penalty: float = 0.0  # subtracted once from every token generated so far
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # divides positive (multiplies negative) logits of seen tokens
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one
    logit_bias: dict[int, float] = {}  # token id -> added to its logit
    min_tokens: int = 0  # EOS and stop_token_ids are banned until this many tokens are generated
    # -1: none; k >= 0: each prompt token's log-probability given the tokens before it, and the k most
    # likely tokens there (legacy completions' echo + logprobs). The whole prompt is computed: no cache hit.
    prompt_logprobs: int = -1
    structured: StructuredOutput | None = None  # the output must match it (see StructuredOutput)

    def validate(self) -> None:
        """Raise ValueError with a user-facing message for out-of-range values (the message starts with
        the field's name)."""
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError("temperature must be in [0, 100]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if len(self.stop) > 16 or any(not s or len(s) > 256 for s in self.stop):
            raise ValueError("stop: at most 16 non-empty strings of at most 256 characters")
        if not -1 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be -1 (off) or between 0 and {MAX_TOP_LOGPROBS}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise ValueError("repetition_penalty must be in (0, 10]")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError("min_p must be in [0, 1]")
        if len(self.logit_bias) > MAX_LOGIT_BIAS_TOKENS:
            raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS_TOKENS} tokens")
        if any(t < 0 for t in self.logit_bias) or any(
            not -100.0 <= b <= 100.0 for b in self.logit_bias.values()
        ):
            raise ValueError("logit_bias maps token ids to numbers in [-100, 100]")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError("min_tokens must be between 0 and max_tokens")
        if not -1 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"prompt_logprobs must be -1 (off) or between 0 and {MAX_TOP_LOGPROBS}")
        if self.structured is not None:
            self._validate_structured(self.structured)

    def _validate_structured(self, structured: StructuredOutput) -> None:
        if structured.kind not in STRUCTURED_KINDS:
            raise ValueError(f"structured output kind must be one of {', '.join(STRUCTURED_KINDS)}")
        if not 0 < len(structured.spec) <= MAX_STRUCTURED_SPEC_CHARS:
            raise ValueError(f"structured output: 1 to {MAX_STRUCTURED_SPEC_CHARS} characters of spec")
        # A grammar decides when the output ends: nothing may hold back or ignore its end of sequence.
        if self.min_tokens:
            raise ValueError("min_tokens cannot be combined with a structured output format")
        if self.ignore_eos:
            raise ValueError("ignore_eos cannot be combined with a structured output format")

    @property
    def processes_logits(self) -> bool:
        """Whether anything changes the model's logits before temperature (see the class docstring);
        min_tokens alone counts, because it bans tokens."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
            or self.min_tokens
        )


class PoolDescriptor(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How a worker maps the KV pool: a shared-memory file (CPU) or a CUDA IPC handle (GPU)."""

    kind: str  # "shm" | "cuda_ipc"
    num_layers: int
    num_pages: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    shm_path: str = ""  # kind == "shm": a file under /dev/shm
    ipc_handle: bytes = b""  # kind == "cuda_ipc": cudaIpcMemHandle_t (64 bytes)
    device_index: int = 0
    device_uuid: str = ""
    num_bytes: int = 0
    generation: int = 0  # bumps on every daemon start: a reconnecting worker remaps


# ---------------------------------------------------------------- worker -> daemon


class Register(msgspec.Struct, frozen=True, tag="register", forbid_unknown_fields=True):
    protocol_version: int
    pid: int
    device: str  # "cpu", "cuda:0", ...
    max_running: int  # requests it batches at once
    model: str
    name: str = ""
    pid_namespace: int = 0  # shared.process_identity.pid_namespace_id(); 0 = unknown
    # False: still warming up (mapping the pool, compiling kernels, capturing graphs): the daemon gives it
    # no request until a Heartbeat says ready.
    ready: bool = True


class Heartbeat(msgspec.Struct, frozen=True, tag="heartbeat", forbid_unknown_fields=True):
    """Load report, every heartbeat interval. ``steps_done`` counts the engine steps completed since the
    worker started (0 from workers that do not count): the daemon's stall watchdog reads progress from it,
    since heartbeats alone also come from a worker whose compute is stuck."""

    num_running: int
    num_waiting: int
    kv_tokens_in_use: int = 0
    steps_done: int = 0
    ready: bool = True  # False while the worker warms up (see Register.ready)


class Commit(msgspec.Struct, frozen=True, tag="commit", forbid_unknown_fields=True):
    """Make full pages visible to other requests. tokens are from position 0, page-aligned; page_ids back
    them one per page. Sent only after the kernels that wrote those pages have completed."""

    request_id: bytes
    tokens: bytes
    page_ids: bytes


class PageRequest(msgspec.Struct, frozen=True, tag="page_request", forbid_unknown_fields=True):
    request_id: bytes
    num_pages: int


class Generated(msgspec.Struct, frozen=True, tag="generated", forbid_unknown_fields=True):
    """New output tokens of one request (a few per frame: no per-token round trip is required). When the
    request asked for logprobs (k = SamplingParams.logprobs >= 0): ``logprobs`` is one float32 per token
    (its log-probability under the model), ``top_ids`` / ``top_logprobs`` are k int32 / float32 per token
    (the k most likely tokens at that position, most likely first); all little-endian."""

    request_id: bytes
    tokens: bytes
    logprobs: bytes = b""
    top_ids: bytes = b""
    top_logprobs: bytes = b""


class PromptLogprobs(msgspec.Struct, frozen=True, tag="prompt_logprobs", forbid_unknown_fields=True):
    """For a request with SamplingParams.prompt_logprobs = k >= 0, sent once, after its prompt is computed
    and before its first Generated frame: for prompt tokens 1..n-1 (the first has no context), each one's
    float32 log-probability given the tokens before it, and k int32 ids / float32 log-probabilities of the
    most likely tokens at its position; little-endian."""

    request_id: bytes
    logprobs: bytes
    top_ids: bytes = b""
    top_logprobs: bytes = b""


class Finished(msgspec.Struct, frozen=True, tag="finished", forbid_unknown_fields=True):
    """The request is done. The daemon commits tokens/page_ids (full pages of prompt + output) and
    releases the lease. Sent after the last Generated frame of the request."""

    request_id: bytes
    reason: FinishReason
    tokens: bytes = b""
    page_ids: bytes = b""
    stop_text: str = ""  # the stop string that ended it, if any


class WorkerError(msgspec.Struct, frozen=True, tag="worker_error", forbid_unknown_fields=True):
    """The worker failed a request (request_id set) or itself (empty request_id)."""

    code: ErrorCode
    message: str
    request_id: bytes = b""


class Goodbye(msgspec.Struct, frozen=True, tag="goodbye", forbid_unknown_fields=True):
    """Clean shutdown: the daemon re-dispatches anything still running on this worker."""

    reason: str = ""


WorkerToDaemon = (
    Register
    | Heartbeat
    | Commit
    | PageRequest
    | Generated
    | PromptLogprobs
    | Finished
    | WorkerError
    | Goodbye
)

# ---------------------------------------------------------------- daemon -> worker


class Welcome(msgspec.Struct, frozen=True, tag="welcome", forbid_unknown_fields=True):
    protocol_version: int
    worker_id: int
    pool: PoolDescriptor
    model: str
    heartbeat_interval_s: float
    decode_page_chunk: int  # pages to ask for at once while decoding


class Dispatch(msgspec.Struct, frozen=True, tag="dispatch", forbid_unknown_fields=True):
    """Run one request. Positions [0, matched_len) are cached in prefix_page_ids (read-only, shared);
    compute [matched_len, len(tokens)) writing K/V into new_page_ids, in order::

        tokens:  |<---- matched_len ---->|<------ suffix ------>|
        pages:   | prefix_page_ids ...   | new_page_ids ...  (+ spare pages for decoding)
    """

    request_id: bytes
    tokens: bytes
    matched_len: int
    prefix_page_ids: bytes
    new_page_ids: bytes
    sampling: SamplingParams
    attempt: int = 0  # > 0 when re-dispatched after a worker died
    # The last num_generated of `tokens` were generated by earlier attempts (streamed already): the
    # request's sampling stream resumes after them (computeworker.engine.sampling.uniform).
    num_generated: int = 0


class CommitAck(msgspec.Struct, frozen=True, tag="commit_ack", forbid_unknown_fields=True):
    """page_ids now back the committed tokens: where another request committed the same tokens first,
    the tree's pages replace the sender's (whose duplicates are freed)."""

    request_id: bytes
    page_ids: bytes


class PagesGranted(msgspec.Struct, frozen=True, tag="pages_granted", forbid_unknown_fields=True):
    request_id: bytes
    page_ids: bytes


class Abort(msgspec.Struct, frozen=True, tag="abort", forbid_unknown_fields=True):
    request_id: bytes
    reason: str = ""


class Shutdown(msgspec.Struct, frozen=True, tag="shutdown", forbid_unknown_fields=True):
    reason: str = ""


class ErrorReply(msgspec.Struct, frozen=True, tag="error", forbid_unknown_fields=True):
    """A typed error for a message the daemon could not accept. Nothing changed on the daemon."""

    code: ErrorCode
    message: str
    request_id: bytes = b""


DaemonToWorker = Welcome | Dispatch | CommitAck | PagesGranted | Abort | Shutdown | ErrorReply


class Codec:
    """One encoder and one typed decoder per direction (msgspec caches the schema)."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._to_daemon = msgspec.msgpack.Decoder(WorkerToDaemon)
        self._to_worker = msgspec.msgpack.Decoder(DaemonToWorker)

    def encode(self, msg: WorkerToDaemon | DaemonToWorker) -> bytes:
        return self._encoder.encode(msg)

    def decode_from_worker(self, data: bytes) -> WorkerToDaemon:
        """Raises ValueError on anything malformed: msgspec.DecodeError / ValidationError, or a
        UnicodeDecodeError (msgspec raises it as is for invalid UTF-8 in a field name)."""
        return self._to_daemon.decode(data)

    def decode_from_daemon(self, data: bytes) -> DaemonToWorker:
        return self._to_worker.decode(data)
