"""A full disk during a checkpoint: one line naming the file (ENOSPC), the previous checkpoint intact, no
temporary left, and the rerun continues from it."""
import errno
import io
import os

import pytest
import torch

from geffect_kernels import atomic_files
from geffect_kernels.train import load_checkpoint
from geffect_kernels.train.checkpoint import CHECKPOINT, save_checkpoint
from test_cli import run, workspace  # noqa: F401  (workspace is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


class _FullDisk(io.RawIOBase):
    """A file whose writes fail with ENOSPC once ``room`` bytes are written, as a full disk's do."""

    def __init__(self, fd, room):
        self.fd, self.room = fd, room

    def writable(self):
        return True

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return os.write(self.fd, data)

    def fileno(self):
        return self.fd

    def close(self):
        if not self.closed:
            os.close(self.fd)
        super().close()


def checkpoints_fill_the_disk(monkeypatch):
    """`atomic_write`'s temporary checkpoint files accept 64 bytes, then fail with ENOSPC; other files are written."""
    fdopen = os.fdopen

    def opened(fd, mode):
        is_checkpoint = os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{CHECKPOINT}.")
        return _FullDisk(fd, 64) if is_checkpoint else fdopen(fd, mode)
    monkeypatch.setattr(atomic_files.os, "fdopen", opened)


@pytest.fixture
def full_disk(monkeypatch):
    checkpoints_fill_the_disk(monkeypatch)


def test_torch_save_on_a_full_disk_is_one_oserror_and_the_old_file_stays(tmp_path, full_disk):
    path = tmp_path / CHECKPOINT
    path.write_bytes(b"old")
    with pytest.raises(OSError) as info:
        save_checkpoint(tmp_path, {"step": 1, "model": {"w": torch.randn(100)}})
    # torch.save turns the failed write into a RuntimeError about its zip stream; the file's error comes out
    assert type(info.value) is OSError and info.value.errno == errno.ENOSPC
    assert str(info.value) == (f"[Errno 28] cannot write {path}: No space left on device; the previous file is "
                               f"unchanged")
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == [CHECKPOINT]


def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_rerun_continues(capsys, workspace, tmp_path,
                                                                             monkeypatch):
    w, out = workspace, tmp_path / "out"
    argv = ["train", "--model", w / "model", "--forget", w / "forget.json", "--retain", w / "retain.json",
            "--batch-size", 2, "--no-progress", "--out", out]
    assert run(capsys, *argv, "--steps", 2)[0] == 0
    folder = out / "runs" / "ga"
    before = (folder / CHECKPOINT).read_bytes()
    checkpoints_fill_the_disk(monkeypatch)
    code, _, err = run(capsys, *argv, "--steps", 3, "--resume")
    monkeypatch.undo()
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err == (f"geffect: error: [Errno 28] cannot write {folder / CHECKPOINT}: No space left on device; the "
                   f"previous file is unchanged\n")
    assert (folder / CHECKPOINT).read_bytes() == before and load_checkpoint(folder)["step"] == 2
    assert not list(folder.glob(".*.tmp"))
    code, stdout, err = run(capsys, *argv, "--steps", 3, "--resume")
    assert code == 0 and "resumed from step 2" in stdout, err
