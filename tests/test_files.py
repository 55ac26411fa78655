"""`pretrain.files`: the one way a file is written (beside its destination, fsynced, renamed)."""

from __future__ import annotations

import json

import pytest

from pretrain.files import write_atomic_with
from pretrain.run_dir import RunDir


def test_a_writer_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")

    def half_then_fail(tmp):
        tmp.write_bytes(b"ha")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomic_with(target, half_then_fail)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    write_atomic_with(target, lambda tmp: tmp.write_bytes(b"new"))
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_the_requeue_record_is_written_through_the_one_writer(tmp_path, monkeypatch):
    """requeue.json used its own `.partial` rename without fsync; it now goes through pretrain.files."""
    import pretrain.files

    written = []
    real = pretrain.files.write_atomic_with
    monkeypatch.setattr(
        pretrain.files, "write_atomic_with", lambda path, write: (written.append(path), real(path, write))
    )
    run = RunDir(tmp_path)
    run.update_requeue_record(job_id="7", requeues=1)
    assert written == [run.requeue_file] and json.loads(run.requeue_file.read_text())["job_id"] == "7"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["requeue.json"]
