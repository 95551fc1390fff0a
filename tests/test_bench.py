"""The shipped benchmarks' helpers (the timed runs themselves are not tests)."""
import numpy as np
import pytest
import torch

from ternary_mamba.bench.model import profile_training
from ternary_mamba.cli import main
from ternary_mamba.ops.build import get_kernel


def test_training_profile_accounts_for_the_whole_step():
    torch.manual_seed(0)
    lines = []
    shares = profile_training(lines.append, steps=1, chunk=16, preset="tiny", batch=2, seq=32)
    assert abs(sum(shares.values()) - 1) < 1e-6 and min(shares.values()) >= 0
    assert shares["GEMMs (projections, lm_head; fwd+bwd)"] > 0
    if get_kernel() is not None:      # the C training kernels ran and were found by name
        assert shares["SSD scan, C (fwd+bwd)"] > 0 and shares["cross-entropy, C (fwd+bwd)"] > 0
    assert len(lines) == 1 + len(shares)


@pytest.mark.parametrize("n", [1, 17, 1000, 65 * 64 + 3, 1 << 20])
def test_bandwidth_probe_reads_every_element(n):
    """The C probe sums what it reads: every element exactly once, whatever the split across threads."""
    from ternary_mamba.ops.build import get_kernel
    lib = get_kernel()
    if lib is None:
        pytest.skip("no C compiler")
    x = torch.arange(n, dtype=torch.float32) % 7
    assert lib.stream_read(x.data_ptr(), n) == pytest.approx(float(x.double().sum()), rel=1e-6)


def test_the_gpu_benchmark_setting_runs_real_trainer_steps_on_a_cpu():
    """`bench gpu` needs CUDA; its per-setting measurement is checked here on the CPU (tiny config)."""
    from ternary_mamba.bench.gpu import _setting
    r = _setting("bench-5m", 2, 32, True, 1, device="cpu")
    assert r["tok_s"] > 0 and r["tflops"] > 0 and r["planned_gb"] > 0 and np.isfinite(r["loss"])
    r = _setting("bench-5m", 2, 32, False, 1, reference=True, device="cpu")
    assert r["path"].startswith("reference")


