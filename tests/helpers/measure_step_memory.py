"""Peak memory of one real QAT+KD step on the CPU through the PyTorch path (what the planner models), in a
fresh process: prints `measured_bytes planned_bytes`.  Used by tests/test_plan.py."""
import copy
import resource
import sys

import torch

from ternary_mamba.core.config import Mamba2Config
from ternary_mamba.core.model import Mamba2LM
from ternary_mamba.ops.dispatch import reference_path
from ternary_mamba.quant.config import TernaryConfig
from ternary_mamba.quant.qat import quantize_
from ternary_mamba.train.checkpointing import checkpoint_blocks_
from ternary_mamba.train.distill import DistillObjective
from ternary_mamba.train.memory import plan_memory


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def rss_peak() -> int:
    """This process's high-water RSS (VmHWM: per address space, reset by exec; ru_maxrss is not, and reports the
    parent's size when the parent, e.g. pytest, was larger at the fork)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def main(batch: int, seq_len: int, checkpointing: bool) -> None:
    torch.set_num_threads(1)
    cfg = Mamba2Config(d_model=256, n_layer=4, d_state=64, headdim=32, vocab_size=8192)
    q = TernaryConfig(group_size=128, scale_mode="learned")
    planned = plan_memory(cfg, q, batch, seq_len, "fp32", checkpointing=checkpointing).peak
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1))
    before = rss_now()
    teacher = Mamba2LM(cfg)
    student = copy.deepcopy(teacher)
    quantize_(student, q)
    if checkpointing:
        checkpoint_blocks_(student)
    objective = DistillObjective(teacher)
    opt = torch.optim.AdamW(objective.param_groups(student), lr=1e-3)
    with reference_path():
        loss, _ = objective.loss(student, ids)
        loss.backward()
    opt.step()
    peak = rss_peak()
    print(peak - before, planned)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1")
