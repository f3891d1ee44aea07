"""The cachemgr daemon core: worker channel, dispatch, leases over the wire, request streams."""

from cachemgr.daemon.daemon import Daemon
from cachemgr.daemon.errors import (
    DaemonIntegrityError,
    NoWorkers,
    Overloaded,
    PromptTooLarge,
    RequestFailed,
    ShuttingDown,
)
from cachemgr.daemon.settings import DaemonSettings
from cachemgr.daemon.stream import RequestStream, StreamEvent

__all__ = [
    "Daemon",
    "DaemonIntegrityError",
    "DaemonSettings",
    "NoWorkers",
    "Overloaded",
    "PromptTooLarge",
    "RequestFailed",
    "RequestStream",
    "ShuttingDown",
    "StreamEvent",
]
