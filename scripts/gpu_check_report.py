"""The table and JSON of scripts/gpu_check.sh from what its steps left in OUT (runs on any machine)."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _json(p: Path):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _losses(run: Path) -> list[float]:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    out = {}
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and "loss" in r and "step" in r:
            out[r["step"]] = r["loss"]
    return [out[k] for k in sorted(out)]


def _gap(a: list[float], b: list[float]) -> float | None:
    n = min(len(a), len(b))
    return max(abs(x - y) for x, y in zip(a[:n], b[:n])) if n else None


def _qat_row(summary) -> dict:
    rows = (summary or {}).get("rows", {})
    return next((v for k, v in rows.items() if k.startswith("QAT+KD")), {})


def report(out: Path) -> dict:
    steps = {}
    for line in (out / "steps.txt").read_text().splitlines() if (out / "steps.txt").exists() else []:
        name, secs, rc = line.split()
        steps[name] = {"seconds": int(secs), "rc": int(rc)}
    res = {"environment": (out / "env.log").read_text().strip() if (out / "env.log").exists() else "",
           "steps": steps, "ops": (_json(out / "ops.json") or {}).get("ops", []),
           "bench": (_json(out / "bench.json") or {}).get("settings", [])}
    ddp, fsdp, resumed = _losses(out / "ddp"), _losses(out / "fsdp"), _losses(out / "killed")
    log = (out / "ddp.log").read_text() if (out / "ddp.log").exists() else ""
    res["distributed"] = {"nccl_group_formed": "distributed: DDP over 1 rank(s), nccl" in log,
                          "steps": len(ddp), "fsdp_vs_ddp_max_loss_gap": _gap(fsdp, ddp),
                          "killed_resumed_vs_ddp_max_loss_gap": _gap(resumed, ddp),
                          "resumed_steps": len(resumed)}
    fp32, bf16 = _losses(out / "fp32"), _losses(out / "bf16")
    res["bf16_vs_fp32"] = {"steps": min(len(fp32), len(bf16)), "max_loss_gap": _gap(bf16, fp32),
                           "final_kl_fp32": _qat_row(_json(out / "fp32" / "summary.json")).get("kl"),
                           "final_kl_bf16": _qat_row(_json(out / "bf16" / "summary.json")).get("kl")}
    return res


def table(res: dict) -> str:
    lines = ["| step | seconds | exit |", "|---|---:|---:|"]
    lines += [f"| {k} | {v['seconds']} | {v['rc']} |" for k, v in res["steps"].items()]
    if res["ops"]:
        lines += ["", "| op | pass | impl | max out diff | max grad diff | fast ms | ref ms |", "|---|---|---|---:|---:|---:|---:|"]
        lines += [f"| {r['op']} | {r['pass']} | {r['impl']} | {r['out_diff']:.2e} | "
                  f"{r['grad_diff']:.2e} | {r['fast_ms']:.2f} | {r['ref_ms']:.2f} |" for r in res["ops"]]
    if res["bench"]:
        lines += ["", "| model | batch x seq | ckpt | path | tok/s | plan's tok/s | MFU | peak GB | plan GB |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['preset']} | {r['batch']} x {r['seq_len']} | {'yes' if r['checkpointing'] else 'no'} | "
                  f"{r['path']} | {r['tok_s']:,.0f} | {r.get('predicted_tok_s') or float('nan'):,.0f} | "
                  f"{100 * r['mfu']:.1f} % | {r['peak_gb']:.1f} | {r['planned_gb']:.1f} |" for r in res["bench"]]
    d, b = res["distributed"], res["bf16_vs_fp32"]
    lines += ["", f"NCCL at world size 1: group formed {d['nccl_group_formed']}, {d['steps']} steps; FSDP2 vs DDP max "
              f"loss gap {d['fsdp_vs_ddp_max_loss_gap']}; killed + resumed vs uninterrupted {d['killed_resumed_vs_ddp_max_loss_gap']} "
              f"({d['resumed_steps']} steps)",
              f"bf16 vs fp32 over {b['steps']} steps: max loss gap {b['max_loss_gap']}; final held-out KL to the teacher "
              f"fp32 {b['final_kl_fp32']} / bf16 {b['final_kl_bf16']}"]
    return "\n".join(lines)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    res = report(out)
    (out / "gpu_check.json").write_text(json.dumps(res, indent=2) + "\n")
    t = table(res)
    (out / "table.md").write_text(t + "\n")
    print(t)
