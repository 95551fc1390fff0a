"""Run folders: creation, the resume check, data preparation shared by `pretrain` and `quantize`.

A run folder holds run.json (the command's typed config: `--config run.json` replays the run), metrics.jsonl,
checkpoint/ (latest complete state, swapped in atomically), and at the end the trained model folder and
summary.json.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..formats.fs import read_json, recover, remove_stale_temps, write_json_atomic
from ..formats.datasets import is_hub_source
from .data import PackedSequences, load_tokens, split_heldout, tokenize_to_file
from ..log import say

RUN_JSON = "run.json"


def run_record(command: str, cfg) -> dict:
    """What run.json holds: the command and its complete typed config (a file `--config` replays), the world
    size (the global batch depends on it) and the version that wrote it."""
    from ..version import __version__
    from . import distributed as D
    return {"command": command, "ternary_mamba": __version__, "world_size": D.world()[1], "config": cfg.to_dict(),
            "environment": environment()}


def environment() -> dict:
    """What changes a run's numbers besides its config: versions, CPU kind, threads, the kernels' build target
    and whether they are built (recorded in run.json; `--threads` replays the thread count)."""
    import os
    import platform

    import torch

    from ..ops.build import get_kernel, kernel_threads
    from ..ops.device import cpu_description
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": cpu_description(),
            "threads": torch.get_num_threads(), "kernel_threads": kernel_threads(),
            "kernels": "built" if get_kernel() is not None else "none (PyTorch reference)",
            "kernel_march": os.environ.get("TERNARY_MAMBA_MARCH", "native"),
            "cuda": torch.version.cuda if torch.cuda.is_available() else None,
            "reference_path": os.environ.get("TERNARY_MAMBA_REFERENCE") or None}


def _flat(d, prefix: tuple = ()):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _flat(v, prefix + (k,))
    else:
        yield prefix, d


def config_diff(old: dict, new: dict, free: set[tuple]) -> list[tuple[str, object, object]]:
    """(dotted name, old value, new value) of every setting that differs, leaving out `free` paths."""
    a, b = dict(_flat(old)), dict(_flat(new))
    return [(".".join(k), a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k not in free and a.get(k) != b.get(k)]


def prepare_run_dir(out: Path, record: dict, resume: bool, free: set[tuple] = frozenset()) -> bool:
    """Create (or check for resuming) a run folder; returns True when a checkpoint should be loaded."""
    if check_run_dir(out, record, resume, free):
        return True
    if not Path(out).exists():
        _created.add(str(Path(out).absolute()))
    Path(out).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(out) / RUN_JSON, record)
    return False


_created: set[str] = set()     # run folders this process made (removed again if the run fails before it has run)


SHARING = {"world_size", "train.batch_size", "train.grad_accum"}   # how a global batch is shared out


def _global_batch(rec: dict) -> int | None:
    t = (rec.get("config") or {}).get("train") or {}
    try:
        return int(rec.get("world_size", 1)) * int(t["batch_size"]) * int(t.get("grad_accum", 1))
    except (KeyError, TypeError, ValueError):
        return None


def _same_global_batch(diff: list, old: dict, new: dict) -> list:
    """A resume may share the global batch out differently (another world size, micro-batch or accumulation:
    checkpoints hold full state and the data order depends on the global batch alone); only that is dropped."""
    if not diff or not {k for k, _, _ in diff} & SHARING:
        return diff
    g_old, g_new = _global_batch(old), _global_batch(new)
    if g_old is None or g_old != g_new:
        return diff
    rest = [d for d in diff if d[0] not in SHARING]
    if not rest:
        say(f"resuming with the global batch of {g_new} sequences shared out anew (world size "
              f"{old.get('world_size', 1)} -> {new.get('world_size', 1)})")
    return rest


def check_run_dir(out: Path, record: dict, resume: bool, free: set[tuple] = frozenset()) -> bool:
    """Every check of a run folder, writing nothing (so it runs before tokenizing): True when a checkpoint is to
    be loaded, False when a new run may start there."""
    out = Path(out)
    run_json = out / RUN_JSON
    recover(out / "checkpoint")       # a replacement interrupted by a kill: the previous checkpoint comes back
    if resume:
        if not run_json.exists():
            raise UserError(f"{out}: not a run folder (no run.json); cannot --resume")
        old = read_json(run_json)
        if not isinstance(old.get("config"), dict):
            raise UserError(f"{run_json}: written by an older ternary-mamba (no typed config); it cannot be "
                            "resumed by this version — start a new run")
        if old.get("command") != record["command"]:
            raise UserError(f"{out}: is a `{old.get('command')}` run, not `{record['command']}`")
        diff = config_diff({"world_size": old.get("world_size", 1), **old["config"]},
                           {"world_size": record["world_size"], **record["config"]}, free)
        diff = _same_global_batch(diff, old, record)
        if diff:
            k, a, b = diff[0]
            raise UserError(f"{out}: --resume with a different config ({k}: run has {a!r}, now {b!r}); "
                            "use the same arguments or a new --out")
        if not (out / "checkpoint" / "trainer_state.json").exists():
            raise UserError(f"{out}: has no checkpoint yet (it stopped before its first save); start it again "
                            "with a new --out, or delete this folder")
        return True
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is a file; choose another --out")
    if out.exists() and any(out.iterdir()):
        what = "already holds a run" if run_json.exists() else "exists and is not empty"
        raise UserError(f"{out}: {what}; pass --resume to continue it or choose another --out")
    return False


_locks: dict[str, int] = {}


def claim_run_dir(out: Path) -> None:
    """Hold this run folder for the life of the process: an exclusive lock (flock) on `.NAME.lock` beside it, so two
    runs on one --out cannot both proceed (the check and the run.json write are not one atomic step).  The lock is
    the kernel's: a killed run releases it (its empty lock file may stay; a finished one removes it)."""
    import fcntl
    import os
    out = Path(out).absolute()
    if str(out) in _locks:
        return
    for up in (out.parent, *out.parent.parents):
        if up.exists() and not up.is_dir():
            raise UserError(f"{up}: exists and is not a folder; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f".{out.name}.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"{lock}: cannot create the run's lock file ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UserError(f"{out}: another run is using this folder right now; wait for it or choose another --out") \
            from None
    _locks[str(out)] = fd
    import atexit

    def release():   # the lock file goes with the run (the lock itself dies with the process anyway)
        try:
            lock.unlink()
        except OSError:
            pass
    atexit.register(release)


def holding_run_dirs(fn, cfg):
    """fn(cfg) with the run folders it claims released however it ends; if it fails, a folder it created that
    holds nothing but its run.json goes too (the Python twins of `pretrain` and `quantize`)."""
    try:
        out = fn(cfg)
    except BaseException:
        release_run_dirs(failed=True)
        raise
    release_run_dirs()
    return out


def release_run_dirs(failed: bool = False) -> None:
    """Let go of every run folder this process holds (the end of a command; the CLI and the Python API).  After a
    failed start, a folder this process created that holds nothing but its run.json is removed: a failed start
    leaves no output behind."""
    import os
    for key in list(_created):
        _created.discard(key)
        out = Path(key)
        if failed and out.is_dir() and {p.name for p in out.iterdir()} <= {RUN_JSON}:
            try:
                (out / RUN_JSON).unlink(missing_ok=True)
                out.rmdir()
            except OSError:
                pass
    for key in list(_locks):
        try:
            os.close(_locks.pop(key))
        except OSError:
            pass


def prepare_run_and_data(out: Path, record: dict, resume: bool, free: set[tuple], data, eval_data, tok,
                         seq_len: int, heldout_fraction: float, cache_dir, budget: int | None = None
                         ) -> tuple[bool, PackedSequences, PackedSequences]:
    """Rank 0 tokenizes (filling the cache) and creates / checks the run folder; the other ranks wait,
    then read the cached tokens.  Returns (load checkpoint?, train, held-out)."""
    from . import distributed as D
    if D.is_main():
        claim_run_dir(out)                          # no second run on this folder from here on
        check_run_dir(out, record, resume, free)   # before minutes of tokenizing, and before writing anything
        remove_stale_temps(Path(out) / "checkpoint")   # what a save killed mid-way left beside the checkpoint
        train, held = prepare_data(data, eval_data, tok, seq_len, heldout_fraction, cache_dir, budget=budget)
        load = prepare_run_dir(out, record, resume, free)
    D.barrier_for_slow_work()     # the others wait for the token cache (longer than a collective's timeout)
    if not D.is_main():
        train, held = prepare_data(data, eval_data, tok, seq_len, heldout_fraction, cache_dir, verbose=False,
                                   budget=budget)
        load = resume and (Path(out) / "checkpoint" / "trainer_state.json").exists()
    return load, train, held


def prepare_data(data: list[str], eval_data: list[str] | None, tokenizer, seq_len: int,
                 heldout_fraction: float, cache_dir=None, verbose: bool = True, budget: int | None = None
                 ) -> tuple[PackedSequences, PackedSequences]:
    """Token files of the training (and held-out) text.  `budget`: the run's training tokens; a streamed hub
    dataset is read only that far (plus the held-out split and 5 %), local files are read whole."""
    cap = None
    if budget is not None and any(is_hub_source(str(d)) for d in data):
        cap = int(budget * 1.05 / (1 - (0 if eval_data else heldout_fraction))) + 64 * seq_len
    tokens = load_tokens(tokenize_to_file(data, tokenizer, cache_dir, verbose, max_tokens=cap))
    if eval_data:
        held = PackedSequences(load_tokens(tokenize_to_file(eval_data, tokenizer, cache_dir, verbose)), seq_len)
        return PackedSequences(tokens, seq_len), held
    return split_heldout(tokens, seq_len, heldout_fraction)
