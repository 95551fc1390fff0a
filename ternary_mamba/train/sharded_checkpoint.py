"""Sharded checkpoints for FSDP2 runs: every rank writes its own shards, nothing is gathered to rank 0.

A checkpoint of a run on W ranks holds `shard-RRRRR-of-WWWWW.safetensors` (one per rank) beside
`trainer_state.json`.  Each file holds that rank's rows of every sharded tensor — model parameters and AdamW
moments, sharded along dim 0 as FSDP2 shards them — and rank 0's file also the replicated ones (step counts).
Its safetensors metadata says, as JSON, each tensor's global shape and the rows it holds ("layout"), and in rank
0's file the optimizer's parameter groups.  No pickle anywhere: the files are safetensors and JSON.

Loading reads every shard, checks that the pieces of each tensor tile its global shape exactly, and gives the
full (unsharded) state dicts to the loader all runs use (`distributed.load_full_state`): so a sharded
checkpoint resumes at any world size, or in one process.  Saving is asynchronous (`ShardedSaver`): a copy of the
shards to CPU memory, a background write, and the commit (rank 0's atomic swap of the folder, after a barrier)
at the start of the next step.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from .. import faults
from ..errors import UserError
from ..formats.fs import save_safetensors

SHARD = re.compile(r"shard-(\d{5})-of-(\d{5})\.safetensors")
MODEL, OPTIM = "model/", "optim/"


def is_sharded(folder: Path) -> bool:
    return any(SHARD.fullmatch(p.name) for p in Path(folder).glob("shard-*.safetensors"))


def _local_rows(t, rank: int, world: int) -> tuple[torch.Tensor, int | None]:
    """(the rows this rank holds, their first row in the global tensor) — None for a replicated tensor."""
    from torch.distributed.tensor import DTensor, Shard
    if not isinstance(t, DTensor):
        return t, None
    if len(t.placements) != 1 or not isinstance(t.placements[0], Shard) or t.placements[0].dim != 0:
        raise RuntimeError(f"sharded checkpoints expect FSDP2's dim-0 sharding, got {t.placements}")
    local = t.to_local()
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        start = int(offset[0])
    except (ImportError, TypeError):       # FSDP2 shards as torch.chunk does
        start = min(rank * math.ceil(t.shape[0] / world), t.shape[0])
    return local, start


def shard_tensors(model, optimizer, rank: int, world: int) -> tuple[dict, dict]:
    """A snapshot of this rank's shards (CPU copies: training may go on while they are written) and the file's
    metadata."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=False)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    tensors, layout = {}, {}

    def put(key: str, value) -> None:
        value = value if isinstance(value, torch.Tensor) else torch.tensor(value)
        local, start = _local_rows(value, rank, world)
        if start is None and rank != 0:
            return                                   # replicated: rank 0 writes it once
        tensors[key] = local.detach().to("cpu").contiguous().clone()
        layout[key] = [list(value.shape), start]

    for k, v in msd.items():
        put(MODEL + k, v)
    for name, state in osd["state"].items():
        for k, v in state.items():
            put(f"{OPTIM}{name}/{k}", v)
    meta = {"layout": json.dumps(layout), "rank": str(rank), "world_size": str(world)}
    if rank == 0:
        meta["param_groups"] = json.dumps(osd["param_groups"])
    return tensors, meta


def shard_name(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.safetensors"


class ShardedSaver:
    """Asynchronous sharded saves for one rank.  `save` snapshots this rank's shards (a copy to CPU memory), then
    a background thread writes them while training goes on; `commit` (called by every rank at the start of the
    next step, or at once for the last save) waits for the writes of every rank (a barrier) and rank 0 swaps the
    folder in.  Until then the previous checkpoint stays in place, so a kill at any point leaves one complete
    checkpoint; what a killed save left is removed at the next start (`remove_stale_temps`)."""

    def __init__(self, ckpt_dir: Path, rank: int, world: int, barrier):
        from ..formats.fs import shared_temp
        self.ckpt_dir, self.rank, self.world, self.barrier = Path(ckpt_dir), rank, world, barrier
        self.tmp = shared_temp(self.ckpt_dir)
        self._pending = None

    def save(self, model, optimizer, step: int, wait: bool) -> int | None:
        """Start saving `step`; with wait=True also commit it.  Returns the step committed by this call, if any."""
        import shutil
        import threading
        committed = self.commit()
        if self.rank == 0:
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir(parents=True)
        self.barrier()                                   # the empty shared folder exists for every rank
        faults.point("save0")
        tensors, meta = shard_tensors(model, optimizer, self.rank, self.world)
        box: dict = {}

        def write() -> None:
            try:
                save_safetensors(tensors, self.tmp / shard_name(self.rank, self.world), meta)
            except BaseException as e:  # noqa: BLE001 - handed to commit(), raised there
                box["error"] = e
        thread = threading.Thread(target=write, name="checkpoint-writer", daemon=True)
        thread.start()
        self._pending = (step, thread, box)
        return self.commit() if wait else committed

    def commit(self) -> int | None:
        """Finish the pending save (every rank calls this); returns its step, or None when none was pending."""
        if self._pending is None:
            return None
        step, thread, box = self._pending
        self._pending = None
        thread.join()
        if "error" in box:
            e = box["error"]
            if isinstance(e, OSError) and e.filename and str(e.filename).startswith(str(self.tmp)):
                raise OSError(e.errno, e.strerror, str(self.ckpt_dir) + str(e.filename)[len(str(self.tmp)):])
            raise e
        self.barrier()                                   # every rank's shard is on disk
        faults.point("save1")
        if self.rank == 0:
            from ..formats.fs import commit_dir, recover
            (self.tmp / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": self.world,
                                                                     "sharded": True}))
            faults.point("save3")
            recover(self.ckpt_dir)
            commit_dir(self.tmp, self.ckpt_dir)
        self.barrier()                                   # committed before anyone reads or saves again
        return step


