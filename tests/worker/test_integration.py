"""The daemon (in this process, real ROUTER socket and shm pool) with real `computeworker` processes on a
tiny Llama: greedy output is the same cold, with partial and full prefix hits, and when the hit is on pages
another worker process wrote."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from cachemgr.cache import Namespace, PrefixCache
from cachemgr.daemon import Daemon, DaemonSettings
from shared.kv_layout import KVLayout
from shared.model_spec import load_model_spec
from shared.pool import create_pool
from shared.protocol import FinishReason, SamplingParams
from tests.helpers.procs import ProcessGroup

PAGE = 4
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama plus a word-level tokenizer over its 256 ids (the worker loads one)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    target = tmp_path_factory.mktemp("tiny_tok") / "model"
    shutil.copytree(tiny_llama_dir, target)
    tok = Tokenizer(WordLevel({f"w{i}": i for i in range(256)}, unk_token="w0"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.save(str(target / "tokenizer.json"))
    return target


async def _generate(daemon: Daemon, ns: Namespace, prompt: list[int]) -> tuple[list[int], int]:
    stream = await daemon.submit(ns, prompt, GREEDY)
    tokens: list[int] = []
    last = None
    async for event in stream:
        tokens.extend(event.token_ids)
        last = event
    assert last is not None and last.finish_reason is FinishReason.LENGTH
    return tokens, stream.cached_tokens


async def _wait(predicate: object, timeout_s: float = 60.0) -> None:
    import asyncio

    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_cache_hits_across_worker_processes_equal_cold(
    tiny_with_tokenizer: Path, tmp_path: Path
) -> None:
    spec = load_model_spec(tiny_with_tokenizer)
    layout = KVLayout(spec.num_layers, 96, PAGE, spec.num_kv_heads, spec.head_dim)
    pool = create_pool(layout, "shm", name=f"wint-{os.getpid()}-{tmp_path.name[-20:]}")
    endpoint = f"ipc://{tmp_path}/w.sock"
    settings = DaemonSettings(
        endpoint=endpoint, heartbeat_interval_s=0.2, heartbeat_timeout_s=5.0, decode_page_chunk=2
    )
    daemon = Daemon(
        cache=PrefixCache(layout.num_pages, page_size=PAGE),
        pool=pool.descriptor(),
        settings=settings,
        model_name=spec.name,
        max_context_len=spec.max_position_embeddings,
        vocab_size=spec.vocab_size,
    )
    await daemon.start()
    worker_args = [
        "-m",
        "computeworker",
        "--daemon",
        endpoint,
        "--model",
        str(tiny_with_tokenizer),
        "--threads",
        "1",
    ]
    try:
        with ProcessGroup(tmp_path) as procs:
            worker_a = procs.spawn([*worker_args, "--name", "a"], "worker-a.log")
            await _wait(lambda: len(daemon.workers_info()) == 1)

            p1 = [5, 17, 99, 3, 250, 41, 8, 8, 130, 77, 12, 200, 64]  # 3 full pages + 1 token
            p2 = [*p1[:8], 1, 2, 3, 4, 5]  # shares 2 pages with p1
            cold: dict[str, list[int]] = {}
            cold["p1"], cached = await _generate(daemon, Namespace(spec.name, salt="cold-1"), p1)
            assert cached == 0 and len(cold["p1"]) == 8
            p3 = [*p1, *cold["p1"][:3]]  # 16 tokens: prompt + the first turn's output, all cached below
            for key, prompt in (("p2", p2), ("p3", p3)):
                cold[key], cached = await _generate(daemon, Namespace(spec.name, salt=f"cold-{key}"), prompt)
                assert cached == 0

            ns = Namespace(spec.name)
            out, cached = await _generate(daemon, ns, p1)  # worker A writes p1's pages into the pool
            assert (out, cached) == (cold["p1"], 0)

            procs.spawn([*worker_args, "--name", "b"], "worker-b.log")
            await _wait(lambda: len(daemon.workers_info()) == 2)
            worker_a.send_signal(signal.SIGTERM)
            assert worker_a.wait(30) == 0
            await _wait(lambda: [w["name"] for w in daemon.workers_info()] == ["b"])

            out, cached = await _generate(daemon, ns, p1)  # worker B reads A's pages
            assert (out, cached) == (cold["p1"], 12)
            out, cached = await _generate(daemon, ns, p2)  # partial hit
            assert (out, cached) == (cold["p2"], 8)
            # every page of p3 is cached (the first turn's output pages were committed at finish); the
            # daemon keeps the last page uncached so the worker has a token to compute logits from
            out, cached = await _generate(daemon, ns, p3)
            assert (out, cached) == (cold["p3"], 12)
            assert daemon.cache.match(ns, p3).matched_len == 16
    finally:
        await daemon.stop()
        daemon.check()
        pool.close()
