"""A GGUF reader of our own: the header, the metadata and the tensor table of a GGUF v2/v3 file, every length
and count checked against the file's size before it is used, and the tensors as read-only views of a memory map.

Why not gguf-py's `GGUFReader`: it builds one numpy view per metadata part, so a real tokenizer's ~50 k tokens and
~50 k merges took 3.4-3.7 s to open (and `generate` opened the file twice: model and tokenizer).  Here numeric
arrays are one `np.frombuffer` and string arrays one pass of `struct.unpack_from`.  tests/test_gguf.py checks
this reader against gguf-py's on our exports and llama.cpp-style files; tests/test_fuzz_records.py feeds it
mutated metadata.

Layout (little-endian; https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): magic "GGUF", version u32,
tensor count u64, metadata count u64; each metadata entry a string key, a u32 value type and the value (a string
is a u64 length and UTF-8 bytes; an array a u32 element type, a u64 count and the elements); each tensor a string
name, u32 dimension count, u64 dimensions (innermost first), u32 ggml type and u64 offset into the data section,
which starts at the next multiple of `general.alignment` (32 unless set).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError

# value type -> (struct format, numpy dtype) for the fixed-size ones
_SCALARS = {0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
            4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
            10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64)}
STRING, ARRAY = 8, 9
MAX_DEPTH = 4          # arrays of arrays: GGUF allows them; nothing sane nests deeper
MAX_DIMS = 4           # ggml's GGML_MAX_DIMS


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]      # PyTorch order (outermost first)
    ggml_type: int
    data: np.ndarray            # uint8, the tensor's bytes (a read-only view of the file)


@dataclass(frozen=True)
class GGUFFile:
    version: int
    fields: dict[str, tuple[object, int]]   # key -> (value, value type); arrays as numpy arrays or lists
    tensors: list[GGUFTensor]


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = memoryview(buf), 0, path    # memoryview: slices without numpy views

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise UserError(f"{self.path}: not a readable GGUF file ({what} runs past the end of the file)")

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{self.path}: {what} is not UTF-8 (byte {e.start})") from None

    def strings(self, count: int, what: str) -> list[str]:
        self.need(8 * count, what)               # each at least its length
        buf, pos, out = self.buf, self.pos, []
        end = len(buf)
        for _ in range(count):
            if pos + 8 > end:
                raise UserError(f"{self.path}: not a readable GGUF file ({what} runs past the end of the file)")
            (n,) = struct.unpack_from("<Q", buf, pos)
            if n > end - pos - 8:
                raise UserError(f"{self.path}: not a readable GGUF file ({what} runs past the end of the file)")
            out.append(bytes(buf[pos + 8:pos + 8 + n]))
            pos += 8 + n
        self.pos = pos
        try:
            return [b.decode("utf-8") for b in out]
        except UnicodeDecodeError as e:
            raise UserError(f"{self.path}: {what} holds a string that is not UTF-8 (byte {e.start})") from None

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype][0], what)
        if vtype == STRING:
            return self.string(what)
        if vtype != ARRAY or depth >= MAX_DEPTH:
            raise UserError(f"{self.path}: not a readable GGUF file ({what} has value type {vtype})")
        etype, count = self.scalar("<I", what), self.scalar("<Q", what)
        if etype in _SCALARS:
            dtype = np.dtype(_SCALARS[etype][1]).newbyteorder("<")
            self.need(count * dtype.itemsize, what)
            arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
            self.pos += count * dtype.itemsize
            return arr
        if etype == STRING:
            return self.strings(count, what)
        self.need(count, what)                    # every element takes at least a byte
        return [self.value(etype, what, depth + 1) for _ in range(count)]


def read_gguf(path: Path, sizes: dict[int, tuple[int, int]], names: dict[int, str] | None = None) -> GGUFFile:
    """Parse `path`.  `sizes`: ggml type -> (values per block, bytes per block) of the types the caller accepts
    (gguf-py's GGML_QUANT_SIZES); a tensor of any other type is refused before its bytes are touched, the error
    naming types by `names` (ggml type -> name)."""
    names = names or {}
    path = Path(path)
    try:
        buf = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:      # ValueError: an empty file cannot be mapped
        raise UserError(f"{path}: not a readable GGUF file ({str(e).splitlines()[0][:120]})") from None
    c = _Cursor(buf, path)
    c.need(24, "the header")
    if bytes(buf[:4]) != b"GGUF":
        raise UserError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
    c.pos = 4
    version = c.scalar("<I", "the version")
    if version not in (2, 3):
        hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
        raise UserError(f"{path}: GGUF version {version} is not supported (2 or 3, little-endian){hint}")
    n_tensors, n_kv = c.scalar("<Q", "the header"), c.scalar("<Q", "the header")
    c.need(n_kv * 13 + n_tensors * 24, "the metadata")     # the least each entry can take
    fields: dict[str, tuple[object, int]] = {}
    for _ in range(n_kv):
        key = c.string("a metadata key")
        vtype = c.scalar("<I", f"metadata {key!r:.60}")
        fields[key] = (c.value(vtype, f"metadata {key!r:.60}"), vtype)
    align = fields.get("general.alignment", (32, 4))[0]
    if isinstance(align, bool) or not isinstance(align, int) or not 1 <= align <= 1 << 20 or align & (align - 1):
        raise UserError(f"{path}: general.alignment {align!r:.40} is not a power of two")
    table = []
    for _ in range(n_tensors):
        name = c.string("a tensor name")
        nd = c.scalar("<I", f"tensor {name!r:.60}")
        if not 1 <= nd <= MAX_DIMS:
            raise UserError(f"{path}: tensor {name!r:.60} has {nd} dimensions (1 to {MAX_DIMS})")
        dims = [c.scalar("<Q", f"tensor {name!r:.60}") for _ in range(nd)]
        table.append((name, dims, c.scalar("<I", f"tensor {name!r:.60}"), c.scalar("<Q", f"tensor {name!r:.60}")))
    start = -(-c.pos // align) * align
    tensors = []
    for name, dims, gtype, offset in table:
        if gtype not in sizes:
            accepted = ", ".join(names.get(t, str(t)) for t in sizes)
            raise UserError(f"{path}: tensor {name!r:.60} has type {names.get(gtype, gtype)}; a mamba2 file holds "
                            f"{accepted}")
        block, nbytes = sizes[gtype]
        numel = 1
        for d in dims:
            numel *= d
        if min(dims) < 1 or numel % block or dims[0] % block:
            raise UserError(f"{path}: tensor {name!r:.60} has shape {tuple(reversed(dims))}, not whole blocks of "
                            f"{block} along its rows")
        size = numel // block * nbytes
        if start + offset + size > len(buf):
            raise UserError(f"{path}: tensor {name!r:.60} lies past the end of the file (truncated?)")
        data = buf[start + offset:start + offset + size]
        tensors.append(GGUFTensor(name, tuple(int(d) for d in reversed(dims)), gtype, data))
    return GGUFFile(version, fields, tensors)
