"""Digests of a merge's input files for its provenance, computed from the bytes the merge reads.

The default is XXH3-128 (the ``xxhash`` package; what ``xxh128sum FILE`` prints): a file changed by
accident keeps its digest with probability ~2^-128, at ~10 GB/s of CPU where SHA-256 runs at ~1 GB/s.
It is not cryptographic (a deliberate collision can be made): where tampering matters ask for
``sha256`` (what ``sha256sum FILE`` prints).

A streamed merge reads every tensor of every input anyway, in the order of the files' data when the
inputs share the reference model's layout (fine-tunes of one model), so :class:`StreamDigest` hashes
those bytes as they are read: no second pass over the files. Bytes the merge does not read, or reads
out of order (another layout, integer tensors copied from the reference), are read again for the digest
where they fall, so the result is always the digest of the whole file, byte for byte in order:
:func:`digest_files` computes the same value by reading the files.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

from ..errors import ConfigError

DIGESTS = ("xxh3_128", "sha256")
DEFAULT_DIGEST = "xxh3_128"
BLOCK = 1 << 20                     # read size when hashing: the block stays in cache while it is hashed


def hasher(algorithm: str) -> Any:
    """A new ``hashlib``-style object (``update``, ``hexdigest``) for ``algorithm``."""
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "xxh3_128":
        import xxhash
        return xxhash.xxh3_128()
    raise ConfigError(f"unknown digest {algorithm!r} (choose {', '.join(DIGESTS)} or none)")


def parse_digest(algorithm: str | None) -> str | None:
    """``"xxh3_128"``/``"sha256"`` -> itself; None or ``"none"`` -> None; anything else is an error."""
    if algorithm is None or str(algorithm).lower() == "none":
        return None
    a = str(algorithm).lower().replace("-", "_")
    hasher(a)
    return a


def placeholder(algorithm: str) -> str:
    """A recorded digest of the right length (a safetensors header's size is fixed before a merge starts)."""
    return f"{algorithm}:" + "0" * len(hasher(algorithm).hexdigest())


def combine(files: Sequence[str | os.PathLike], hexes: Sequence[str], algorithm: str) -> str:
    """The recorded digest of an input made of ``files`` whose own digests are ``hexes``: ``"ALGORITHM:HEX"``,
    the file's digest for one file; for several (a sharded layout: its index, then its shards) the digest
    of the text with one line ``"NAME HEX\\n"`` per file, in that order, so a changed byte of any file
    changes it."""
    if len(hexes) == 1:
        return f"{algorithm}:{hexes[0]}"
    h = hasher(algorithm)
    h.update("".join(f"{Path(f).name} {d}\n" for f, d in zip(files, hexes)).encode())
    return f"{algorithm}:{h.hexdigest()}"


def _hash_range(h: Any, fd: int, start: int, stop: int, buf: bytearray) -> int:
    """Feed bytes ``[start, stop)`` of an open file to ``h`` (``stop`` None: to its end); returns the end."""
    view = memoryview(buf)
    pos = start
    while stop is None or pos < stop:
        want = BLOCK if stop is None else min(BLOCK, stop - pos)
        n = os.preadv(fd, [view[:want]], pos)
        if not n:
            break
        h.update(view[:n])
        pos += n
    return pos


def digest_files(files: Sequence[str | os.PathLike], algorithm: str = DEFAULT_DIGEST) -> str:
    """The digest recorded for an input made of ``files``, as ``"ALGORITHM:HEX"`` (see :func:`combine`);
    the reference for what a merge computes from the bytes it reads."""
    hexes = []
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            hexes.append(StreamDigest(algorithm).hexdigest(fd))
        finally:
            os.close(fd)
    return combine(files, hexes, algorithm)


class StreamDigest:
    """The digest of one file, fed with the byte ranges a reader reads from it in whatever order.

    Ranges that continue where the digest stands are hashed as they are; a range ahead of it first has
    the bytes in between read and hashed; a range behind it was hashed already. :meth:`hexdigest` hashes
    what is left to the end of the file, so the result is the digest of the whole file.
    """

    def __init__(self, algorithm: str):
        self.h = hasher(algorithm)
        self.pos = 0
        self._buf: bytearray | None = None

    def _fill(self, fd: int, stop: int | None) -> None:
        if self._buf is None:
            self._buf = bytearray(BLOCK)
        self.pos = _hash_range(self.h, fd, self.pos, stop, self._buf)

    def feed(self, fd: int, pos: int, data: memoryview) -> None:
        """``data`` was read from file descriptor ``fd`` at byte ``pos``."""
        end = pos + len(data)
        if end <= self.pos:
            return
        if pos > self.pos:
            self._fill(fd, pos)
        self.h.update(data[self.pos - pos:] if pos < self.pos else data)
        self.pos = end

    def hexdigest(self, fd: int) -> str:
        self._fill(fd, None)
        return self.h.hexdigest()
