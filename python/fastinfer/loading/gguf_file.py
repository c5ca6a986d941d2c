"""The GGUF container (llama.cpp's format): the header parsed over a memory map into metadata and a tensor
table, each tensor's bytes a read-only view of the map; nothing is dequantised here (gguf.py does that).

Every count, length and offset in the header is checked against the bytes left and the MAX_* bounds before it
is used, and every problem raises GGUFError naming the file and the field. gguf's own GGUFReader is not used:
it spends seconds on a 49k-token vocabulary.
"""

from __future__ import annotations

import math
import os
import stat
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fastinfer.loading.files import MAX_CHAT_TEMPLATE_BYTES

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType

__all__ = ["GGUFError", "GGUFFile", "TensorInfo", "open_gguf", "read_gguf_metadata"]

GGUF_MAGIC = b"GGUF"

# What a GGUF header may declare, checked (with the bytes left in the file) before anything is allocated or
# looped over: far above any real model's (a 262k-token vocabulary, ~500k merges, a few thousand tensors).
MAX_METADATA_KEYS = 1 << 16
MAX_TENSORS = 1 << 20
MAX_KEY_BYTES = 1 << 16
MAX_STRING_BYTES = 256 << 20  # one metadata string (tokenizer.huggingface.json can be tens of MB)
MAX_ARRAY_ITEMS = 1 << 22  # items of one metadata array
MAX_METADATA_ITEMS = 1 << 23  # array items in the whole header (each becomes a Python object)
MAX_ARRAY_DEPTH = 4  # arrays of arrays of ...
MAX_TENSOR_DIMS = 4  # GGML_MAX_DIMS
MAX_ALIGNMENT = 1 << 20


class GGUFError(ValueError):
    """A GGUF file that cannot be loaded; the message names the file and the problem."""


def read_gguf_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """All key/value metadata of a GGUF file as Python values (arrays as lists)."""
    return open_gguf(os.fspath(path)).metadata


# ----------------------------------------------------------------------------------------------- file


@dataclass(slots=True)
class TensorInfo:
    """One tensor's entry in the file header; ``data`` is a read-only view of its bytes in the memory map."""

    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] varies fastest (Hugging Face shape reversed)
    type: GGMLQuantizationType
    data: np.ndarray  # uint8, (rows, bytes per row)

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.dims))


@dataclass(slots=True)
class GGUFFile:
    path: str
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]


# GGUF metadata value types: fixed-size scalars by struct format; 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6
# Fewest bytes one item of each type takes in the file: a declared count is checked against the bytes left.
_MIN_BYTES = {**{k: struct.calcsize(f) for k, f in _SCALARS.items()}, _STRING: 8, _ARRAY: 12}
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, smallest value
_MIN_TENSOR_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset


class _Header:
    """Sequential little-endian reader over the memory-mapped header. ``field`` names what is being read, for
    errors; every count and length is checked against the bytes left and the MAX_* bounds before use."""

    def __init__(self, buf: np.ndarray, path: str):
        self.buf, self.path, self.pos = buf, path, 0
        self.field, self.items, self.string_limit = "header", 0, MAX_STRING_BYTES

    def error(self, problem: str) -> GGUFError:
        return GGUFError(f"{self.path}: corrupt GGUF header: {self.field}: {problem}")

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise GGUFError(
                f"{self.path}: truncated GGUF file: {self.field} needs {n} bytes at byte {self.pos}, "
                f"the file has {len(self.buf)}"
            )
        view = memoryview(self.buf[self.pos : self.pos + n])
        self.pos += n
        return view

    def count(self, what: str, n: int, limit: int, min_bytes: int) -> int:
        """``n`` items of ``what``, each at least ``min_bytes`` long: within ``limit`` and the bytes left."""
        if n > limit:
            raise self.error(f"{n} {what}, more than the limit of {limit}")
        if n * min_bytes > len(self.buf) - self.pos:
            raise GGUFError(
                f"{self.path}: truncated GGUF file: {self.field}: {n} {what} need at least {n * min_bytes} bytes, "
                f"{len(self.buf) - self.pos} are left"
            )
        return n

    def scalar(self, kind: int) -> Any:
        fmt = _SCALARS.get(kind)
        if fmt is None:
            raise self.error(f"unknown value type {kind} at byte {self.pos}")
        value = struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]
        return _float32_value(value) if kind == _FLOAT32 else value

    def string(self, limit: int | None = None) -> str:
        n = self.scalar(10)
        limit = self.string_limit if limit is None else limit
        if n > limit:
            raise self.error(f"a string of {n} bytes, more than the limit of {limit}")
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.error(f"the string at byte {self.pos - n} is not UTF-8") from e

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        return self.array() if kind == _ARRAY else self.scalar(kind)

    def array(self, depth: int = 0) -> list:
        """(item type u32, count u64, items); an item that is itself an array is (type, count, items) again."""
        if depth >= MAX_ARRAY_DEPTH:
            raise self.error(f"arrays nested more than {MAX_ARRAY_DEPTH} deep")
        item, count = self.scalar(4), self.scalar(10)
        if item not in _MIN_BYTES:
            raise self.error(f"unknown array item type {item} at byte {self.pos - 12}")
        self.count("array items", count, MAX_ARRAY_ITEMS, _MIN_BYTES[item])
        self.items += count
        if self.items > MAX_METADATA_ITEMS:
            raise self.error(f"more than {MAX_METADATA_ITEMS} array items in the header")
        if item == _STRING:
            return [self.string() for _ in range(count)]
        if item == _ARRAY:
            return [self.array(depth + 1) for _ in range(count)]
        dtype = np.dtype(_NUMPY[item])
        return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).tolist()


