"""The token-shard record and manifest: member names, dtypes, shapes and (de)serialisation, in one place.

A token shard is a plain WebDataset tar; one sample = the members below sharing one `__key__`.
Arrays are `.npy` (readable by anything with numpy); the loader parses them with a cached-header
`np.frombuffer` because `np.load` re-parses the same header for every record (spec: per-sample
Python overhead is the bottleneck).
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from vqd_scale.errors import MissingInput, UserError

FORMAT = "vqd-token-shards/1"
IMAGE_TOKENS = "img.tok.npy"  # int16 [h, w] pruned code ids (compact ids < K)
TEXT_TOKENS = "txt.tok.npy"  # int32 [77] CLIP BPE ids (absent in image-only records: --keep-uncaptioned)
CAPTION = "txt"  # utf-8 caption
IMAGE_EMB = "img.emb.npy"  # float16 [E] CLIP image embedding (optional)
TEXT_EMB = "txt.emb.npy"  # float16 [E] CLIP text embedding (optional)
META = "json"  # {"source", "original_size", "tokenizer_id", ...}
REQUIRED = (IMAGE_TOKENS, TEXT_TOKENS)
MANIFEST = "manifest.json"
DONE_SUFFIX = ".done.json"


def npy_bytes(arr: np.ndarray) -> bytes:
    """Serialise one array as .npy bytes."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


_HEADER_CACHE: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}


def load_npy(data: bytes) -> np.ndarray:
    """Parse .npy bytes; the header parse is cached because every record of a shard shares it."""
    if data[:6] != b"\x93NUMPY":
        raise UserError("not an .npy member (bad magic)")
    # v1 header length is a uint16 at byte 8, v2/v3 a uint32; the header ends at a 64-byte boundary
    major = data[6]
    hlen = int.from_bytes(data[8:10], "little") if major == 1 else int.from_bytes(data[8:12], "little")
    start = 10 if major == 1 else 12
    header = data[: start + hlen]
    parsed = _HEADER_CACHE.get(header)
    if parsed is None:
        buf = io.BytesIO(header)
        version = np.lib.format.read_magic(buf)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(buf)  # numpy's own (safe) header parser
        if fortran or dtype.hasobject:
            raise UserError("unsupported .npy layout (fortran order or object dtype)")
        parsed = (dtype, tuple(shape), len(header))
        if len(_HEADER_CACHE) < 256:
            _HEADER_CACHE[header] = parsed
    dtype, shape, offset = parsed
    count = int(np.prod(shape)) if shape else 1
    if len(data) - offset != count * dtype.itemsize:
        raise UserError(f".npy member has {len(data) - offset} data bytes, header says {count * dtype.itemsize}")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


def encode_record(key: str, image_tokens: np.ndarray, text_tokens: Optional[np.ndarray], caption: Optional[str],
                  meta: dict, image_emb: Optional[np.ndarray] = None,
                  text_emb: Optional[np.ndarray] = None) -> dict[str, Any]:
    """One sample as a WebDataset dict of member name → bytes; an image-only record (caption None) has no
    text members at all (txt, txt.tok.npy, txt.emb.npy), so no reader can take it for a captioned one."""
    rec: dict[str, Any] = {
        "__key__": key,
        IMAGE_TOKENS: npy_bytes(np.asarray(image_tokens, dtype=np.int16)),
        META: json.dumps(meta, sort_keys=True).encode("utf-8"),
    }
    if caption is not None:
        rec[TEXT_TOKENS] = npy_bytes(np.asarray(text_tokens, dtype=np.int32))
        rec[CAPTION] = caption.encode("utf-8")
    if image_emb is not None:
        rec[IMAGE_EMB] = npy_bytes(np.asarray(image_emb, dtype=np.float16))
    if text_emb is not None and caption is not None:
        rec[TEXT_EMB] = npy_bytes(np.asarray(text_emb, dtype=np.float16))
    return rec


def tar_writer(path: str | os.PathLike):
    """WebDataset TarWriter for token shards with integer mtimes: a float mtime makes tarfile add a PAX
    header to every member (+1 KiB and a slow parse per member, ~40 % of a token record)."""
    import time

    import webdataset as wds

    return wds.TarWriter(str(path), encoder=False, mtime=int(time.time()))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON via a temp file + os.replace so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def done_marker_path(shard_path: str | os.PathLike) -> Path:
    """`dir/00012.tar` → `dir/00012.done.json`."""
    p = Path(shard_path)
    return p.with_name(p.name[: -len(".tar")] + DONE_SUFFIX if p.name.endswith(".tar") else p.name + DONE_SUFFIX)


def read_manifest(path: str | os.PathLike) -> dict:
    """Load a manifest (a file or the directory holding manifest.json) and check its format tag."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST
    if not p.exists():
        raise MissingInput(f"token manifest {p} not found; run vqd-extract (it writes {MANIFEST}) "
                                f"or point data.manifest at the right file")
    m = json.loads(p.read_text())
    if m.get("format") != FORMAT:
        raise UserError(f"{p}: format {m.get('format')!r} is not {FORMAT!r}; re-extract with this version")
    return m


def source_manifest_path(pattern: str, fallback: Optional[str] = None) -> Optional[str]:
    """The manifest describing a source's shards, as the loader picks it: `manifest.json` beside its first
    existing shard, else `fallback` (data.manifest); None when no shard exists and there is no fallback."""
    import braceexpand

    for part in pattern.split("::"):
        for shard in braceexpand.braceexpand(part.strip()) if part.strip() else []:
            if "://" in shard or shard.startswith("pipe:"):
                return fallback or str(Path(shard).parent / MANIFEST)
            if Path(shard).exists():
                beside = Path(shard).parent / MANIFEST
                return str(beside) if beside.exists() or not fallback else fallback
    return fallback



def manifest_of_sources(data_cfg) -> tuple[Optional[dict], Optional[str]]:
    """(manifest, path) describing every source of a DataConfig — beside each source's shards, else
    data.manifest — which must agree on tokenizer, K and grid; (None, None) when no manifest is found."""
    found = [(sc.name, p) for sc in data_cfg.sources if (p := source_manifest_path(sc.shards, data_cfg.manifest))]
    if not found:
        return None, None
    named = [(name, path, read_manifest(path)) for name, path in found]
    name0, path0, m = named[0]
    for name, path, other in named[1:]:
        for k in ("tokenizer_id", "num_classes", "token_shape"):
            if other.get(k) != m.get(k):
                raise UserError(f"data source {name!r} ({path}) has {k}={other.get(k)} but source {name0!r} "
                                f"({path0}) has {m.get(k)}; extract every source with the same tokenizer and resolution")
    if data_cfg.tokenizer_id and m.get("tokenizer_id") != data_cfg.tokenizer_id:
        raise UserError(f"data.tokenizer_id={data_cfg.tokenizer_id!r} but the manifest {path0} was "
                        f"extracted with {m.get('tokenizer_id')!r}; re-extract or fix data.tokenizer_id")
    return m, path0
