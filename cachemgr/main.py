"""Build and run the whole daemon process: pool, cache, Daemon, metrics, admin socket, HTTP API.

Shutdown (SIGINT / SIGTERM, or ``stop`` set by an embedding caller) runs in the reverse order of
start-up: stop taking HTTP requests, stop the admin socket, tell workers to shut down and close the
worker socket, close the KV events stream, then free the pool (the /dev/shm file is unlinked, the CUDA
memory freed) and remove the ready file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from cachemgr.config import DaemonConfig, build_config
from cachemgr.daemon import Daemon
from shared.kv_layout import KVLayout
from shared.pool import OwnedPool, create_pool, daemon_pool_name, remove_stale_daemon_pools

logger = logging.getLogger("cachemgr")


def pool_layout(config: DaemonConfig, spec: Any) -> KVLayout:
    """Pool size from the model (layers, KV heads, head dim), dtype, page size and budget or page count."""
    dtype = config.resolved_kv_dtype
    if config.num_pages is not None:
        return KVLayout(
            spec.num_layers, config.num_pages, config.page_size, spec.num_kv_heads, spec.head_dim, dtype
        )
    return KVLayout.for_budget(
        budget_bytes=config.kv_budget,
        num_layers=spec.num_layers,
        page_size=config.page_size,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        dtype=dtype,
    )


def _load_tokenizer(model_path: str) -> Any:
    from shared.tokenizer import load_tokenizer

    try:
        return load_tokenizer(model_path)
    except (ValueError, OSError) as exc:
        logger.warning("no tokenizer for %s (%s): the HTTP API is disabled", model_path, exc)
        return None


def _make_cache(config: DaemonConfig, num_pages: int, events: Any) -> Any:
    from cachemgr.cache import PrefixCache

    return PrefixCache(num_pages, page_size=config.page_size, policy=config.eviction_policy, events=events)


_HTTP_SHUTDOWN_S = 3.0


async def _start_http(
    config: DaemonConfig, daemon: Daemon, tokenizer: Any, metrics: Any, spec: Any
) -> tuple[Any, int]:
    from aiohttp import web

    from cachemgr.http import build_http_app

    app = build_http_app(
        daemon,
        tokenizer,
        model_name=daemon.model_name,
        metrics=metrics,
        api_keys=frozenset(config.api_keys),
        salt_from_api_key=config.salt_from_api_key,
        vocab_size=spec.vocab_size,
        tokenize_cache_bytes=config.tokenize_cache_size,
    )
    # After the drain (see _drain), responses still open get this long before their handlers are
    # cancelled (which aborts their requests): the stop stays inside the orchestrator's kill timeout.
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=_HTTP_SHUTDOWN_S)
    await runner.setup()
    site = web.TCPSite(runner, config.http_host, config.http_port)
    await site.start()
    port = runner.addresses[0][1] if runner.addresses else config.http_port
    return runner, int(port)


async def serve(config: DaemonConfig, stop: asyncio.Event | None = None) -> None:
    """Run until SIGINT/SIGTERM (or ``stop`` is set), then shut everything down and free the pool."""
    from cachemgr.admin.server import AdminServer
    from cachemgr.metrics import Metrics
    from shared.model_spec import load_model_spec

    if config.model:
        model_path = config.model
    else:
        from shared.default_model import default_model_path

        model_path = str(default_model_path())
    spec = load_model_spec(model_path)
    tokenizer = _load_tokenizer(model_path)
    model_name = config.model_name or spec.name
    layout = pool_layout(config, spec)
    run_dir = Path(config.run_dir)
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    stop = stop if stop is not None else asyncio.Event()
    again = asyncio.Event()  # a second signal while draining: stop now
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: again.set() if stop.is_set() else stop.set())

    if config.pool_kind == "shm":
        for path in remove_stale_daemon_pools(os.getuid()):
            logger.warning("removed %s, the pool of a daemon that died without cleaning up", path)
    pool: OwnedPool = create_pool(
        layout,
        config.pool_kind,
        name=daemon_pool_name(os.getuid(), os.getpid()),
        device=config.device,
        generation=time.time_ns(),
    )
    context = zmq.asyncio.Context()
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(pool.close)
        stack.callback(context.term)
        events = None
        if config.kv_events_endpoint:
            from cachemgr.kv_events import KVEventPublisher

            events = KVEventPublisher(
                config.kv_events_endpoint, model=model_name, context=zmq.Context.shadow(context.underlying)
            )
            stack.callback(events.close)
        cache = _make_cache(config, layout.num_pages, events)
        daemon = Daemon(
            cache=cache,
            pool=pool.descriptor(),
            settings=config.daemon_settings(),
            model_name=model_name,
            max_context_len=spec.max_position_embeddings,
            vocab_size=spec.vocab_size,
            tokenizer=tokenizer,
            context=context,
        )
        metrics = Metrics(daemon)
        daemon.metrics = metrics
        await daemon.start()
        stack.push_async_callback(daemon.stop)
        admin = AdminServer(
            daemon, config.admin_socket, tcp_port=config.admin_tcp_port, token=config.admin_token or None
        )
        await admin.start()
        stack.push_async_callback(admin.stop)
        http_port = None
        if not config.disable_http and tokenizer is not None:
            runner, http_port = await _start_http(config, daemon, tokenizer, metrics, spec)
            stack.push_async_callback(runner.cleanup)
        logger.info(
            "serving %s: %d KV pages of %d tokens (%s, %.1f MiB), workers on %s, admin %s, http %s",
            model_name, layout.num_pages, layout.page_size, layout.dtype, layout.num_bytes / 2**20,
            daemon.endpoint, config.admin_socket, f"{config.http_host}:{http_port}" if http_port is not None else "off",
        )  # fmt: skip
        if config.ready_file:
            _write_ready(Path(config.ready_file), daemon, config, http_port, pool)
            stack.callback(Path(config.ready_file).unlink, missing_ok=True)
        await stop.wait()
        await _drain(daemon, config.shutdown_grace, again)
        logger.info("shutting down")


async def _drain(daemon: Daemon, grace_s: float, interrupt: asyncio.Event) -> None:
    """Refuse new requests and give the accepted ones up to `grace_s` seconds to finish (a rolling restart
    loses none of them); whatever is left is aborted by the shutdown that follows."""
    if grace_s <= 0:
        return
    daemon.begin_drain()
    running = daemon.stats()["running"] + daemon.stats()["queue_depth"]
    logger.info("draining: %d requests in flight, up to %.0f s (signal again to stop now)", running, grace_s)
    if await daemon.wait_idle(grace_s, interrupt):
        logger.info("drained: every accepted request finished")
    else:
        logger.warning("stopping with requests in flight (grace period over or second signal)")


def _write_ready(
    path: Path, daemon: Daemon, config: DaemonConfig, http_port: int | None, pool: OwnedPool
) -> None:
    info = {
        "pid": os.getpid(),
        "model": daemon.model_name,
        "worker_endpoint": daemon.endpoint,
        "admin_socket": config.admin_socket,
        "http": f"http://{config.http_host}:{http_port}" if http_port is not None else None,
        "num_pages": pool.layout.num_pages,
        "page_size": pool.layout.page_size,
        "pool_path": pool.descriptor().shm_path,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(path)  # readers never see a half-written file


def run(argv: Sequence[str] | None = None) -> int:
    """`cachemgr serve`: returns the process exit code."""
    try:
        config = build_config(argv)
    except ValueError as exc:
        print(f"cachemgr serve: error: {exc}")
        return 2
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        # One line per HTTP request (health probes every few seconds included) drowns the daemon's own log;
        # --log-level debug brings it back.
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    try:
        import uvloop

        uvloop.run(serve(config))
    except ImportError:
        asyncio.run(serve(config))
    return 0
