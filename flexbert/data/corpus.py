"""Corpus readers: text, JSONL, Parquet, directories of them, `datasets` on disk, the stdlib.
Text and JSONL files may be compressed (`.gz`, `.bz2`, `.xz`, `.zst`: `train.jsonl.zst`, as
pretraining corpora are shipped); they are decompressed while read.

Every reader yields `Document(id, text)`. The id is stable (relative path plus position), so the
train/validation split can be a hash of it and stays the same whatever order files are read in.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import lzma
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, NamedTuple

from flexbert.data.errors import DataError, DataFileNotFoundError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")  # of a text or JSONL file
TEXT_MODES = ("file", "paragraph", "line")
# What reading a broken file raises: bad bytes, a truncated or corrupt compressed stream.
READ_ERRORS = (OSError, EOFError, ValueError, lzma.LZMAError)


def format_suffix(path: Path) -> str:
    """The suffix that says how to parse a file: `.jsonl` for both a.jsonl and a.jsonl.gz."""
    suffix = path.suffix.lower()
    if suffix not in COMPRESSED_SUFFIXES:
        return suffix
    inner = Path(path.stem).suffix.lower()  # compressed text or JSONL; anything else is not read
    return inner if inner in TEXT_SUFFIXES + JSONL_SUFFIXES else suffix


def open_text(path: Path) -> IO[str]:
    """`path` opened as UTF-8 text, decompressed while read when its suffix says so."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        import gzip

        return gzip.open(path, "rt", encoding="utf-8")
    if suffix == ".bz2":
        import bz2

        return bz2.open(path, "rt", encoding="utf-8")
    if suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8")
    if suffix == ".zst":
        return io.TextIOWrapper(io.BufferedReader(ZstdReader(path)), encoding="utf-8")
    return path.open(encoding="utf-8")


class ZstdReader(io.RawIOBase):
    """A .zst file's bytes, decompressed while read, frame after frame. A file cut short
    raises EOFError, as gzip, bz2 and lzma do (zstandard's own stream reader ends quietly)."""

    def __init__(self, path: Path) -> None:
        import zstandard

        self._file = path.open("rb")
        self._decompressor, self._error = zstandard.ZstdDecompressor(), zstandard.ZstdError
        self._frame = self._decompressor.decompressobj()
        self._in_frame = False  # a frame begun and not yet ended
        self._pending, self._offset = memoryview(b""), 0  # decompressed, not yet read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._offset == len(self._pending):
            leftover = b""
            if self._frame.eof:  # a frame ended: the next one starts with what it left
                leftover = self._frame.unused_data
                self._frame = self._decompressor.decompressobj()
                self._in_frame = False
            chunk = leftover + self._file.read(1 << 16)
            if not chunk:
                if self._in_frame:
                    raise EOFError("compressed file ended before the end of its zstd frame")
                return 0
            self._in_frame = True
            try:
                self._pending, self._offset = memoryview(self._frame.decompress(chunk)), 0
            except self._error as e:  # as gzip's BadGzipFile: an OSError
                raise OSError(f"not zstd data ({e})") from e
        n = min(len(buffer), len(self._pending) - self._offset)
        buffer[:n] = self._pending[self._offset : self._offset + n]
        self._offset += n
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


class Document(NamedTuple):
    """One document: a stable id (for splitting and error messages) and its text."""

    id: str
    text: str


def read_text_file(path: Path, mode: str = "paragraph") -> Iterator[Document]:
    """Yield a text file as one document (`file`), per blank-line paragraph, or per line."""
    if mode not in TEXT_MODES:
        raise DataError(f"text_mode must be one of {TEXT_MODES}, got {mode!r}")
    try:
        with open_text(path) as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from e
    except READ_ERRORS as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from e
    if mode == "file":
        yield Document(str(path), text)
        return
    if mode == "line":
        pieces = text.splitlines()
    else:
        pieces, current = [], []
        for line in text.splitlines():
            if line.strip():
                current.append(line)
            elif current:
                pieces.append("\n".join(current))
                current = []
        if current:
            pieces.append("\n".join(current))
    for i, piece in enumerate(pieces):
        yield Document(f"{path}#{i}", piece)


def _text_of(row: dict, field: str, where: str) -> str:
    if field not in row:
        raise DataError(f"{where}: missing text field {field!r} (fields: {sorted(row)})")
    value = row[field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def read_jsonl(path: Path, text_field: str = "text") -> Iterator[Document]:
    """Yield one document per JSON line; blank lines are ignored."""
    try:
        with open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: invalid JSON ({e.msg})") from e
                if not isinstance(row, dict):
                    raise DataError(f"{where}: expected a JSON object with {text_field!r}")
                yield Document(where, _text_of(row, text_field, where))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e})") from e
    except DataError:
        raise
    except READ_ERRORS as e:  # a truncated or corrupt compressed file
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from e


