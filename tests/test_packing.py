import pytest
import torch

from ternary_mamba.ops.packing import pack, unpack


@pytest.mark.parametrize("packing", ["tq2", "tq1"])
@pytest.mark.parametrize("shape", [(1,), (3, 5), (7, 13), (64, 256), (5, 1, 3)])
def test_roundtrip_odd_shapes(packing, shape):
    codes = torch.randint(-1, 2, shape, generator=torch.Generator().manual_seed(0)).to(torch.int8)
    before = codes.clone()
    packed = pack(codes, packing)
    assert torch.equal(codes, before)  # input untouched
    n = codes.numel()
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n // {"tq2": 4, "tq1": 5}[packing])
    assert torch.equal(unpack(packed, packing, shape), codes)


def test_known_bytes():
    assert pack(torch.tensor([-1, 0, 1, 1], dtype=torch.int8), "tq2").tolist() == [0 + 4 + 32 + 128]
    assert pack(torch.tensor([1, 1, 1, 1, 1], dtype=torch.int8), "tq1").tolist() == [242]


def test_bad_input():
    with pytest.raises(ValueError):
        pack(torch.tensor([2], dtype=torch.int8), "tq2")
    with pytest.raises(ValueError):
        unpack(torch.tensor([255], dtype=torch.uint8), "tq1", (5,))
    with pytest.raises(ValueError):
        unpack(torch.tensor([1, 2], dtype=torch.uint8), "tq2", (3,))
