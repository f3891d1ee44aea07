"""shared.pool on CPU: the shm file, zero-copy mappings seen across mappings, cleanup, bad descriptors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import torch

from shared.kv_layout import KVLayout
from shared.pool import (
    create_pool,
    daemon_pool_name,
    layout_of,
    map_pool,
    parse_size,
    remove_stale_daemon_pools,
)

LAYOUT = KVLayout(num_layers=3, num_pages=5, page_size=4, num_kv_heads=2, head_dim=2, dtype="float32")


def test_shm_pool_is_shared_and_removed_on_close(tmp_path: Path) -> None:
    owned = create_pool(LAYOUT, "shm", name=f"t-{os.getpid()}-a")
    desc = owned.descriptor()
    path = Path(desc.shm_path)
    assert (desc.kind, desc.num_bytes, path.stat().st_size) == (
        "shm",
        LAYOUT.num_bytes,
        3 * 5 * 2 * 4 * 2 * 2 * 4,
    )
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert layout_of(desc) == LAYOUT
    a, b = map_pool(desc), map_pool(desc)
    assert a.tensor.shape == LAYOUT.shape and a.tensor.dtype == torch.float32
    assert float(b.tensor.abs().sum()) == 0.0
    a.tensor[2, 4, 1, 3] = 7.0  # layer 2, page 4, V, slot 3
    assert b.tensor[2, 4, 1, 3].tolist() == [[7.0, 7.0], [7.0, 7.0]]
    assert float(b.tensor.sum()) == 28.0
    a.close()
    b.close()
    with pytest.raises(ValueError, match="closed"):
        _ = a.tensor
    owned.close()
    owned.close()  # idempotent
    assert not path.exists()


def test_bfloat16_pool_maps_with_its_dtype() -> None:
    layout = KVLayout(1, 2, 4, 1, 2, "bfloat16")
    owned = create_pool(layout, "shm", name=f"t-{os.getpid()}-b")
    try:
        mapped = map_pool(owned.descriptor())
        assert (mapped.tensor.dtype, mapped.tensor.shape) == (torch.bfloat16, layout.shape)
        mapped.close()
    finally:
        owned.close()


def test_bad_inputs_raise_value_errors() -> None:
    with pytest.raises(ValueError, match="pool kind"):
        create_pool(LAYOUT, "tmpfs", name="x")
    with pytest.raises(ValueError, match="pool name"):
        create_pool(LAYOUT, "shm", name="../escape")
    owned = create_pool(LAYOUT, "shm", name=f"t-{os.getpid()}-c")
    try:
        with pytest.raises(FileExistsError):
            create_pool(LAYOUT, "shm", name=f"t-{os.getpid()}-c")
        desc = owned.descriptor()
        with pytest.raises(ValueError, match="must live under /dev/shm"):
            map_pool(msgspec.structs.replace(desc, shm_path="/etc/passwd"))
        with pytest.raises(ValueError, match="holds"):
            map_pool(msgspec.structs.replace(desc, num_pages=6, num_bytes=0))
        with pytest.raises(ValueError, match="unknown pool kind"):
            map_pool(msgspec.structs.replace(desc, kind="nfs"))
    finally:
        owned.close()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512MiB", 512 * 2**20),
        ("2GiB", 2 * 2**30),
        ("1.5GB", 1_500_000_000),
        ("1048576", 1048576),
        ("64k", 64_000),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1MiB", "0"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_stale_pools_of_dead_daemons_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    uid = os.getuid()
    stale = tmp_path / f"radixkv-{uid}-{dead.pid}.kv"
    live = tmp_path / f"radixkv-{uid}-{os.getpid()}.kv"
    other_uid = tmp_path / f"radixkv-{uid + 1}-{dead.pid}.kv"
    not_a_daemon = tmp_path / f"radixkv-wrt-{dead.pid}.kv"
    for path in (stale, live, other_uid, not_a_daemon):
        path.write_bytes(b"x")
    assert remove_stale_daemon_pools(uid, tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (live, other_uid, not_a_daemon)
    )
    assert daemon_pool_name(uid, 42) == f"{uid}-42"
