"""tdrl.integrity.atomic_dir: a directory appears whole or not at all."""

import pytest

from tdrl.integrity import atomic_dir


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
