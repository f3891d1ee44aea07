"""What each admin command does to the daemon. Runs on the daemon's event loop thread only: the cache
core is single-threaded, and every call here is a short synchronous call into it (tokenizing, the one
slow step, is awaited off the loop by the daemon).
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

from cachemgr.admin.protocol import (
    AdminError,
    ErrorCode,
    EvictArgs,
    PinArgs,
    TreeArgs,
    parse_args,
    to_jsonable,
)
from cachemgr.cache import IntegrityError, Namespace
from cachemgr.daemon.errors import DaemonIntegrityError


def salt_fingerprint(salt: str) -> str:
    """ "" for no salt, else 8 hex digits that tell salts apart without revealing them."""
    return hashlib.blake2b(salt.encode(), digest_size=4).hexdigest() if salt else ""


class AdminTarget(Protocol):
    """The part of the daemon the admin socket uses (cachemgr.daemon.Daemon provides it)."""

    cache: Any  # cachemgr.cache.PrefixCache
    model_name: str

    def stats(self) -> dict[str, Any]: ...

    def workers_info(self) -> list[dict[str, Any]]: ...

    def leases_info(self) -> list[dict[str, Any]]: ...

    async def tokenize(self, text: str) -> list[int]: ...


class AdminCommands:
    """Runs validated admin commands against one daemon. `run` returns a JSON-able result or raises
    AdminError; a ValueError from the cache (misuse, which changes nothing) becomes BAD_ARGS."""

    def __init__(self, daemon: AdminTarget) -> None:
        self._daemon = daemon

    async def run(self, cmd: str, raw_args: dict[str, Any]) -> Any:
        args = parse_args(cmd, raw_args)
        try:
            return await getattr(self, f"_cmd_{cmd}")(args)
        except ValueError as exc:
            raise AdminError(ErrorCode.BAD_ARGS, f"{cmd}: {exc}") from None

    async def _cmd_stats(self, _args: Any) -> dict[str, Any]:
        """Reads only."""
        return {"cache": self._daemon.cache.stats(), "daemon": self._daemon.stats()}

    async def _cmd_tree(self, args: TreeArgs) -> dict[str, Any]:
        """Reads only: at most max_nodes nodes, the rest counted. Salts are replaced by a short
        fingerprint: they may be derived from API keys, and tree output ends up in terminals and logs."""
        dump = to_jsonable(self._daemon.cache.dump(args.max_nodes))
        dump["page_size"] = self._daemon.cache.page_size
        for namespace in dump["namespaces"]:
            namespace["salt"] = salt_fingerprint(namespace["salt"])
        return dump

    async def _cmd_workers(self, _args: Any) -> list[dict[str, Any]]:
        return self._daemon.workers_info()

    async def _cmd_leases(self, _args: Any) -> list[dict[str, Any]]:
        return self._daemon.leases_info()

    async def _cmd_evict(self, args: EvictArgs) -> dict[str, int]:
        """Frees up to `pages` unlocked, unpinned cached pages (by the cache's policy)."""
        return {"requested": args.pages, "evicted": int(self._daemon.cache.evict(args.pages))}

    async def _cmd_flush(self, _args: Any) -> dict[str, int]:
        """Drops every unlocked, unpinned cached page."""
        return {"freed": int(self._daemon.cache.flush())}

    async def _cmd_pin(self, args: PinArgs) -> dict[str, Any]:
        """Pins the cached (committed) part of the prefix: never evicted until unpinned. Pins nest: each
        pin needs its own unpin. Nothing is pinned (pinned_tokens 0) when no page of it is cached."""
        namespace, tokens = await self._prefix(args)
        pinned = int(self._daemon.cache.pin(namespace, tokens))
        return {
            "model": namespace.model,
            "salted": bool(namespace.salt),
            "tokens": len(tokens),
            "pinned_tokens": pinned,
        }

    async def _cmd_unpin(self, args: PinArgs) -> dict[str, Any]:
        """Undoes one pin of exactly this prefix (unpinned_tokens 0 when it was not pinned)."""
        namespace, tokens = await self._prefix(args)
        unpinned = int(self._daemon.cache.unpin(namespace, tokens))
        return {
            "model": namespace.model,
            "salted": bool(namespace.salt),
            "tokens": len(tokens),
            "unpinned_tokens": unpinned,
        }

    async def _cmd_check(self, _args: Any) -> dict[str, Any]:
        """Runs the integrity check: the daemon's own `check()` when it has one (the cache's invariant
        plus its request/lease bookkeeping), else the cache's (free + cached + leased == pool, locks)."""
        check = getattr(self._daemon, "check", None) or self._daemon.cache.check
        try:
            check()
        except (IntegrityError, DaemonIntegrityError) as exc:
            return {"healthy": False, "message": f"{type(exc).__name__}: {exc}"}
        return {"healthy": True, "message": "ok"}

    async def _prefix(self, args: PinArgs) -> tuple[Namespace, list[int]]:
        namespace = Namespace(model=args.model or self._daemon.model_name, salt=args.salt)
        if args.token_ids is not None:
            return namespace, list(args.token_ids)
        assert args.text is not None  # PinArgs guarantees exactly one of the two
        tokens = list(await self._daemon.tokenize(args.text))
        if not tokens:
            raise AdminError(ErrorCode.BAD_ARGS, "text tokenized to no tokens")
        return namespace, tokens