def read_parquet(path: Path, text_field: str = "text") -> Iterator[Document]:
    """Yield one document per Parquet row, reading one record batch at a time."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(str(path))
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a readable Parquet file ({e})") from e
    if text_field not in pf.schema_arrow.names:
        raise DataError(
            f"{path}: missing text field {text_field!r} (columns: {pf.schema_arrow.names})"
        )
    row = 0
    for batch in pf.iter_batches(columns=[text_field]):
        for value in batch.column(0).to_pylist():
            where = f"{path} row {row}"
            yield Document(f"{path}#{row}", _text_of({text_field: value}, text_field, where))
            row += 1


def read_hf_dataset(
    path: Path, text_field: str = "text", split: str | None = None
) -> Iterator[Document]:
    """Yield documents from a `datasets` directory written by `save_to_disk`."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: not a readable `datasets` directory ({e})") from e
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            split = "train" if "train" in ds else sorted(ds)[0]
        if split not in ds:
            raise DataError(f"{path}: no split {split!r} (splits: {sorted(ds)})")
        ds = ds[split]
    if text_field not in ds.column_names:
        raise DataError(f"{path}: missing text field {text_field!r} (columns: {ds.column_names})")
    row = 0
    for batch in ds.iter(batch_size=1000):
        for value in batch[text_field]:
            where = f"{path} row {row}"
            yield Document(f"{path}#{row}", _text_of({text_field: value}, text_field, where))
            row += 1


def _is_hf_dataset_dir(path: Path) -> bool:
    return (path / "dataset_dict.json").exists() or (path / "state.json").exists()


def read_path(
    path: str | Path,
    text_field: str = "text",
    text_mode: str = "paragraph",
    hf_split: str | None = None,
) -> Iterator[Document]:
    """Read a file or a directory (recursively, in sorted order) by file suffix.

    Ids are made relative to the path's parent (`corpus/a.jsonl:3`), so the hash split does not
    depend on where the corpus happens to live; error messages keep the full path.
    """
    p = Path(path)
    if not p.exists():
        raise DataFileNotFoundError(f"corpus path not found: {p}")
    prefix = str(p.parent) + "/"
    for doc in _read_any(p, text_field, text_mode, hf_split):
        yield Document(doc.id.removeprefix(prefix), doc.text)


def _read_any(p: Path, text_field: str, text_mode: str, hf_split: str | None) -> Iterator[Document]:
    if p.is_dir():
        if _is_hf_dataset_dir(p):
            yield from read_hf_dataset(p, text_field, hf_split)
            return
        found = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        known = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
        files = [f for f in found if format_suffix(f) in known]
        if not files:
            raise DataError(
                f"{p}: no corpus files (expected suffixes {known}, text and JSONL also "
                f"compressed: {COMPRESSED_SUFFIXES})"
            )
        read = set(files)
        skipped = [str(f.relative_to(p)) for f in found if f not in read]
        if skipped:  # said, so a folder of unreadable files never shrinks to its README
            log.warning(
                "%s: %d files are not corpus files and are skipped (suffixes read: %s, "
                "text and JSONL also %s): %s",
                p,
                len(skipped),
                known,
                COMPRESSED_SUFFIXES,
                ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""),
            )
        for f in files:
            yield from _read_any(f, text_field, text_mode, hf_split)
        return
    suffix = format_suffix(p)
    if suffix in JSONL_SUFFIXES:
        yield from read_jsonl(p, text_field)
    elif suffix in PARQUET_SUFFIXES:
        yield from read_parquet(p, text_field)
    else:
        yield from read_text_file(p, text_mode)


def split_of(doc_id: str, val_fraction: float, seed: int = 0) -> str:
    """'train' or 'val' from a hash of the id: deterministic, order- and machine-independent."""
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "val" if u < val_fraction else "train"


@dataclass(frozen=True)
class CorpusSpec:
    """Where documents come from and how to read them; also the idempotence fingerprint.

    `source` is a path, or "stdlib" for the embedded corpus built from the Python stdlib.
    """

    source: str = "stdlib"
    text_field: str = "text"
    text_mode: str = "paragraph"
    hf_split: str | None = None
    max_documents: int | None = None
    max_bytes: int | None = None

    def documents(self) -> Iterator[Document]:
        """Yield documents up to the caps (the document that crosses max_bytes is kept)."""
        if self.source == "stdlib":
            from flexbert.data.stdlib_corpus import stdlib_documents

            docs = stdlib_documents()
        else:
            docs = read_path(self.source, self.text_field, self.text_mode, self.hf_split)
        n_bytes = 0
        for n, doc in enumerate(docs):
            if self.max_documents is not None and n >= self.max_documents:
                return
            if self.max_bytes is not None and n_bytes >= self.max_bytes:
                return
            n_bytes += len(doc.text.encode("utf-8"))
            yield doc

    def texts(self) -> Iterator[str]:
        """Only the texts, e.g. for tokenizer training."""
        return (d.text for d in self.documents())

    def fingerprint(self) -> dict:
        """Settings plus file sizes and mtimes, so a changed input is never mistaken as done."""
        out: dict = asdict(self)
        if self.source == "stdlib":
            import sys
            import sysconfig

            out["stdlib"] = [sys.version, sysconfig.get_paths()["stdlib"]]
            return out
        p = Path(self.source)
        if not p.exists():
            raise DataFileNotFoundError(f"corpus path not found: {p}")
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        h = hashlib.sha256()
        for f in files:
            st = f.stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        out["files_sha256"] = h.hexdigest()
        return out
