"""Reading token shards: raw samples of a tar, with damage counted (a header fast path, webdataset's reader
for the rest)."""
from __future__ import annotations

import io
import tarfile
from typing import Iterator, Optional

from webdataset.tariterators import base_plus_ext, tar_file_iterator


def count_samples(path: str) -> int:
    """Samples in a token shard by scanning headers only (fallback when no done-marker count exists)."""
    keys = set()
    with tarfile.open(path, mode="r|*") as tf:
        for m in tf:
            if m.isfile():
                keys.add(base_plus_ext(m.name)[0])
    return len(keys)


def _ustar_members(data: bytes) -> Optional[tuple[list[tuple[str, int, int]], Optional[str]]]:
    """([(name, offset, size)], error) for a plain ustar/GNU tar held in memory, or None when it needs
    tarfile (PAX / long-name entries). Checksums are verified; `error` says where a damaged or cut-off
    tar stops (the members before it are listed)."""
    out, off, n = [], 0, len(data)
    if n == 0:
        return out, "empty file (zero-byte shard)"
    while off < n:
        if off + 512 > n:
            return out, f"partial header at offset {off} (truncated shard)"
        h = data[off: off + 512]
        if h[0] == 0 and h.count(0) == 512:  # end-of-archive block
            return out, None
        # checksum = byte sum with the checksum field counted as 8 spaces
        if int(h[148:156].strip(b"\0 ") or b"-1", 8) != sum(h) - sum(h[148:156]) + 256:
            return out, f"bad header checksum at offset {off}"
        kind = h[156:157]
        if kind not in (b"0", b"\0", b"5") or h[124] & 0x80:  # PAX, GNU long names, base-256 sizes
            return None
        size = int(h[124:136].strip(b"\0 ") or b"0", 8)
        name = h[0:100].split(b"\0", 1)[0].decode("utf-8")
        if h[257:262] == b"ustar" and h[345] != 0:
            name = h[345:500].split(b"\0", 1)[0].decode("utf-8") + "/" + name
        if off + 512 + size > n:
            return out, f"member {name} cut off (truncated shard)"
        if kind != b"5":
            out.append((name, off + 512, size))
        off += 512 + (size + 511) // 512 * 512
    if off > n:  # the last member's padding is missing: the file was cut right after it
        return out, "truncated shard (cut inside padding)"
    return out, None  # no end-of-archive blocks: tolerated, as tarfile does


def _members(path: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every file member: a header-parsing fast path over the whole file in memory
    (≈4× faster than tarfile per member), webdataset's tarfile reader otherwise. Damage raises
    tarfile.ReadError after the intact members."""
    with open(path, "rb") as f:
        data = f.read()
    parsed = _ustar_members(data)
    if parsed is None:
        for item in tar_file_iterator(io.BytesIO(data)):
            yield item["fname"], item["data"]
        return
    index, error = parsed
    for name, off, size in index:
        yield name, data[off: off + size]
    if error:
        raise tarfile.ReadError(f"{path}: {error}")


def _split_name(fname: str) -> tuple[str, str]:
    """WebDataset's key rule (base_plus_ext without the regex): key = up to the first dot of the basename."""
    slash = fname.rfind("/") + 1
    dot = fname.find(".", slash)
    return (fname, "") if dot < 0 else (fname[:dot], fname[dot + 1:])


def read_shard(path: str, errors: dict) -> Iterator[dict]:
    """Raw samples {"__key__", ext: bytes} of one tar; read errors are counted and end the shard."""
    key, sample = None, {}
    try:
        for fname, payload in _members(path):
            k, ext = _split_name(fname)
            if k != key:
                if sample:
                    yield sample
                key, sample = k, {"__key__": k}
            sample[ext] = payload
    except (tarfile.TarError, OSError, EOFError, UnicodeDecodeError, ValueError) as e:
        errors["shard_read_error"] = errors.get("shard_read_error", 0) + 1
        errors["_last"] = f"{path}: {e}"
        return  # a half-read last sample is dropped
    if sample:
        yield sample
