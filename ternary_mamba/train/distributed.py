"""Data-parallel training on torch.distributed: DDP, or FSDP2 (`fully_shard`) with --fsdp.

Launch with torchrun; the backend is NCCL on GPUs and gloo on CPU.  Under torchrun the process group is formed
whatever the world size (`--nproc-per-node 1` runs the DDP / FSDP2 code on one GPU).  Each rank reads its own slice
of every global batch (data.batch_indices), so the global batch is per-rank batch x ranks x accumulation and the
trajectory equals a single process run with that global batch.  Rank 0 alone prints and writes; checkpoints hold
full (unsharded) state dicts, so a run resumes at another world size too, as long as the global batch
(--batch-size x ranks x --grad-accum) stays the same: the data order depends on the global batch alone.

Every collective of ours goes through `all_reduce` (and `barrier`), which puts its tensor on the device the
backend serves (`collective_device`: NCCL serves CUDA tensors only; a CPU tensor there raises "No backend type
associated with device type cpu").  tests/test_collectives.py keeps it so."""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return world()[0] == 0


def launched() -> bool:
    """Started by torchrun (or another launcher that sets the rendezvous environment), at any world size."""
    return "TORCHELASTIC_RUN_ID" in os.environ or all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def init_if_launched() -> None:
    """Join the process group when started by torchrun, world size 1 included."""
    if launched() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=10))
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def shutdown() -> None:
    """Leave the process group (on every exit path, so no rank waits on a closed one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """A process group is formed (under torchrun, at any world size)."""
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if active():
        dev = collective_device()
        if dev.type == "cuda":
            dist.barrier(device_ids=[dev.index])
        else:
            dist.barrier()


_slow_group = {}
SLOW_WAIT = timedelta(hours=6)   # how long the other ranks wait while rank 0 tokenizes a corpus


def barrier_for_slow_work() -> None:
    """A barrier for waits that outlast the process group's timeout (10 minutes): rank 0 tokenizing ~100 M tokens
    before the others read its cache.  It runs on a gloo (CPU) group of its own with a timeout of SLOW_WAIT, so
    an NCCL group's watchdog never fires on it.  Every rank calls it at the same point."""
    if not active():
        return
    if "g" not in _slow_group:
        _slow_group["g"] = dist.new_group(backend="gloo", timeout=SLOW_WAIT)
    dist.barrier(group=_slow_group["g"])


def local_device() -> torch.device:
    """This rank's device: cuda:LOCAL_RANK when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def wrap(model: torch.nn.Module, fsdp: bool, device: torch.device | None = None) -> torch.nn.Module:
    """DDP by default; with fsdp, shard each block then the root (parameters, grads, optimizer state).  The model
    is already on `device` (this rank's GPU, or the CPU)."""
    if not active():
        return model
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        # The policy is stated, not left to defaults: the all-gathered weights stay fp32, because the ternary codes
        # are computed from them (a bf16 gather would round weights near a code threshold to the other code, and
        # the export, made from the fp32 masters, would no longer be the model that was trained); the compute is
        # 16-bit under autocast; gradients are reduced in fp32.
        mp = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
        for layer in model.backbone.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    # gradients as views into the all-reduce buckets: one copy of them, not two
    if device is not None and device.type == "cuda":
        return DDP(model, device_ids=[device.index], gradient_as_bucket_view=True)
    return DDP(model, gradient_as_bucket_view=True)


BACKEND_DEVICE_TYPES = {"gloo": ("cpu",), "nccl": ("cuda",), "mpi": ("cpu",), "ucc": ("cpu", "cuda")}


def served_device_types(backend: str) -> set[str]:
    """Device types a backend serves: "nccl" -> {cuda}, "gloo" -> {cpu}, a map "cpu:gloo,cuda:nccl" -> both."""
    if ":" in backend:
        return {part.split(":")[0].strip() for part in backend.split(",")}
    return set(BACKEND_DEVICE_TYPES.get(backend, ("cpu",)))


def collective_device() -> torch.device:
    """Where this rank's collective tensors must live: the CPU when the backend serves it, else this rank's GPU."""
    return torch.device("cpu") if "cpu" in served_device_types(dist.get_backend()) else local_device()


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    """The one collective of ours: `t` reduced over every rank (sum unless `op`), computed on `collective_device()`
    and returned on t's own device.  Every rank must call it together."""
    x = t.to(collective_device())
    dist.all_reduce(x, op=op if op is not None else dist.ReduceOp.SUM)
    return x.to(t.device)


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, sync: bool) -> Iterator[None]:
    """Around one micro-batch's forward and backward: sync=False (every micro-batch but a step's last) skips the
    gradient reduction, which then happens once per optimizer step (DDP `no_sync`, FSDP2
    `set_requires_gradient_sync`).  The sum is the same; only the order of its additions differs."""
    if sync or not active():
        yield
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def describe(model: torch.nn.Module) -> str:
    """How training is spread, for the run's header: "" in one process, else the wrapper, ranks and backend."""
    if not active():
        return ""
    kind = "DDP" if hasattr(model, "module") else "FSDP2"
    return f"{kind} over {dist.get_world_size()} rank(s), {dist.get_backend()} (collectives on {collective_device()})"


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any: a collective, so all ranks must call it together."""
    if not active():
        return bool(flag)
    return bool(all_reduce(torch.tensor([1.0 if flag else 0.0]), dist.ReduceOp.MAX).item())


def mean_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Average logged scalars over ranks (so logs equal the single-process global-batch values)."""
    if not active() or not metrics:
        return metrics
    keys = sorted(metrics)
    t = all_reduce(torch.tensor([metrics[k] for k in keys], dtype=torch.float64)) / dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def full_state(model, optimizer=None) -> tuple[dict, dict | None]:
    """Full (unsharded, CPU) model and optimizer state dicts, keyed by parameter names; collective."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    return msd, osd


def load_full_state(model, optimizer, msd: dict, osd: dict | None) -> None:
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(model, msd, options=opts)
    if optimizer is not None and osd is not None:
        set_optimizer_state_dict(model, optimizer, osd, options=opts)


def gathered_model(trainer, factory):
    """The trained model as a plain module: itself under DDP / one process; under FSDP a fresh copy
    from `factory()` loaded with the gathered full state dict (a collective: every rank calls this)."""
    if not (active() and trainer.fsdp):
        return trainer.inner
    msd, _ = full_state(trainer.inner)
    if not is_main():  # with cpu_offload only rank 0 receives the gathered tensors
        return trainer.inner
    model = factory()
    model.load_state_dict(msd)
    return model
