"""Reading sharded checkpoints (train/sharded_checkpoint.py) from hand-made shard files: the pieces tile each
tensor back, and every damage (a missing shard, a gap, an overlap, a bad layout) is one UserError naming the file."""
import json

import pytest
import torch
from safetensors.torch import save_file

from ternary_mamba.errors import UserError
from ternary_mamba.train.sharded_checkpoint import is_sharded, load_sharded

W = torch.arange(20, dtype=torch.float32).view(5, 4)
GROUPS = [{"params": ["w"], "lr": 1e-3, "betas": [0.9, 0.95]}]


def _shard(folder, rank, world, tensors, layout, groups=True):
    meta = {"layout": json.dumps(layout), "rank": str(rank), "world_size": str(world)}
    if groups and rank == 0:
        meta["param_groups"] = json.dumps(GROUPS)
    save_file(tensors, str(folder / f"shard-{rank:05d}-of-{world:05d}.safetensors"), metadata=meta)


def _good(folder, rows=(3, 5)):
    _shard(folder, 0, 2, {"model/w": W[:rows[0]].clone(), "optim/w/exp_avg": W[:rows[0]].clone(),
                          "optim/w/step": torch.tensor(3.0)},
           {"model/w": [[5, 4], 0], "optim/w/exp_avg": [[5, 4], 0], "optim/w/step": [[], None]})
    _shard(folder, 1, 2, {"model/w": W[rows[0]:rows[1]].clone(), "optim/w/exp_avg": W[rows[0]:rows[1]].clone()},
           {"model/w": [[5, 4], rows[0]], "optim/w/exp_avg": [[5, 4], rows[0]]})


def test_shards_tile_back_into_full_state_dicts(tmp_path):
    _good(tmp_path)
    assert is_sharded(tmp_path)
    msd, osd, world = load_sharded(tmp_path)
    assert world == 2 and torch.equal(msd["w"], W) and torch.equal(osd["state"]["w"]["exp_avg"], W)
    assert float(osd["state"]["w"]["step"]) == 3.0 and osd["param_groups"] == GROUPS


@pytest.mark.parametrize("damage,msg", [
    ("missing", "1 shard files for a world size of 2"),
    ("gap", "do not tile"),
    ("short", "cover 4 of 5 rows"),
    ("layout", "layout does not list"),
    ("truncated", "not a readable checkpoint shard"),
    ("groups", "parameter groups are missing")])
def test_a_damaged_sharded_checkpoint_is_one_error(tmp_path, damage, msg):
    _good(tmp_path)
    s1 = tmp_path / "shard-00001-of-00002.safetensors"
    if damage == "missing":
        s1.unlink()
    elif damage == "gap":
        _shard(tmp_path, 1, 2, {"model/w": W[4:5].clone(), "optim/w/exp_avg": W[3:5].clone()},
               {"model/w": [[5, 4], 4], "optim/w/exp_avg": [[5, 4], 3]})
    elif damage == "short":
        _shard(tmp_path, 1, 2, {"model/w": W[3:4].clone(), "optim/w/exp_avg": W[3:5].clone()},
               {"model/w": [[5, 4], 3], "optim/w/exp_avg": [[5, 4], 3]})
    elif damage == "layout":
        _shard(tmp_path, 1, 2, {"model/w": W[3:5].clone()}, {"other": [[5, 4], 3]})
    elif damage == "truncated":
        s1.write_bytes(s1.read_bytes()[:40])
    else:
        for f in tmp_path.iterdir():
            f.unlink()
        _shard(tmp_path, 0, 1, {"model/w": W.clone()}, {"model/w": [[5, 4], 0]}, groups=False)
    with pytest.raises(UserError, match=msg):
        load_sharded(tmp_path)
