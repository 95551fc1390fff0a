"""The compiled-kernel cache: a truncated or tampered library is rebuilt (never loaded: that would crash the
process), and a cache folder others can write to is refused."""
import os
import subprocess
import sys

import pytest

CODE = ("import warnings; warnings.simplefilter('ignore'); from ternary_mamba.ops.build import get_kernel; "
        "import torch; from ternary_mamba.ops.kernels import tq2_gemv; lib = get_kernel(); "
        "print('ok' if lib is not None and tq2_gemv(torch.zeros(2, 2, dtype=torch.uint8), torch.ones(2, 1), "
        "torch.ones(1, 8), 8).shape == (1, 2) else 'none')")


def _run(cache, strict=True):
    env = {**os.environ, "TERNARY_MAMBA_CACHE": str(cache)}
    if not strict:
        env.pop("TERNARY_MAMBA_REQUIRE_KERNELS", None)
    return subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, timeout=600)


def test_a_truncated_library_is_rebuilt_not_loaded(tmp_path):
    if subprocess.run(["which", "gcc"], capture_output=True).returncode:
        pytest.skip("no C compiler")
    cache = tmp_path / "c"
    assert _run(cache).stdout.strip() == "ok"
    (so,) = (cache / "kernels").glob("*.so")
    assert (so.parent / (so.name + ".sha256")).exists()
    so.write_bytes(so.read_bytes()[:4096])          # a crash or a full disk mid-write
    r = _run(cache)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-500:]
    assert so.stat().st_size > 4096


def test_a_world_writable_cache_is_refused(tmp_path):
    cache = tmp_path / "c"
    (cache / "kernels").mkdir(parents=True)
    os.chmod(cache / "kernels", 0o777)
    r = _run(cache, strict=False)
    assert r.returncode == 0 and r.stdout.strip() == "none"
    strict = _run(cache)                                 # where kernels are required, the refusal is an error
    assert strict.returncode != 0 and "group- or world-writable" in strict.stderr
    assert not list((cache / "kernels").glob("*.so"))


def test_a_kernel_that_does_not_compile_fails_where_kernels_are_required(tmp_path):
    """A compile error is a failure (named, with the compiler's error) when TERNARY_MAMBA_REQUIRE_KERNELS=1, not
    a silent fallback to PyTorch that skips every kernel test."""
    if subprocess.run(["which", "gcc"], capture_output=True).returncode:
        pytest.skip("no C compiler")
    env = {**os.environ, "TERNARY_MAMBA_CACHE": str(tmp_path / "c"), "TERNARY_MAMBA_REQUIRE_KERNELS": "1",
           "TERNARY_MAMBA_MARCH": "no-such-cpu"}
    r = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "no-such-cpu" in r.stderr and "error" in r.stderr
    env.pop("TERNARY_MAMBA_REQUIRE_KERNELS")
    r = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok"   # for users: a portable build instead, and one line
    assert "built without -march=no-such-cpu" in r.stderr and "slower" in r.stderr   # saying it is slower


def test_a_missing_compiler_is_one_line_and_the_pytorch_path_runs(tmp_path):
    import os
    import subprocess
    import sys
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "TERNARY_MAMBA_CACHE": str(tmp_path / "cache")}
    env.pop("TERNARY_MAMBA_REQUIRE_KERNELS", None)
    r = subprocess.run([sys.executable, "-m", "ternary_mamba", "generate", "bundled", "--prompt", "Hi",
                        "--max-new-tokens", "3", "--temperature", "0"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-500:]
    lines = [l for l in r.stderr.splitlines() if "unavailable" in l]
    assert len(lines) == 1 and "no-such-cc" in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_the_machine_line_says_when_the_kernels_target_another_cpu(monkeypatch):
    from ternary_mamba.ops.device import cpu_description
    monkeypatch.delenv("TERNARY_MAMBA_MARCH", raising=False)
    assert "march" not in cpu_description()
    monkeypatch.setenv("TERNARY_MAMBA_MARCH", "haswell")   # an emulated AVX2-only kind: its figures must say so
    assert cpu_description().endswith("C kernels built for -march=haswell (TERNARY_MAMBA_MARCH)")
