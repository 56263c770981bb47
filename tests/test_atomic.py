"""lrqgraph.atomic: a file or folder appears whole or not at all."""
import pytest

from lrqgraph.atomic import atomic_file, atomic_folder, write_text


def test_atomic_file_replaces_the_target_only_when_the_block_succeeds(tmp_path):
    target = tmp_path / "sub" / "report.json"
    write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]  # no temporary left
    with atomic_file(target, suffix=".npz") as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".npz")
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]


def test_atomic_folder_replaces_a_whole_folder(tmp_path):
    target = tmp_path / "model"
    with atomic_folder(target) as tmp:
        (tmp / "a.onnx").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            (tmp / "b.onnx").write_text("2")
            raise RuntimeError("builder failed")
    assert sorted(p.name for p in target.iterdir()) == ["a.onnx"]
    with atomic_folder(target) as tmp:
        (tmp / "c.onnx").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c.onnx"]  # the old folder's files are gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