def load_sharded(folder: Path) -> tuple[dict, dict, int]:
    """The full model and optimizer state dicts of a sharded checkpoint, and the world size that wrote it; any
    file missing, damaged or not tiling its tensors is a UserError naming it."""
    from safetensors import safe_open
    folder = Path(folder)
    files = sorted(p for p in folder.glob("shard-*.safetensors") if SHARD.fullmatch(p.name))
    worlds = {int(SHARD.fullmatch(p.name).group(2)) for p in files}
    if len(worlds) != 1:
        raise UserError(f"{folder}: shard files of different world sizes {sorted(worlds)}")
    world = worlds.pop()
    ranks = sorted(int(SHARD.fullmatch(p.name).group(1)) for p in files)
    if ranks != list(range(world)):
        raise UserError(f"{folder}: {len(files)} shard files for a world size of {world} (ranks {ranks[:8]})")
    pieces: dict[str, list] = {}
    shapes: dict[str, tuple] = {}
    groups = None
    for p in files:
        try:
            with safe_open(str(p), "pt") as h:
                meta = h.metadata() or {}
                layout = json.loads(meta.get("layout", "null"))
                if not isinstance(layout, dict) or set(layout) != set(h.keys()):
                    raise ValueError("its layout does not list its tensors")
                if "param_groups" in meta:
                    groups = json.loads(meta["param_groups"])
                for key in h.keys():
                    shape, start = layout[key]
                    t = h.get_tensor(key)
                    if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
                        raise ValueError(f"{key}: global shape {shape!r:.40}")
                    if shapes.setdefault(key, tuple(shape)) != tuple(shape):
                        raise ValueError(f"{key}: global shapes disagree between shards")
                    pieces.setdefault(key, []).append((start, t))
        except Exception as e:  # noqa: BLE001 - safetensors' own error type too: any failure is a damaged file
            raise UserError(f"{p}: not a readable checkpoint shard ({str(e).splitlines()[0][:160]})") from None
    if not isinstance(groups, list):
        raise UserError(f"{folder}: the optimizer's parameter groups are missing (rank 0's shard)")
    full = {key: _assemble(key, shapes[key], parts, folder) for key, parts in pieces.items()}
    msd = {k[len(MODEL):]: v for k, v in full.items() if k.startswith(MODEL)}
    state: dict[str, dict] = {}
    for k, v in full.items():
        if k.startswith(OPTIM):
            name, _, what = k[len(OPTIM):].rpartition("/")
            state.setdefault(name, {})[what] = v
    return msd, {"state": state, "param_groups": groups}, world


def _assemble(key: str, shape: tuple, parts: list, folder: Path) -> torch.Tensor:
    if any(start is None for start, _ in parts):
        if len(parts) != 1 or tuple(parts[0][1].shape) != shape:
            raise UserError(f"{folder}: {key}: a replicated tensor written {len(parts)} times or of the wrong shape")
        return parts[0][1]
    parts = sorted(parts, key=lambda p: p[0])
    row = 0
    for start, t in parts:
        if start != row or tuple(t.shape[1:]) != shape[1:]:
            raise UserError(f"{folder}: {key}: its shards do not tile the tensor (rows from {start}, expected {row})")
        row += t.shape[0]
    if row != (shape[0] if shape else 0):
        raise UserError(f"{folder}: {key}: shards cover {row} of {shape[0] if shape else 0} rows")
    return torch.cat([t for _, t in parts]) if len(parts) > 1 else parts[0][1]
