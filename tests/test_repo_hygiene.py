"""No committed file names a path of the machine it was made on (results, docs, code): a result that says
/home/someone/... or /work/... is not reproducible and leaks the author's machine."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MACHINE_PATH = re.compile(r"(^|[^A-Za-z0-9_.~$}])/(work|home|Users|root|tmp|mnt|opt|private|var/folders)/[A-Za-z0-9_.-]")


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / line for line in out.splitlines() if line]


def test_no_absolute_machine_paths_in_committed_files():
    bad = []
    for f in _tracked_files():
        if not f.is_file() or f.stat().st_size > 5_000_000:
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue                      # binary (weights, images)
        for n, line in enumerate(text.splitlines(), 1):
            if MACHINE_PATH.search(line) and f.name != Path(__file__).name:
                bad.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not bad, "\n".join(bad)


def test_the_pattern_catches_machine_paths():
    assert MACHINE_PATH.search("see /home/alice/runs/x") and MACHINE_PATH.search('"/work/main/a.py"')
    assert not MACHINE_PATH.search("runs/x and ../shared/data and https://example.org/home/page")


def test_the_package_data_ships_the_kernel_sources_and_assets():
    """A built wheel holds what the package reads at run time: the C sources (or every install silently runs the
    slow PyTorch path) and the bundled assets.  Checked on pyproject's package-data patterns."""
    tomllib = pytest.importorskip("tomllib")   # Python 3.11+
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = cfg["tool"]["setuptools"]["package-data"]["ternary_mamba"]
    pkg = ROOT / "ternary_mamba"
    shipped = {p for pat in patterns for p in pkg.glob(pat) if p.is_file()}
    needed = {p for p in (pkg / "ops" / "csrc").iterdir() if p.suffix in (".c", ".h")}
    assert needed and needed <= shipped, sorted(str(p.relative_to(pkg)) for p in needed - shipped)
    assert (pkg / "assets" / "teacher" / "model.safetensors") in shipped
