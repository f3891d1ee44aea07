"""A scripted compute worker: a real process that speaks the worker protocol without a model.

Run as ``python -m tests.helpers.scripted_worker --daemon ENDPOINT [options]``. It maps the pool,
"computes" by writing ``kv_pattern(token, position)`` into every K/V slot of each position it processes,
and checks the pattern in every prefix page it was handed, so a test can prove that a page written by
one process is read intact by another. Output tokens are ``next_token(sequence)``: a function of the
tokens so far only, so a request re-dispatched to another worker continues exactly where it stopped.

Each noteworthy step is appended as one JSON line to ``--log`` (dispatch, commit_ack, finished, error).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from dataclasses import dataclass, field

import numpy as np
import zmq

from shared.ids import bytes_to_ids, ids_to_bytes
from shared.process_identity import pid_namespace_id
from shared.protocol import (
    PROTOCOL_VERSION,
    Abort,
    Codec,
    Commit,
    CommitAck,
    Dispatch,
    ErrorCode,
    ErrorReply,
    Finished,
    FinishReason,
    Generated,
    Goodbye,
    Heartbeat,
    PageRequest,
    PagesGranted,
    PromptLogprobs,
    Register,
    Shutdown,
    Welcome,
)


def next_token(seq: list[int]) -> int:
    """The scripted model: deterministic in the tokens so far, always in [3, 1000)."""
    a, b = seq[-1], seq[-2] if len(seq) > 1 else 0
    return (a * 1103 + b * 12345 + len(seq) * 7) % 997 + 3


def expected_output(prompt: list[int], max_tokens: int) -> list[int]:
    seq = list(prompt)
    for _ in range(max_tokens):
        seq.append(next_token(seq))
    return seq[len(prompt) :]


def kv_pattern(token: int, position: int) -> float:
    """What the scripted worker writes for a position (exact in float32 for tokens < 2**12)."""
    return float(token * 4096 + position)


@dataclass
class _Req:
    request_id: bytes
    seq: list[int]
    prompt_len: int
    max_tokens: int
    stop_ids: set[int]
    pages: list[int]
    ready_at: float  # prefill finishes (simulated compute time)
    waiting_for: str = ""  # "", "ack" or "pages"
    generated: int = 0
    committed: bool = False
    next_step_at: float = 0.0
    pending_out: list[int] = field(default_factory=list)
    logprobs: int = -1  # the request's SamplingParams.logprobs: frames carry that many alternatives


def _generated(req: _Req, token: int) -> Generated:
    """The frame of one token; when the request asked for k logprobs, made-up ones that fit the token:
    log-probability -1.0, alternatives token, token + 1, ... at -1.0, -2.0, ..."""
    if req.logprobs < 0:
        return Generated(request_id=req.request_id, tokens=ids_to_bytes([token]))
    k = req.logprobs
    return Generated(
        request_id=req.request_id,
        tokens=ids_to_bytes([token]),
        logprobs=np.array([-1.0], "<f4").tobytes(),
        top_ids=np.array([token + j for j in range(k)], "<i4").tobytes(),
        top_logprobs=np.array([-1.0 - j for j in range(k)], "<f4").tobytes(),
    )


class ScriptedWorker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.codec = Codec()
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(args.daemon)
        self.pool: np.ndarray | None = None
        self.page_size = 0
        self.chunk = 1
        self.hb_interval = 0.5
        self.requests: dict[bytes, _Req] = {}
        self.tokens_emitted = 0
        self.running = True
        self.shutdown_by_daemon = False
        self.said_ready = args.warm_up == 0

    def log(self, event: str, **fields: object) -> None:
        if self.args.log:
            with open(self.args.log, "a") as fh:
                fh.write(
                    json.dumps({"event": event, "worker": self.args.name, "pid": os.getpid(), **fields})
                    + "\n"
                )

    def send(self, msg: object) -> None:
        self.sock.send(self.codec.encode(msg))  # type: ignore[arg-type]

    def register(self) -> None:
        self.send(
            Register(
                protocol_version=PROTOCOL_VERSION,
                pid=os.getpid(),
                pid_namespace=pid_namespace_id(),
                device="cpu",
                max_running=self.args.max_running,
                model=self.args.model,
                name=self.args.name,
                ready=self.args.warm_up == 0,
            )
        )

    def run(self) -> None:
        self.register()
        last_hb = time.monotonic()
        ready_at = last_hb + self.args.warm_up  # a real worker maps the pool and warms kernels meanwhile
        while self.running:
            now = time.monotonic()
            timeout_ms = max(1, int(1000 * min(self._next_wake(now) - now, self.hb_interval)))
            if self.sock.poll(timeout_ms):
                while self.sock.poll(0):
                    self.on_message(self.codec.decode_from_daemon(self.sock.recv()))
            now = time.monotonic()
            ready = now >= ready_at
            if self.pool is not None and (now - last_hb >= self.hb_interval or ready != self.said_ready):
                self.send(Heartbeat(num_running=len(self.requests), num_waiting=0, ready=ready))
                if ready and not self.said_ready:
                    self.log("ready")
                self.said_ready = ready
                last_hb = now
            for req in list(self.requests.values()):
                self.step(req, now)
        if not self.shutdown_by_daemon:
            self.send(Goodbye(reason="terminated"))
        self.sock.close(linger=200)
        self.ctx.term()

    def _next_wake(self, now: float) -> float:
        wake = now + 0.05
        for req in self.requests.values():
            if not req.waiting_for:
                wake = min(wake, max(req.ready_at, req.next_step_at))
        return wake

    # ---------------------------------------------------------------- messages

    def on_message(self, msg: object) -> None:
        if isinstance(msg, Welcome):
            # numpy memmap of the DESIGN layout: the same bytes torch.from_file maps, minus torch's import time.
            shape = (
                msg.pool.num_layers,
                msg.pool.num_pages,
                2,
                msg.pool.page_size,
                msg.pool.num_kv_heads,
                msg.pool.head_dim,
            )
            assert msg.pool.kind == "shm" and msg.pool.dtype == "float32", (
                "the scripted worker maps fp32 shm pools"
            )
            self.pool = np.memmap(msg.pool.shm_path, dtype=np.float32, mode="r+", shape=shape)
            self.page_size = msg.pool.page_size
            self.chunk = msg.decode_page_chunk
            self.hb_interval = msg.heartbeat_interval_s
            self.log("welcome", worker_id=msg.worker_id)
        elif isinstance(msg, Dispatch):
            self.on_dispatch(msg)
        elif isinstance(msg, CommitAck):
            req = self.requests.get(msg.request_id)
            if req is not None:
                ack = bytes_to_ids(msg.page_ids).tolist()
                req.pages[: len(ack)] = ack
                req.waiting_for = ""
                self.log("commit_ack", request_id=msg.request_id.hex(), pages=ack)
        elif isinstance(msg, PagesGranted):
            req = self.requests.get(msg.request_id)
            if req is not None:
                req.pages.extend(bytes_to_ids(msg.page_ids).tolist())
                req.waiting_for = ""
        elif isinstance(msg, Abort):
            req = self.requests.pop(msg.request_id, None)
            if req is not None:
                self.send(Finished(request_id=msg.request_id, reason=FinishReason.ABORT))
                self.log("aborted", request_id=msg.request_id.hex())
        elif isinstance(msg, Shutdown):
            self.log("shutdown", reason=msg.reason)
            self.running = False
            self.shutdown_by_daemon = True
        elif isinstance(msg, ErrorReply):
            self.log("error", code=msg.code.value, message=msg.message, request_id=msg.request_id.hex())
            if msg.code is ErrorCode.NOT_REGISTERED:
                # The daemon dropped us (silent too long) and resumed our requests elsewhere: forget
                # them, as the real worker does, and start a new session.
                self.requests.clear()
                self.register()
            elif msg.request_id in self.requests:
                # As the real engine does: out of pages ends the request (LENGTH), anything else aborts
                # it. Either way the daemon hears Finished; a silent drop would leave it waiting forever.
                req = self.requests[msg.request_id]
                out_of_pages = msg.code is ErrorCode.NO_ROOM and req.waiting_for == "pages"
                self.finish(req, FinishReason.LENGTH if out_of_pages else FinishReason.ABORT)

    def on_dispatch(self, msg: Dispatch) -> None:
        assert self.pool is not None
        tokens = bytes_to_ids(msg.tokens).tolist()
        prefix = bytes_to_ids(msg.prefix_page_ids).tolist()
        new = bytes_to_ids(msg.new_page_ids).tolist()
        pages = prefix + new
        prefix_ok = all(self.read_slot(pages, p) == kv_pattern(tokens[p], p) for p in range(msg.matched_len))
        for p in range(msg.matched_len, len(tokens)):
            self.write_slot(pages, p, tokens[p])
        self.log(
            "dispatch",
            request_id=msg.request_id.hex(),
            attempt=msg.attempt,
            num_generated=msg.num_generated,
            max_tokens=msg.sampling.max_tokens,
            min_tokens=msg.sampling.min_tokens,
            prompt_len=len(tokens),
            matched_len=msg.matched_len,
            computed=len(tokens) - msg.matched_len,
            prefix_ok=prefix_ok,
            num_prefix_pages=len(prefix),
            num_new_pages=len(new),
            new_page_ids=new,
        )
        now = time.monotonic()
        self.requests[msg.request_id] = _Req(
            request_id=msg.request_id,
            seq=tokens,
            prompt_len=len(tokens),
            max_tokens=msg.sampling.max_tokens,
            stop_ids=set(msg.sampling.stop_token_ids),
            pages=pages,
            logprobs=msg.sampling.logprobs,
            # Prefill cost grows with the uncached tokens, as on a real GPU: what makes a hit observable.
            ready_at=now
            + self.args.prefill_delay
            + self.args.prefill_delay_per_token * (len(tokens) - msg.matched_len),
        )
        k = msg.sampling.prompt_logprobs
        if k >= 0:  # made up: prompt token t scores -t/100, its alternatives t, t+1, ... score lower
            scored = tokens[1:]
            self.send(
                PromptLogprobs(
                    request_id=msg.request_id,
                    logprobs=np.array([-t / 100 for t in scored], "<f4").tobytes(),
                    top_ids=ids_to_bytes([t + j for t in scored for j in range(k)]),
                    top_logprobs=np.array(
                        [-(t + j) / 100 for t in scored for j in range(k)], "<f4"
                    ).tobytes(),
                )
            )

    # ---------------------------------------------------------------- compute

    def slot_view(self, pages: list[int], position: int) -> np.ndarray:
        assert self.pool is not None
        page, slot = pages[position // self.page_size], position % self.page_size
        return self.pool[:, page, :, slot]

    def read_slot(self, pages: list[int], position: int) -> float:
        view = self.slot_view(pages, position)
        first = float(view.reshape(-1)[0])
        return first if bool((view == first).all()) else float("nan")

    def write_slot(self, pages: list[int], position: int, token: int) -> None:
        self.slot_view(pages, position)[...] = kv_pattern(token, position)

    def step(self, req: _Req, now: float) -> None:
        if req.waiting_for or now < req.ready_at or now < req.next_step_at:
            return
        ps = self.page_size
        if not req.committed:
            req.committed = True
            full = req.prompt_len // ps
            if full:
                req.waiting_for = "ack"
                self.send(
                    Commit(
                        request_id=req.request_id,
                        tokens=ids_to_bytes(req.seq[: full * ps]),
                        page_ids=ids_to_bytes(req.pages[:full]),
                    )
                )
                return
        position = len(req.seq)  # the new token's K/V goes here
        if position // ps >= len(req.pages):
            req.waiting_for = "pages"
            self.send(PageRequest(request_id=req.request_id, num_pages=self.chunk))
            return
        token = next_token(req.seq)
        req.seq.append(token)
        self.write_slot(req.pages, position, token)
        req.generated += 1
        self.tokens_emitted += 1
        self.send(_generated(req, token))
        if self.args.crash_after and self.tokens_emitted >= self.args.crash_after:
            self.log("crash", tokens_emitted=self.tokens_emitted)
            os.kill(os.getpid(), signal.SIGKILL)
        req.next_step_at = now + self.args.token_delay
        if token in req.stop_ids or req.generated >= req.max_tokens:
            self.finish(req, FinishReason.STOP if token in req.stop_ids else FinishReason.LENGTH)

    def finish(self, req: _Req, reason: FinishReason) -> None:
        """Send Finished with the full pages written so far (none for ABORT) and forget the request."""
        full = len(req.seq) // self.page_size if reason is not FinishReason.ABORT else 0
        self.send(
            Finished(
                request_id=req.request_id,
                reason=reason,
                tokens=ids_to_bytes(req.seq[: full * self.page_size]),
                page_ids=ids_to_bytes(req.pages[:full]),
            )
        )
        del self.requests[req.request_id]
        self.log("finished", request_id=req.request_id.hex(), reason=reason.value, generated=req.generated)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--daemon", required=True, help="daemon worker endpoint")
    parser.add_argument("--name", default="scripted")
    parser.add_argument("--model", default="", help="model name sent in Register")
    parser.add_argument("--max-running", type=int, default=4)
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds between output tokens")
    parser.add_argument("--prefill-delay", type=float, default=0.0, help="seconds before the prompt commit")
    parser.add_argument(
        "--prefill-delay-per-token",
        type=float,
        default=0.0,
        help="extra prefill seconds per uncached prompt token (added to --prefill-delay)",
    )
    parser.add_argument("--crash-after", type=int, default=0, help="SIGKILL itself after N output tokens")
    parser.add_argument("--log", default="", help="append JSON lines of events here")
    parser.add_argument(
        "--warm-up",
        type=float,
        default=0.0,
        help="register as not ready and say ready after this many seconds",
    )
    args = parser.parse_args()
    worker = ScriptedWorker(args)
    signal.signal(signal.SIGTERM, lambda *_: setattr(worker, "running", False))
    worker.run()


if __name__ == "__main__":
    main()
