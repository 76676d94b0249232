"""tdrl.integrity's atomic writers: a directory or a file appears whole or not at all."""

import os

import pytest

from tdrl.integrity import atomic_dir, atomic_file, write_json_atomic, write_text_atomic


def test_atomic_dir_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
        assert not target.exists()  # nothing at the target until the block ends
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_keeps_the_old_directory_on_an_error(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("disk full")
    assert (target / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_with_a_shared_token_names_its_temporary(tmp_path):
    with atomic_dir(tmp_path / "ck", token="step-3") as tmp:
        assert tmp.name == ".ck.tmp-step-3"


def test_atomic_dir_puts_the_old_directory_back_when_the_final_rename_fails(tmp_path, monkeypatch):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("old")
    rename = os.rename

    def fail_into_target(src, dst):
        if str(dst) == str(target) and ".tmp-" in str(src):
            raise OSError("disk full")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", fail_into_target)
    with pytest.raises(OSError, match="disk full"), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_file_replaces_whole_or_keeps_the_old_file(tmp_path):
    path = tmp_path / "f.txt"
    write_text_atomic(path, "old\n")
    with pytest.raises(RuntimeError), atomic_file(path) as fh:
        fh.write("half")
        fh.flush()
        raise RuntimeError("interrupted")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]  # no temporary left
    write_text_atomic(path, "é")
    assert path.read_bytes() == "é".encode()  # UTF-8, whatever the locale
    write_json_atomic(path, {"b": 1, "a": 2})
    assert path.read_text() == '{\n  "a": 2,\n  "b": 1\n}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