def test_bench_gpu_without_cuda_is_a_one_line_error(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["bench", "gpu"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA" in err[0]


def test_bench_gpu_table_and_json_with_the_gpu_stood_in_by_the_cpu(monkeypatch, tmp_path, capsys):
    """The table, the plan --mfu column (fraction of the nominal peak) and the JSON of `bench gpu`, with CUDA
    replaced by the CPU (the timing itself is the function tested above)."""
    import json
    import types

    import torch
    import ternary_mamba.bench.gpu as gpu
    real = gpu._setting
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H200")
    monkeypatch.setattr(gpu, "bf16_gemm_tflops", lambda: 800.0)
    monkeypatch.setattr(gpu, "_setting", lambda *a, **k: real(*a[:1], 2, 32, *a[3:], **{**k, "device": "cpu"}))
    args = types.SimpleNamespace(models=["bench-5m"], seq_len=32, steps=1, profile=False, chunk_size=None,
                                 json=str(tmp_path / "b.json"))
    gpu.run_bench_gpu(args)
    out = capsys.readouterr().out
    assert "nominal 989" in out and "--mfu" in out and "reference (PyTorch)" in out
    rec = json.loads((tmp_path / "b.json").read_text())
    assert rec["nominal_tflops"] == 989.0 and len(rec["settings"]) == 2
    r = rec["settings"][0]
    assert abs(r["plan_mfu"] - r["tflops"] / 989.0) < 1e-12 and abs(r["mfu"] - r["tflops"] / 800.0) < 1e-12
    # the cost model's prediction for each setting beside the measurement (the reference path fuses nothing)
    fused, ref = rec["settings"][0]["predicted_tok_s"], rec["settings"][1]["predicted_tok_s"]
    assert fused > ref > 0 and "predicted" in out


def test_bench_ops_compares_every_op_with_its_reference(tmp_path):
    from ternary_mamba.bench.configs import BenchOpsConfig
    from ternary_mamba.bench.ops import run_bench_ops
    out = run_bench_ops(BenchOpsConfig(model="tiny", seq_len=40, rounds=1, json=str(tmp_path / "ops.json")))
    ops = {(r["op"], r["pass"]): r for r in out["ops"]}
    assert {op for op, _ in ops} == {"ssd_scan", "conv_silu", "gated_norm", "rms_norm", "fake_quant", "kl_div",
                                     "cross_entropy"}
    assert all(r["out_diff"] < 1e-3 and (r["pass"] == "forward" or r["grad_diff"] < 1e-2) for r in out["ops"])
    assert all(r["impl"] not in (None, "?") for r in out["ops"])
    assert (tmp_path / "ops.json").exists()


def test_the_gpu_check_report_reads_what_the_steps_leave(tmp_path):
    """scripts/gpu_check_report.py on a folder shaped like a GPU check's (no GPU needed)."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "steps.txt").write_text("ops 12 0\nddp 30 0\n")
    for run, losses in (("ddp", [3.0, 2.5]), ("fsdp", [3.0, 2.50001]), ("killed", [3.0, 2.5]),
                        ("fp32", [3.0, 2.4]), ("bf16", [3.01, 2.42])):
        (tmp_path / run).mkdir()
        (tmp_path / run / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": v}) + "\n"
                                                              for i, v in enumerate(losses)))
    (tmp_path / "bf16" / "summary.json").write_text(json.dumps({"rows": {"QAT+KD (absmean)": {"kl": 0.2}}}))
    (tmp_path / "ddp.log").write_text("distributed: DDP over 1 rank(s), nccl (collectives on cuda:0)\n")
    r = subprocess.run([sys.executable, str(root / "scripts" / "gpu_check_report.py"), str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["distributed"]["nccl_group_formed"] and res["steps"]["ddp"] == {"seconds": 30, "rc": 0}
    assert abs(res["bf16_vs_fp32"]["max_loss_gap"] - 0.02) < 1e-9 and res["bf16_vs_fp32"]["final_kl_bf16"] == 0.2
    assert "| ops | 12 | 0 |" in (tmp_path / "table.md").read_text()


def test_bench_serve_runs_every_load_level_and_sees_the_batching(tmp_path, capsys):
    """The load test's mechanics (not its speed): every level measured, more clients share decode steps."""
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    import json
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--clients", "1", "3", "--requests", "2", "--max-tokens", "6", "--threads", "1",
                 "--json", str(out)]) == 0
    levels = json.loads(out.read_text())["levels"]
    assert [lv["clients"] for lv in levels] == [1, 3] and all(lv["requests"] == lv["clients"] * 2 for lv in levels)
    assert levels[0]["rows_per_step"] == 1.0 and levels[1]["rows_per_step"] > 1.0
    assert "| clients | tok/s |" in capsys.readouterr().out


def test_the_decode_roofline_bytes_add_up_for_every_variant():
    """The per-part bytes the decode benchmark prints sum to the bytes its roofline divides by, for the dense
    model and every packed variant (fp16 / int8 head, tied or not)."""
    from conftest import random_model, tiny_config
    from ternary_mamba.bench.roofline import bytes_breakdown, bytes_per_token
    from ternary_mamba.bench.runtime import build_variants
    for tie in (True, False):
        for name, m in build_variants(random_model(tiny_config(tie_embeddings=tie, d_model=128)).eval(), "decode").items():
            parts = bytes_breakdown(m)
            assert sum(parts.values()) == bytes_per_token(m), (tie, name, parts)
            assert (parts["codes"] > 0) == (name != "fp32") and parts["head"] > 0


def test_the_bench_names_the_kernels_and_counts_fp16_scales_where_the_engine_keeps_them():
    """`kernels: ...` names what the engine runs for each variant, and scales the engine reads as fp16 (the r32 and
    lut layouts) count 2 bytes each in the roofline, 4 where it reads the fp32 buffer."""
    from conftest import random_model, tiny_config
    from ternary_mamba.bench.roofline import bytes_breakdown, kernel_summary
    from ternary_mamba.bench.runtime import build_variants
    from ternary_mamba.ops import decode_layouts
    variants = build_variants(random_model(tiny_config(d_model=128)).eval(), "decode")
    exact, fast = variants["tq2"], variants["tq2+q4head+a8+s16"]
    n_scales = sum(lin.scales.numel() for layer in exact.backbone.layers
                   for lin in (layer.mixer.in_proj, layer.mixer.out_proj))
    for m, layout in ((exact, "lut"), (fast, "r32")):
        relaid = decode_layouts.available(layout)
        assert (f"tq2_{layout} x{2 * m.config.n_layer}" in kernel_summary(m)) == relaid, kernel_summary(m)
        assert bytes_breakdown(m)["scales"] == n_scales * (2 if relaid else 4)


