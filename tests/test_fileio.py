"""reslab.fileio: whole-or-absent files with ordinary permissions, and crash-tolerant JSON lines."""

from __future__ import annotations

import os
import stat

import pytest

from reslab.fileio import append_jsonl, atomic_write, atomic_write_text, read_jsonl


def test_atomic_write_gives_the_mode_a_plain_open_gives(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    written = atomic_write_text(tmp_path / "atomic.txt", "x")
    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = atomic_write_text(tmp_path / "f.txt", "old")

    def fail(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_read_jsonl_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"epoch": 1})
    append_jsonl(path, {"epoch": 2})
    with open(path, "a") as f:
        f.write('{"epoch": 3, "train_lo')  # a crash mid-line
    assert read_jsonl(path) == [{"epoch": 1}, {"epoch": 2}]
    assert read_jsonl(tmp_path / "missing.jsonl") == []
