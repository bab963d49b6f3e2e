"""What a scoring run reads: every image under a folder / prefix, or the rows of a Parquet / CSV
manifest (``image_uri``, optional ``class_name``), streamed in bounded chunks with repeated URIs
dropped. Used by batch scoring, ``onenip add-class`` and ``onenip export``."""
from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from . import storage
from .errors import InputError
from .formats import IMAGE_EXTENSIONS, S3_SCHEME

MANIFEST_EXTENSIONS = (".parquet", ".csv")
INPUT_SCHEMA = pa.schema([pa.field("image_uri", pa.string()), pa.field("class_name", pa.string())])


def iter_input_chunks(uri: str, endpoint: str | None = None, chunk_size: int = 100_000) -> Iterator[pa.Table]:
    """Tables of at most ``chunk_size`` inputs (``INPUT_SCHEMA``; ``class_name`` null = retrieve)
    from every image under a folder / prefix (recursive, ``IMAGE_EXTENSIONS``), or every row of a
    Parquet/CSV manifest. Relative manifest URIs are resolved against the manifest's folder;
    repeated URIs keep their first row. No URI appears in two chunks."""
    if uri.lower().endswith(MANIFEST_EXTENSIONS) and not storage.is_dir(uri, endpoint):
        yield from _read_manifest(uri, endpoint, chunk_size)
        return
    batch: list[str] = []
    for image_uri in storage.iter_files(uri, IMAGE_EXTENSIONS, endpoint):
        batch.append(image_uri)
        if len(batch) == chunk_size:
            yield _input_table(batch)
            batch = []
    if batch:
        yield _input_table(batch)


def _input_table(uris: list[str]) -> pa.Table:
    return pa.table({"image_uri": pa.array(uris, pa.string()), "class_name": pa.nulls(len(uris), pa.string())},
                    schema=INPUT_SCHEMA)


def list_inputs(uri: str, endpoint: str | None = None) -> list[tuple[str, str | None]]:
    """All inputs as ``(image_uri, class_name or None)`` (small inputs; the pipeline streams chunks)."""
    return [(row["image_uri"],
             row["class_name"]) for chunk in iter_input_chunks(uri, endpoint) for row in chunk.to_pylist()]


def _manifest_batches(uri: str, endpoint: str | None, rows: int) -> Iterator[pa.RecordBatch]:
    """The manifest's rows, ``rows`` at a time (Parquet row batches, CSV blocks)."""
    fs, path = storage.filesystem_for(uri, endpoint)
    with fs.open_input_file(path) as source:
        try:
            if uri.lower().endswith(".parquet"):
                reader = pq.ParquetFile(source)
                names = reader.schema_arrow.names
                batches = reader.iter_batches(batch_size=rows,
                                              columns=[c for c in ("image_uri", "class_name") if c in names])
            else:
                reader = pacsv.open_csv(source, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
                names = reader.schema.names
                batches = iter(reader)
            if "image_uri" not in names:
                raise InputError(f"manifest {uri} has no image_uri column (columns: {names})")
            yield from batches
        except pa.ArrowInvalid as exc:  # not Parquet / not CSV, or a row that does not parse
            raise InputError(f"manifest {uri} cannot be read: {exc}") from exc


def _digests(uris: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """128-bit BLAKE2b digests of the URIs as two uint64 arrays (high, low)."""
    packed = b"".join(hashlib.blake2b(u.encode(), digest_size=16).digest() for u in uris.to_pylist())
    both = np.frombuffer(packed, "<u8").reshape(-1, 2)
    return both[:, 0].copy(), both[:, 1].copy()


class _Digests:
    """A set of 128-bit digests in two arrays sorted by the high half: 16 bytes per key."""

    def __init__(self) -> None:
        self.hi, self.lo = np.empty(0, np.uint64), np.empty(0, np.uint64)

    def contains(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        left, right = np.searchsorted(self.hi, hi, "left"), np.searchsorted(self.hi, hi, "right")
        found = np.zeros(len(hi), bool)
        for i in np.flatnonzero(right > left):  # same high half: compare the low half
            found[i] = bool((self.lo[left[i]:right[i]] == lo[i]).any())
        return found

    def add(self, hi: np.ndarray, lo: np.ndarray) -> None:
        hi, lo = np.concatenate([self.hi, hi]), np.concatenate([self.lo, lo])
        order = np.argsort(hi, kind="stable")
        self.hi, self.lo = hi[order], lo[order]


def _read_manifest(uri: str, endpoint: str | None, chunk_size: int) -> Iterator[pa.Table]:
    """Chunks of the manifest's inputs, resolved and deduplicated (first row wins) across the whole
    file by 128-bit digests of the URIs (16 bytes per input, not the keys themselves)."""
    base = posixpath.dirname(storage.canonical_uri(uri))
    seen = _Digests()
    offset, pending, pending_rows = 0, [], 0
    for batch in _manifest_batches(uri, endpoint, chunk_size):
        uris = pc.cast(batch.column("image_uri"), pa.string())
        empty = pc.indices_nonzero(pc.fill_null(pc.equal(uris, ""), True))
        if len(empty):
            raise InputError(f"manifest {uri}: row {offset + empty[0].as_py()} has an empty image_uri")
        offset += batch.num_rows
        if "class_name" in batch.schema.names:
            classes = pc.cast(batch.column("class_name"), pa.string())
            classes = pc.if_else(pc.equal(pc.fill_null(classes, ""), ""), pa.scalar(None, pa.string()), classes)
        else:
            classes = pa.nulls(len(uris), pa.string())
        relative = pc.invert(pc.or_(pc.or_(pc.starts_with(uris, S3_SCHEME), pc.starts_with(uris, "/")),
                                    pc.starts_with(uris, storage.FILE_SCHEME)))
        if pc.any(relative).as_py():
            uris = pc.if_else(relative, pc.binary_join_element_wise(base, uris, "/"), uris)
        hi, lo = _digests(uris)
        order = np.lexsort((np.arange(len(hi)), lo, hi))  # equal digests together, first row first
        repeat = np.zeros(len(hi), bool)
        repeat[order[1:]] = (hi[order[1:]] == hi[order[:-1]]) & (lo[order[1:]] == lo[order[:-1]])
        new = np.flatnonzero(~repeat)
        new = new[~seen.contains(hi[new], lo[new])]
        seen.add(hi[new], lo[new])
        pending.append(pa.table({"image_uri": uris.take(pa.array(new)), "class_name": classes.take(pa.array(new))},
                                schema=INPUT_SCHEMA))
        pending_rows += len(new)
        while pending_rows >= chunk_size:
            table = pa.concat_tables(pending)
            yield table.slice(0, chunk_size)
            pending, pending_rows = [table.slice(chunk_size)], table.num_rows - chunk_size
    if pending_rows:
        yield pa.concat_tables(pending)