def test_the_roofline_counts_lut_codes_at_their_own_size():
    """The lut layout holds 3 weights per 5 bits, six per dword (ceil(G / 18) dwords per row and group): tq2's
    bytes at G = 128, 15 of tq2's 16 dwords at G = 256, and the roofline counts what the kernel reads."""
    from conftest import random_model, tiny_config
    from ternary_mamba.bench.roofline import bytes_breakdown, kernel_summary
    from ternary_mamba.bench.runtime import pack_in_place
    from ternary_mamba.ops import decode_layouts
    from ternary_mamba.runtime.heads import use_fp16_head
    for G, dwords in ((128, 8), (256, 15)):
        m = random_model(tiny_config(d_model=256)).eval()
        pack_in_place(m, G)
        use_fp16_head(m)
        lins = [lin for layer in m.backbone.layers for lin in (layer.mixer.in_proj, layer.mixer.out_proj)]
        tq2 = sum(lin.codes.numel() for lin in lins)
        if not decode_layouts.available("lut"):
            assert bytes_breakdown(m)["codes"] == tq2
            continue
        assert "tq2_lut" in kernel_summary(m)
        assert bytes_breakdown(m)["codes"] == tq2 * dwords * 4 // (G // 4)


def test_the_compute_probe_reports_one_thread_as_one():
    from ternary_mamba.bench.probes import thread_scaling
    from ternary_mamba.ops.build import get_kernel, set_threads
    if get_kernel() is None:
        pytest.skip("no C compiler")
    import torch
    n = torch.get_num_threads()
    set_threads(1)
    try:
        assert 0.5 < thread_scaling(iters=2_000_000) < 2.0        # one thread against itself
    finally:
        set_threads(n)


def test_rounds_read_the_probe_around_each_roofline_variant_and_keep_the_best():
    """interleaved_rounds: the probe at each round's start and after each paired timer (not after the others); each
    paired timing is set against the larger reading around it; best rates and the best reading are kept."""
    from ternary_mamba.bench.rounds import interleaved_rounds
    log, readings = [], iter([30.0, 50.0, 40.0, 60.0, 35.0, 45.0])
    rates = {"a": iter([10.0, 12.0]), "b": iter([5.0, 4.0]), "llama": iter([7.0, 8.0])}

    def probe():
        log.append("probe")
        return next(readings)

    def timer(k):
        def run():
            log.append(k)
            return next(rates[k])
        return run
    best, around, top = interleaved_rounds({k: timer(k) for k in ("a", "b", "llama")}, 2, probe, {"a", "b"})
    assert log == ["probe", "a", "probe", "b", "probe", "llama"] * 2
    assert best == {"a": 12.0, "b": 5.0, "llama": 8.0} and top == 60.0
    assert around == {"a": [(10.0, 50.0), (12.0, 60.0)], "b": [(5.0, 50.0), (4.0, 45.0)]}


def test_paired_share_is_the_median_over_rounds():
    from ternary_mamba.bench.rounds import paired_share
    mb = 500e6                                          # 10 tok/s x 500 MB = 5 GB/s
    assert paired_share([], mb) is None
    assert paired_share([(10.0, 10.0)], mb) == pytest.approx(50.0)
    assert paired_share([(10.0, 10.0), (10.0, 5.0), (10.0, 50.0)], mb) == pytest.approx(50.0)
    assert paired_share([(10.0, 10.0), (10.0, 5.0)], mb) == pytest.approx(75.0)
    assert paired_share([(20.0, 5.0)], mb) == pytest.approx(200.0)     # the machine sped up within the round


def test_share_text_never_prints_a_share_above_100_percent():
    from ternary_mamba.bench.rounds import share_text
    assert share_text(57.4, 78.2) == " 57 % of it;  78 % of the bandwidth probed around each round (median)"
    assert share_text(80.0, None) == " 80 % of it"
    for text in (share_text(101.0, 50.0), share_text(50.0, 107.0), share_text(120.0, 130.0)):
        assert "not a limit" in text or "a limit, not >100 %" in text
        assert not any(f"{v} %" in text for v in range(101, 200))


def test_a_paired_timer_after_an_unpaired_one_gets_a_fresh_reading_before_it():
    from ternary_mamba.bench.rounds import interleaved_rounds
    log, readings = [], iter([30.0, 31.0, 32.0, 33.0])

    def probe():
        log.append("probe")
        return next(readings)

    def timer(k, v):
        def run():
            log.append(k)
            return v
        return run
    _, around, top = interleaved_rounds({"llama": timer("llama", 1.0), "a": timer("a", 2.0)}, 1, probe, {"a"})
    assert log == ["probe", "llama", "probe", "a", "probe"]
    assert around == {"a": [(2.0, 32.0)]} and top == 32.0


