"""Temporary files and folders of atomic writes: what a killed writer left beside a destination goes on the next
write of it; what a live writer holds, or what is seconds old, stays."""

from __future__ import annotations

import os

import pytest

from adaptkit.tempfiles import folder_beside, hold, remove_stale, temp_beside

fcntl = pytest.importorskip("fcntl")


def test_only_a_dead_writers_old_temporaries_go(tmp_path):
    dest = tmp_path / "out"
    dead_file, dead_dir, held, young = (temp_beside(dest) for _ in range(4))
    dead_file.write_bytes(b"half")
    dead_dir.mkdir()
    (dead_dir / "adapter_config.json").write_text("{}")
    held.mkdir()
    young.write_bytes(b"just made")
    other = tmp_path / f".other.{'a' * 12}.tmp"  # another destination's
    other.write_bytes(b"x")
    for p in (dead_file, dead_dir, held, other):
        os.utime(p, (1e9, 1e9))
    fd = os.open(held, os.O_RDONLY | os.O_DIRECTORY)
    try:
        hold(fd)  # a live writer's folder
        assert sorted(remove_stale(dest)) == sorted([dead_file, dead_dir])
        assert held.is_dir() and young.is_file() and other.is_file()
    finally:
        os.close(fd)


def test_a_folder_written_beside_becomes_the_destination_and_leaves_nothing(tmp_path):
    dest = tmp_path / "peft"
    with folder_beside(dest) as tmp:
        (tmp / "a.json").write_text("1")
    assert (dest / "a.json").read_text() == "1"
    with folder_beside(dest) as tmp:  # into the folder that is there now: files of the same names replaced
        (tmp / "a.json").write_text("2")
        (tmp / "b.json").write_text("3")
    assert sorted(p.name for p in dest.iterdir()) == ["a.json", "b.json"] and (dest / "a.json").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["peft"]
