"""A full disk and a read-only file system, for real: small tmpfs mounts (root only, as in CI; skipped where
mounting is not allowed).  Each ends in one line naming the path, exit 1, and nothing half-written is left."""
import subprocess

import pytest

from ternary_mamba.cli import main


def _mount(path, size: str, read_only: bool = False):
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    if read_only:
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
    return path


@pytest.fixture
def disks(tmp_path):
    small, ro = _mount(tmp_path / "small", "64k"), _mount(tmp_path / "ro", "1m", read_only=True)
    yield small, ro
    subprocess.run(["umount", str(small), str(ro)], capture_output=True)


def _one_line(capsys, *needles):
    """One error line (progress lines of the run before it may precede it on stderr), naming what it must."""
    err = [l for l in capsys.readouterr().err.strip().splitlines() if "error" in l or "Traceback" in l]
    assert len(err) == 1 and all(n in err[0] for n in needles), err


@pytest.mark.parametrize("fmt,out", [("tq2", "p"), ("gguf", "m.gguf"), ("hf", "hf")])
def test_export_to_a_full_disk(disks, capsys, fmt, out):
    small, _ = disks
    assert main(["export", "bundled", "--format", fmt, "--out", str(small / out)]) == 1
    _one_line(capsys, "No space left on device", str(small))
    assert not list(small.iterdir())                     # the half-written file or folder is gone


def test_a_checkpoint_save_on_a_full_disk(tmp_path, capsys, text_dir):
    """The run starts (run.json fits) and its first checkpoint does not: one line, and no temporary folder left."""
    small = _mount(tmp_path / "mid", "256k")
    try:
        assert main(["quantize", "--data", str(text_dir), "--tokens", "4096", "--seq-len", "64", "--batch-size", "4",
                     "--save-every", "1", "--eval-every", "0", "--out", str(small / "run")]) == 1
        _one_line(capsys, "No space left on device", str(small / "run" / "checkpoint"))
        assert not [p for p in (small / "run").iterdir() if ".tmp" in p.name] if (small / "run").exists() else True
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


def test_export_and_quantize_on_a_read_only_file_system(disks, capsys, text_dir):
    _, ro = disks
    assert main(["export", "bundled", "--format", "gguf", "--out", str(ro / "m.gguf")]) == 1
    _one_line(capsys, "Read-only file system")
    assert main(["quantize", "--data", str(text_dir), "--tokens", "4096", "--out", str(ro / "run")]) == 1
    _one_line(capsys, "Read-only file system")