def _float32_value(value: float) -> float:
    """A float32 as the shortest decimal that reads back as it (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def open_gguf(path: str) -> GGUFFile:
    """Parse the header (metadata and tensor table) and map the tensor data; nothing is dequantised yet."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or /dev/zero would block or never end
            raise GGUFError(f"{path}: not a regular file")
        buf = np.asarray(np.memmap(path, dtype=np.uint8, mode="r"))  # plain ndarray: numpy is faster on it
    except (OSError, ValueError) as e:  # ValueError: empty file
        if isinstance(e, GGUFError):
            raise
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            raise GGUFError(f"{path}: not a GGUF file (empty)") from e
        raise GGUFError(f"{path}: cannot open GGUF file ({e})") from e
    magic = bytes(buf[:4])
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    h = _Header(buf, path)
    h.pos = 4
    version = h.scalar(4)
    if version not in (2, 3):
        raise GGUFError(f"{path}: unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors, n_kv = h.scalar(10), h.scalar(10)
    h.field = "metadata key count"
    h.count("metadata keys", n_kv, MAX_METADATA_KEYS, _MIN_KV_BYTES)
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        h.field = f"metadata key #{i}"
        key = h.string(MAX_KEY_BYTES)
        if key in metadata:
            raise h.error(f"{key} appears twice")
        h.field = key
        h.string_limit = MAX_CHAT_TEMPLATE_BYTES if key.startswith("tokenizer.chat_template") else MAX_STRING_BYTES
        metadata[key] = h.value(h.scalar(4))

    h.field = "tensor count"
    h.count("tensors", n_tensors, MAX_TENSORS, _MIN_TENSOR_BYTES)
    entries = []
    for i in range(n_tensors):
        h.field = f"tensor #{i}"
        name = h.string(MAX_KEY_BYTES)
        h.field = f"tensor {name!r}"
        n_dims = h.scalar(4)
        if not 1 <= n_dims <= MAX_TENSOR_DIMS:
            raise h.error(f"{n_dims} dimensions (1 to {MAX_TENSOR_DIMS} are valid)")
        dims = tuple(h.scalar(10) for _ in range(n_dims))
        raw_type, offset = h.scalar(4), h.scalar(10)
        entries.append((name, dims, raw_type, offset))
    h.field = "general.alignment"
    alignment = metadata.get("general.alignment", 32)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or not 1 <= alignment <= MAX_ALIGNMENT \
            or alignment & (alignment - 1):
        raise h.error(f"{alignment!r} is not a power of two up to {MAX_ALIGNMENT}")
    data_start = -(-h.pos // alignment) * alignment

    tensors = {}
    for name, dims, raw_type, offset in entries:
        h.field = f"tensor {name!r}"
        if name in tensors:
            raise h.error("appears twice in the tensor table")
        try:
            ggml_type = GGMLQuantizationType(raw_type)
        except ValueError:
            raise GGUFError(f"{path}: tensor {name!r} has unknown ggml type id {raw_type}") from None
        block, block_bytes = GGML_QUANT_SIZES[ggml_type]
        if min(dims) < 1:
            raise h.error(f"shape {list(dims)} has an empty dimension")
        if dims[0] % block:
            raise GGUFError(f"{path}: tensor {name!r} of shape {list(dims)} does not fit {ggml_type.name} blocks")
        if offset % alignment:
            raise h.error(f"data offset {offset} is not a multiple of the alignment {alignment}")
        # Python integers: a dimension of 2**64 - 1 cannot wrap around to a small size here.
        row_bytes = dims[0] // block * block_bytes
        rows = math.prod(dims[1:])
        start, end = data_start + offset, data_start + offset + rows * row_bytes
        if end > len(buf):
            raise GGUFError(
                f"{path}: truncated GGUF file: tensor {name!r} of shape {list(dims)} ends at byte {end}, "
                f"the file has {len(buf)} bytes"
            )
        tensors[name] = TensorInfo(name, dims, ggml_type, buf[start:end].reshape(rows, row_bytes))
    return GGUFFile(path, metadata, tensors)
