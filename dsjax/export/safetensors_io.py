"""The safetensors format, written and read with numpy (no extra dependency).

A file is: 8 bytes (little-endian u64) header length N, N bytes of JSON header
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
then the tensors' raw little-endian bytes, offsets counted from the end of the header.
The header is padded with spaces to a multiple of 8 bytes, as the reference writer does.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from dsjax.export.errors import ExportError

DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "U8": np.dtype("u1"),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def save(tensors: dict[str, np.ndarray], path: Path, metadata: dict[str, str] | None = None) -> Path:
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        if array.dtype not in _NAMES:
            raise ExportError(f"{name}: dtype {array.dtype} cannot be written to safetensors here")
        header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for array in arrays:
            f.write(array.tobytes())
    return Path(path)


def load(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file, as read-only arrays over a memory map."""
    path = Path(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    if data.size < 8:
        raise ExportError(f"{path} is not a safetensors file (too short)")
    (size,) = struct.unpack("<Q", data[:8].tobytes())
    if 8 + size > data.size:
        raise ExportError(f"{path} is not a safetensors file (header length {size} exceeds the file)")
    try:
        header = json.loads(data[8 : 8 + size].tobytes())
    except ValueError as err:
        raise ExportError(f"{path}: unreadable safetensors header ({err})") from None
    body = data[8 + size :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise ExportError(
                f"{path}: tensor {name} has dtype {info['dtype']}; only {', '.join(DTYPES)} can be read "
                "(dequantize FP8 checkpoints first)"
            )
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end > body.size or end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise ExportError(
                f"{path}: tensor {name} ({info['dtype']} {list(shape)}) needs bytes {begin}-{end} of "
                f"{body.size} after the header; the file is truncated or damaged"
            )
        out[name] = body[begin:end].view(dtype).reshape(shape)
    return out
