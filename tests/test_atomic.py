"""Atomic writes: complete files only under their final names, and on disk before the rename."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shards import atomic


def _record_fsyncs(monkeypatch: pytest.MonkeyPatch, target: Path) -> list[tuple[str, bool]]:
    """(path fsynced, whether the final file existed then), in call order."""
    calls: list[tuple[str, bool]] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), target.exists()))
        real(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    return calls


def test_parquet_is_fsynced_before_the_rename_and_the_rename_after(tmp_path, monkeypatch):
    # pyarrow writes the file itself, so the helper cannot fsync through a file object of its own.
    target = tmp_path / "table.parquet"
    calls = _record_fsyncs(monkeypatch, target)
    atomic.write_parquet(target, pa.table({"key": ["a", "b"]}))
    assert pq.read_table(target).column("key").to_pylist() == ["a", "b"]
    (temp, existed_before), (directory, existed_after) = calls
    assert atomic.is_temp(temp) and Path(temp).parent == tmp_path and not existed_before
    assert directory == str(tmp_path) and existed_after
    assert [p.name for p in tmp_path.iterdir()] == ["table.parquet"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "notes.txt"
    atomic.write_text(target, "complete\n")
    with pytest.raises(RuntimeError, match="half-way"):
        with atomic.atomic_open(target, "w") as f:
            f.write("half a fi")
            raise RuntimeError("failed half-way")
    assert target.read_text() == "complete\n"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
