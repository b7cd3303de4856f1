"""Prepared-data cache: one directory per fingerprint of (input file bytes, data settings, seed, tokenizer).

A second `train` or `data prepare` on unchanged data finds the directory and skips reading, validation, the pipeline and
tokenization. Tokenized splits are Arrow IPC files read through a memory map, so a large dataset is not copied into
Python lists: `EncodedTable[i]` builds one `Encoded` on demand.

    <cache>/data/<fingerprint>/  train.jsonl validation.jsonl test.jsonl removed_rows.jsonl
                                 data_report.json data_report.html token_lengths.png tokens/{train,validation}.arrow
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from tunelab.config import DataConfig
from tunelab.data.readers import expand_paths
from tunelab.data.tokenize import Encoded

CACHE_VERSION = 1  # bump when tokenization or the pipeline changes what they produce
KEEP_ENTRIES = 16


def data_cache_dir() -> Path:
    from tunelab.models.loading import cache_dir

    env = os.environ.get("TUNELAB_DATA_CACHE")
    return Path(env) if env else cache_dir() / "data"


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    h.update(json.dumps({"eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id, "special": sorted(tokenizer.all_special_tokens)}).encode())
    return h.hexdigest()


def fingerprint(cfg: DataConfig, seed: int, tokenizer, model_spec: str = "") -> str:
    """Changes when any input file's bytes, any data setting, the seed or the tokenizer change."""
    from tunelab import __version__

    h = hashlib.sha256()
    settings = cfg.model_dump(mode="json", exclude={"cache"})
    h.update(json.dumps({"v": CACHE_VERSION, "tunelab": __version__, "data": settings, "seed": seed}, sort_keys=True).encode())
    if cfg.augment is not None and cfg.augment.paraphrase:
        h.update(model_spec.encode())  # paraphrases are written by the model
    for key, spec in (("data.train", cfg.train), ("data.validation", cfg.validation), ("data.test", cfg.test)):
        if spec is None or isinstance(spec, float):
            continue
        for path in expand_paths(spec, key):
            h.update(f"\0{key}\0{path}\0".encode())
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
    h.update(tokenizer_fingerprint(tokenizer).encode())
    return h.hexdigest()[:20]


def save_encoded(path: Path, rows: Sequence[Encoded]) -> None:
    packed = any(e.position_ids is not None for e in rows)
    columns = {
        "input_ids": pa.array([e.input_ids for e in rows], type=pa.list_(pa.int32())),
        "labels": pa.array([e.labels for e in rows], type=pa.list_(pa.int32())),
        "source": pa.array([e.source for e in rows], type=pa.string()),
        "truncated": pa.array([e.truncated for e in rows], type=pa.bool_()),
        "full_length": pa.array([e.full_length for e in rows], type=pa.int32()),
    }
    if packed:
        columns["position_ids"] = pa.array([e.position_ids for e in rows], type=pa.list_(pa.int32()))
    if any(e.rejected_ids is not None for e in rows):  # preference pairs
        columns["rejected_ids"] = pa.array([e.rejected_ids for e in rows], type=pa.list_(pa.int32()))
        columns["rejected_labels"] = pa.array([e.rejected_labels for e in rows], type=pa.list_(pa.int32()))
    table = pa.table(columns)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


class EncodedTable(Sequence):
    """A memory-mapped Arrow file of tokenized examples that reads like a list of `Encoded`."""

    def __init__(self, path: Path) -> None:
        self.table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()

        def flat(name: str) -> tuple[np.ndarray, np.ndarray] | None:
            if name not in self.table.column_names:
                return None
            col = self.table.column(name).combine_chunks()
            return col.offsets.to_numpy(), col.values.to_numpy()

        self._ids, self._labels, self._positions = flat("input_ids"), flat("labels"), flat("position_ids")
        self._rejected_ids, self._rejected_labels = flat("rejected_ids"), flat("rejected_labels")
        self._sources = self.table.column("source").to_pylist()
        self._truncated = self.table.column("truncated").to_pylist()
        self._full = self.table.column("full_length").to_pylist()

    def __len__(self) -> int:
        return self.table.num_rows

    def _list(self, col: tuple[np.ndarray, np.ndarray], i: int) -> list[int]:
        offsets, values = col
        return values[offsets[i] : offsets[i + 1]].tolist()

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        positions = self._list(self._positions, i) if self._positions is not None else None
        pair = {}
        if self._rejected_ids is not None:
            pair = {"rejected_ids": self._list(self._rejected_ids, i), "rejected_labels": self._list(self._rejected_labels, i)}
        return Encoded(self._list(self._ids, i), self._list(self._labels, i), self._sources[i], self._truncated[i],
                       positions, self._full[i], **pair)

    def lengths(self) -> list[int]:
        """Each row's `Encoded.batch_tokens`, without building the rows."""
        if self._rejected_ids is not None:
            return (2 * np.maximum(np.diff(self._ids[0]), np.diff(self._rejected_ids[0]))).tolist()
        return np.diff(self._ids[0]).tolist()


def lookup(key: str) -> Path | None:
    entry = data_cache_dir() / key
    if (entry / "meta.json").is_file():
        os.utime(entry / "meta.json")  # most recently used entries survive pruning
        return entry
    return None


def store(key: str, build: Path) -> Path:
    """Move a fully written directory into the cache (atomically) and prune old entries."""
    root = data_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    entry = root / key
    if entry.exists():
        shutil.rmtree(build, ignore_errors=True)
        return entry
    os.replace(build, entry)
    entries = sorted((p for p in root.iterdir() if (p / "meta.json").is_file()), key=lambda p: (p / "meta.json").stat().st_mtime)
    for old in entries[:-KEEP_ENTRIES]:
        shutil.rmtree(old, ignore_errors=True)
    return entry