@pytest.mark.parametrize("sizes", [[1], [64, 3, 200], [4096 + 17, 65 * 64, 5]])
def test_the_read_only_pass_reads_every_byte_and_writes_back_the_same(sizes):
    """csrc/bandwidth.c stream_ranges: its checksum is the xor of every 8-byte word of each range's whole 64-byte
    lines and of its tail bytes, over regions of one or more ranges, whatever the split across threads; ranges
    flagged as written keep their contents."""
    import ctypes
    lib = get_kernel()
    if lib is None:
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(len(sizes))
    bufs = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for n in sizes]
    before = [b.clone() for b in bufs]
    want = 0
    for b in bufs:
        full = b.numel() // 64 * 64
        want ^= int(np.bitwise_xor.reduce(b[:full].numpy().view(np.int64))) if full else 0
        for v in b[full:].tolist():
            want ^= v
    k = len(bufs)
    for flags in ([3] * k, [2] + [1] * (k - 1), [2 + (i % 2) for i in range(k)]):
        got = lib.stream_ranges((ctypes.c_void_p * k)(*[b.data_ptr() for b in bufs]),
                                (ctypes.c_int64 * k)(*sizes), (ctypes.c_uint8 * k)(*flags), k, 0)
        assert got == want, flags
        assert all(torch.equal(a, b) for a, b in zip(bufs, before))


def test_the_read_only_pass_covers_the_bytes_of_the_decode_roofline():
    """What the read-only pass moves is the roofline's bytes less the small per-layer tensors and the embedding
    row, for every engine variant (so the ratio the benchmark prints compares a mode with its own bytes); at
    d_model 256 every projection's rows fill the re-laid layouts' blocks (no padding rows to read)."""
    from conftest import random_model, tiny_config
    from ternary_mamba.bench.probes import read_only_timer
    from ternary_mamba.bench.roofline import bytes_breakdown, bytes_per_token
    from ternary_mamba.bench.runtime import build_variants
    if get_kernel() is None:
        pytest.skip("no C compiler")
    for name, m in build_variants(random_model(tiny_config(d_model=256)).eval(), "decode").items():
        timer = read_only_timer(m, 2)
        assert timer is not None and timer() > 0, name
        parts = bytes_breakdown(m)
        assert timer.nbytes == bytes_per_token(m) - parts["small tensors"] - parts["embedding row"], name


def test_the_read_only_line_never_prints_a_share_above_100_percent():
    """A pass faster than the best probe, or a mode faster than its pass, is said in words, not as > 100 %."""
    import re
    from ternary_mamba.bench.runtime import read_only_text

    class Pass:
        nbytes = 5e8
    for rate, bw, ratio in ((100, 40, 90.0), (100, 60, 120.0), (100, 60, None), (60, 60, 100.0)):
        text = read_only_text(Pass(), rate, bw, ratio)
        assert all(float(v) <= 100 for v in re.findall(r"(\d+) %", text)), text
    assert "above the best probe" in read_only_text(Pass(), 100, 40, 90.0)
    assert "faster than it" in read_only_text(Pass(), 100, 60, 120.0)


def _has_avx512_vnni() -> bool:
    try:
        flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "").split()
    except OSError:
        return False
    return {"avx512f", "avx512bw", "avx512_vnni", "f16c"} <= set(flags)


def test_stream_probe_builds_checks_and_times(tmp_path):
    """scripts/stream_probe.sh (docs/SPEED.md, "The GEMV reads at the one-stream rate") still builds against the shipped
    r32 kernel, its four-stream variant still equals r32 bit for bit (it exits 1 otherwise), and a bad argument is
    one usage line and exit 2."""
    import os
    import shutil
    import subprocess
    from pathlib import Path
    if shutil.which("gcc") is None or not _has_avx512_vnni():
        pytest.skip("needs gcc and an AVX512-VNNI CPU")
    script = Path(__file__).resolve().parents[1] / "scripts" / "stream_probe.sh"
    env = {**os.environ, "THREADS": "2", "TMPDIR": str(tmp_path)}
    r = subprocess.run(["bash", str(script), "1", "2"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    names = ["r32 (shipped)", "r16x4", "read x1", "read x4"]
    assert all(any(ln.startswith(n) and "GB/s" in ln for ln in r.stdout.splitlines()) for n in names), r.stdout
    bad = subprocess.run(["bash", str(script), "1", "0"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "usage" in bad.stderr
