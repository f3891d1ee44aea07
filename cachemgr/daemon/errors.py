"""Errors the daemon raises to its callers (HTTP, admin). All are raised before anything changed."""

from __future__ import annotations

from shared.protocol import FinishReason


class PromptTooLarge(ValueError):
    """The prompt can never run: it does not fit the KV pool or the model's context window."""


class Overloaded(RuntimeError):
    """The request queue is full; try again later (HTTP 503 / 429)."""


class ShuttingDown(RuntimeError):
    """The daemon is draining before it stops: running requests finish, new ones are refused (HTTP 503)."""


class NoWorkers(RuntimeError):
    """No compute worker is registered, so nothing could run the request (HTTP 503)."""


class RequestFailed(RuntimeError):
    """Raised from a RequestStream's iterator when an accepted request could not complete: no pages freed
    up within the wait timeout, no worker came back, or a worker reported an error. Tokens streamed
    before the failure stay valid."""

    def __init__(self, message: str, *, reason: FinishReason = FinishReason.ABORT) -> None:
        super().__init__(message)
        self.reason = reason


class DaemonIntegrityError(RuntimeError):
    """The daemon's request/worker/lease bookkeeping disagrees with itself or with the cache."""
