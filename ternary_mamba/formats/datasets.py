"""Corpus sources beyond plain text files: Hugging Face `datasets` material, read as a stream of documents.

- local `.parquet` and `.arrow` files (or folders holding them, e.g. a `datasets` save or a FineWeb-Edu /
  SlimPajama shard download): their `text` column, read in record batches (never the whole file in memory);
- `hf:NAME[:SPLIT]` or `hf:NAME/CONFIG[:SPLIT]`: a hub dataset, streamed with `datasets` (where the network
  allows; offline it fails in one line), split `train` by default.

Every source yields documents in a fixed order, so a token file built from it is deterministic.  Reading
parquet / arrow needs pyarrow, and hub streaming needs `datasets`: `pip install 'ternary-mamba[data]'`."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import UserError

TABLE_SUFFIXES = {".parquet", ".arrow"}
HUB_PREFIX = "hf:"
BATCH_ROWS = 1024


def is_hub_source(spec: str) -> bool:
    return str(spec).startswith(HUB_PREFIX)


def _pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
        return pyarrow
    except ImportError:
        raise UserError("parquet / arrow data needs pyarrow: pip install 'ternary-mamba[data]'") from None


def _text_column(names: list[str], path) -> str:
    if "text" in names:
        return "text"
    raise UserError(f"{path}: no 'text' column (columns: {', '.join(names[:8])})")


def table_documents(path: Path) -> Iterator[str]:
    """The `text` column of a parquet or arrow file, batch by batch."""
    pa = _pyarrow()
    try:
        if path.suffix == ".parquet":
            f = pa.parquet.ParquetFile(str(path))
            col = _text_column(f.schema_arrow.names, path)
            batches = f.iter_batches(columns=[col], batch_size=BATCH_ROWS)
        else:
            src = pa.memory_map(str(path))
            try:
                reader = pa.ipc.open_stream(src)
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(src)
                reader = (reader.get_batch(i) for i in range(reader.num_record_batches))
            batches, col = reader, None
        for batch in batches:
            name = col or _text_column(batch.schema.names, path)
            for doc in batch.column(name).to_pylist():
                if isinstance(doc, str) and doc.strip():
                    yield doc
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file is the user's to fix
        raise UserError(f"{path}: not a readable {path.suffix[1:]} table ({str(e).splitlines()[0][:160]})") from None


@dataclass(frozen=True)
class HubSource:
    name: str
    config: str | None
    split: str

    @classmethod
    def parse(cls, spec: str) -> "HubSource":
        rest = spec[len(HUB_PREFIX):]
        name, _, split = rest.partition(":")
        parts = name.split("/")
        config = None
        if len(parts) == 3:                      # org/name/config
            name, config = "/".join(parts[:2]), parts[2]
        if not name:
            raise UserError(f"{spec}: expected hf:NAME[/CONFIG][:SPLIT], e.g. hf:HuggingFaceFW/fineweb-edu:train")
        return cls(name, config, split or "train")

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.name}|{self.config}|{self.split}".encode()).hexdigest()[:12]

    def documents(self) -> Iterator[str]:
        try:
            import datasets
        except ImportError:
            raise UserError("hub datasets need the datasets package: pip install 'ternary-mamba[data]'") from None
        try:
            ds = datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
            for row in ds:
                doc = row.get("text")
                if isinstance(doc, str) and doc.strip():
                    yield doc
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - offline, unknown dataset, no text column: one line
            raise UserError(f"hf:{self.name}: could not stream it ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160]}); download it and pass the local folder") from None
