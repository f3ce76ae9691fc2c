"""Checkpoints of any size as named tensors: reading slices of them, writing sharded outputs.

Inputs: a state_dict, a ``.safetensors`` file, a Hugging Face layout (a directory or its
``model.safetensors.index.json`` with the shards it names), or ``.pt``/``.bin`` files (read whole with
``torch.load(weights_only=True)``; their sharded ``pytorch_model.bin.index.json`` one shard at a time).

Safetensors are read with positioned reads into the merge's own buffers, the header parsed and checked
as the format specifies (offsets inside the file, sizes matching shapes and dtypes), so a truncated or
corrupt shard is a one-line error naming the file and tensor before anything is written. (The
``safetensors`` library's ``safe_open`` maps the whole file: every page touched stays in the process's
resident memory while the file is open, and a merge of three 2 GB files would hold 6 GB.)

Outputs are written shard by shard without ever holding the model: the layout (which tensor goes in
which shard, at which offset) is fixed before the merge starts from the planned names, shapes and
dtypes, each shard's header is written first and each slice's bytes go to their place as they are
computed. Everything is written under a temporary name beside the output and renamed at the end (a
directory for a sharded output), so a merge killed halfway leaves no partial output; the next merge
into the same directory removes the temporaries of killed writers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..errors import CheckpointError, ConfigError, OutputError, OutputExistsError
from .digest import StreamDigest, combine, digest_files

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives: its file and the absolute byte offset of its data (None in memory)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path | None = None
    start: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: corrupt or truncated safetensors file ({why})")


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors (in data order) and metadata of a safetensors file, checked against its size."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(path, f"{size} bytes, shorter than a header")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > MAX_HEADER:
            raise _corrupt(path, f"header of {n} bytes in a file of {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _corrupt(path, f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _corrupt(path, "metadata is not a map of strings")
    data_start, data_len = 8 + n, size - 8 - n
    infos, spans = {}, []
    for name, e in header.items():
        try:
            dtype = DTYPES[e["dtype"]]
            shape = tuple(int(s) for s in e["shape"])
            b, end = (int(v) for v in e["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"tensor {name!r}: bad entry {json.dumps(e)[:120]}") from None
        info = TensorInfo(name, shape, dtype, path, data_start + b)
        if any(s < 0 for s in shape) or not 0 <= b <= end or end - b != info.nbytes:
            raise _corrupt(path, f"tensor {name!r}: offsets {[b, end]} do not hold {list(shape)} {e['dtype']}")
        if end > data_len:
            raise _corrupt(path, f"tensor {name!r}: data ends at byte {end} of a {data_len}-byte data section")
        infos[name] = info
        spans.append((b, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise _corrupt(path, f"tensors {n0!r} and {n1!r} overlap")
    return dict(sorted(infos.items(), key=lambda kv: (kv[1].start, kv[0]))), meta


class Checkpoint:
    """One model's tensors by name, read a slice at a time (see the module docstring).

    Attributes: ``label`` (path or name shown in errors), ``infos`` (name -> :class:`TensorInfo`, in
    file order), ``metadata``, ``files`` (the files holding it, for provenance hashes), ``root``
    (its directory for a Hugging Face layout, else None).
    """

    def __init__(self, label: str, infos: dict[str, TensorInfo], metadata: dict[str, str], files: list[Path],
                 *, memory: Mapping[str, torch.Tensor] | None = None, bin_shards: dict[str, Path] | None = None,
                 root: Path | None = None):
        self.label, self.infos, self.metadata, self.files, self.root = label, infos, metadata, files, root
        self._memory = memory
        self._bin = bin_shards
        self._bin_cache: tuple[Path | None, dict[str, torch.Tensor]] = (None, {})
        self._handles: dict[Path, Any] = {}
        self.digesting: str | None = None             # digest algorithm while a merge digests the files
        self._digests: dict[Path, StreamDigest] = {}
        self._digest: str | None = None

    def start_digest(self, algorithm: str) -> None:
        """From now on, digest the files from the bytes :meth:`read` reads (see :mod:`wsnets.merge.digest`)."""
        self.digesting, self._digest = algorithm, None
        self._digests = {i.file: StreamDigest(algorithm) for i in self.infos.values()
                         if i.file is not None and self._memory is None}

    def finish_digest(self) -> str:
        """The digest of the files (``"ALGORITHM:HEX"``): what was read, and what was not read for the rest."""
        if self._digest is None:
            hexes = []
            for f in self.files:
                d = self._digests.get(f)
                if d is None:                          # an index, a .pt/.bin file: read whole
                    hexes.append(digest_files([f], self.digesting).split(":", 1)[1])
                    continue
                h = self._handles.get(f)
                fd = os.open(f, os.O_RDONLY) if h is None else h.fileno()
                try:
                    hexes.append(d.hexdigest(fd))
                finally:
                    if h is None:
                        os.close(fd)
            self._digest = combine(self.files, hexes, self.digesting)
        return self._digest

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def read(self, name: str, start: int = 0, stop: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Flat elements ``[start, stop)`` of tensor ``name`` in its stored dtype (a new CPU tensor or a view).
        ``out``: a uint8 CPU buffer of at least that many bytes to read a file's bytes into (reused by the
        caller), else a new one."""
        info = self.infos[name]
        stop = info.numel if stop is None else stop
        if self._memory is not None:
            return self._memory[name].reshape(-1)[start:stop]
        if self._bin is not None:
            return self._bin_tensor(name).reshape(-1)[start:stop]
        size = info.dtype.itemsize
        nbytes = (stop - start) * size
        buf = out[:nbytes] if out is not None and out.numel() >= nbytes else torch.empty(nbytes, dtype=torch.uint8)
        f = self._handles.get(info.file)
        if f is None:
            f = self._handles[info.file] = open(info.file, "rb", buffering=0)
        f.seek(info.start + start * size)
        view, got = memoryview(buf.numpy()), 0
        while got < len(view):
            k = f.readinto(view[got:])
            if not k:
                raise _corrupt(info.file, f"tensor {name!r}: file ended while reading")
            got += k
        d = self._digests.get(info.file)
        if d is not None:
            d.feed(f.fileno(), info.start + start * size, view)
        return buf.view(info.dtype)

    def _bin_tensor(self, name: str) -> torch.Tensor:
        from ..io import read_torch
        path = self._bin[name]
        if self._bin_cache[0] != path:
            self._bin_cache = (None, {})              # drop the previous shard before loading the next
            self._bin_cache = (path, read_torch(path))
        return self._bin_cache[1][name]

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles = {}
        self._bin_cache = (None, {})


def _memory_checkpoint(sd: Mapping[str, Any], label: str, files: list[Path] | None = None) -> Checkpoint:
    from ..io import check_entries
    checked = check_entries(sd, label)       # string names, dense real tensors (one-line errors)
    tensors, infos = {}, {}
    for k, v in sd.items():                  # in the state_dict's order; step counters kept (copied)
        if k in checked or (isinstance(k, str) and k.endswith("num_batches_tracked") and isinstance(v, torch.Tensor)):
            t = v.detach().contiguous()
            tensors[k] = t
            infos[k] = TensorInfo(k, tuple(t.shape), t.dtype)
    return Checkpoint(label, infos, {}, files or [], memory=tensors)


def _checked_meta(meta: dict[str, str], path: Path) -> dict[str, str]:
    """A file's metadata, its wsnets architecture and batch size (if any) checked as wsnets.load checks them."""
    from ..io import read_wsnets_metadata
    read_wsnets_metadata(meta, str(path))
    return meta


def _sharded(index: Path) -> Checkpoint:
    try:
        data = json.loads(index.read_text())
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a sharded-checkpoint index ({type(e).__name__})") from None
    root = index.parent
    by_file: dict[str, list[str]] = {}
    for name, fname in weight_map.items():
        by_file.setdefault(str(fname), []).append(name)
    infos, meta, files = {}, {}, [index]
    bin_shards: dict[str, Path] = {}
    for fname, names in by_file.items():
        shard = root / fname
        if not shard.is_file():
            raise CheckpointError(f"{index}: shard {fname!r} (tensor {names[0]!r}) does not exist")
        files.append(shard)
        if not fname.endswith(".safetensors"):
            bin_shards.update({n: shard for n in names})
            continue
        shard_infos, shard_meta = read_header(shard)
        meta = meta or _checked_meta(shard_meta, shard)
        for n in names:
            if n not in shard_infos:
                raise CheckpointError(f"{shard}: tensor {n!r} listed in {index.name} is not in this shard")
            infos[n] = shard_infos[n]
    if bin_shards:
        from ..io import read_torch
        for fname in dict.fromkeys(str(p.name) for p in bin_shards.values()):
            sd = read_torch(root / fname)     # shapes and dtypes (one shard in memory at a time)
            for n, t in sd.items():
                if n in bin_shards:
                    infos[n] = TensorInfo(n, tuple(t.shape), t.dtype)
            del sd
        missing = [n for n in bin_shards if n not in infos]
        if missing:
            raise CheckpointError(f"{index}: tensor {missing[0]!r} is not in its shard {weight_map[missing[0]]!r}")
    # shard by shard, each in data order: a merge then reads every file front to back (and digests the
    # bytes as it reads them, wsnets.merge.digest)
    ordered = {n: infos[n] for fname in by_file for n in sorted(by_file[fname], key=lambda n: infos[n].start)}
    return Checkpoint(str(index.parent), ordered, meta, files, bin_shards=bin_shards or None, root=root)


def open_checkpoint(src: Any, label: str | None = None) -> Checkpoint:
    """A :class:`Checkpoint` over a state_dict, a file, a sharded index or a checkpoint directory."""
    if isinstance(src, Checkpoint):
        return src
    if isinstance(src, Mapping):
        return _memory_checkpoint(src, label or "state_dict")
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(f"cannot read a checkpoint from {type(src).__name__}")
    path = Path(src)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        for name in (INDEX, SINGLE, BIN_INDEX, "pytorch_model.bin"):
            if (path / name).is_file():
                ck = open_checkpoint(path / name)
                ck.label, ck.root = str(path), path
                return ck
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            ck = open_checkpoint(found[0])
            ck.label, ck.root = str(path), path
            return ck
        raise CheckpointError(f"{path}: no checkpoint found (expected {SINGLE}, {INDEX}, {BIN_INDEX} "
                              "or a single .safetensors file)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty")
    if path.name.endswith(".index.json"):
        return _sharded(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        infos, meta = read_header(path)
        return Checkpoint(str(path), infos, _checked_meta(meta, path), [path])
    if suffix in (".pt", ".pth", ".bin", ".ckpt"):
        from ..io import read_torch
        return _memory_checkpoint(read_torch(path), str(path), [path])
    raise CheckpointError(f"{path}: unknown checkpoint format {suffix!r} (use .safetensors, a sharded "
                          f"{INDEX}, .pt or .bin)")


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a checkpoint directory or sharded index (what :func:`wsnets.load`
    uses for them)."""
    ck = open_checkpoint(path)
    try:
        return {n: ck.read(n).reshape(i.shape).clone() for n, i in ck.infos.items()}, dict(ck.metadata)
    finally:
        ck.close()


# -- writing ------------------------------------------------------------------------------------------
def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"``, ``"1e9"`` or an int -> bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40, "KB": 10**3, "MB": 10**6,
             "GB": 10**9, "TB": 10**12, "K": 10**3, "M": 10**6, "G": 10**9, "B": 1}
    for u, m in units.items():
        if s.endswith(u):
            s, mult = s[:-len(u)], m
            break
    else:
        mult = 1
    try:
        v = int(float(s) * mult)
    except (ValueError, OverflowError):        # not a number, NaN, infinity
        raise ConfigError(f"bad size {text!r} (e.g. 5GB, 500MB, 2GiB)") from None
    if v <= 0:
        raise ConfigError(f"bad size {text!r}: must be positive")
    return v


def _header_bytes(entries: list[tuple[str, tuple[int, ...], torch.dtype, int]], metadata: Mapping[str, str]) -> bytes:
    head: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    for name, shape, dtype, off in entries:
        end = off + math.prod(shape) * dtype.itemsize
        head[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [off, end]}
    b = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
    return b + b" " * (-len(b) % 8)


def is_checkpoint_dir(path: Path) -> bool:
    return path.is_dir() and any((path / n).is_file() for n in (INDEX, SINGLE))


class ShardWriter:
    """Writes planned tensors into one ``.safetensors`` file or a sharded directory, slice by slice.

    ``entries`` are ``(name, shape, dtype)`` in output order; a new shard starts when the next tensor
    would pass ``shard_bytes`` (a bigger tensor gets a shard of its own). Within a shard, tensors are
    laid out by decreasing item size so every tensor starts aligned to its dtype. ``metadata`` goes into
    every shard's header and the index; :meth:`finish` may replace it with metadata of the same length
    (hashes computed during the merge).
    """

    def __init__(self, out: str | os.PathLike, entries: Iterable[tuple[str, tuple[int, ...], torch.dtype]], *,
                 metadata: Mapping[str, str], shard_bytes: int | None = None, single: bool | None = None):
        if sys.byteorder != "little":
            raise OutputError("safetensors are little-endian; this machine is not")
        self.out = Path(out)
        self.single = self.out.suffix == ".safetensors" if single is None else single
        entries = list(entries)
        limit = shard_bytes or (1 << 62)
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for e in entries:
            nb = TensorInfo(*e).nbytes
            if shards[-1] and not self.single and size + nb > limit:
                shards.append([])
                size = 0
            shards[-1].append(e)
            size += nb
        n = len(shards)
        self.names = [self.out.name] if self.single else (
            [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self.layout: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = []
        self.where: dict[str, tuple[int, int, torch.dtype]] = {}   # name -> (shard, byte offset in the data)
        self.data_bytes = []
        for i, sh in enumerate(shards):
            order = sorted(range(len(sh)), key=lambda j: (-sh[j][2].itemsize, j))
            off, lay = 0, []
            for j in order:
                name, shape, dtype = sh[j]
                lay.append((name, tuple(shape), dtype, off))
                self.where[name] = (i, off, dtype)
                off += TensorInfo(name, tuple(shape), dtype).nbytes
            self.layout.append(lay)
            self.data_bytes.append(off)
        self.total_bytes = sum(self.data_bytes)
        self._meta_len = None
        self._open(dict(metadata))

    def _open(self, metadata: dict[str, str]) -> None:
        from ..io import remove_stale_temps
        parent = self.out.parent
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(parent)
        if self.out.exists() and not (self.out.is_file() if self.single else is_checkpoint_dir(self.out)):
            raise OutputExistsError(f"{self.out}: exists and is not a checkpoint {'file' if self.single else 'directory'}; "
                              "choose another output or remove it")
        free = shutil.disk_usage(parent).free
        if free < self.total_bytes:
            raise OutputError(f"{parent}: {free / 1e9:.2f} GB free, the output needs {self.total_bytes / 1e9:.2f} GB")
        from ..io import file_mode, umask
        prefix = f".{self.out.name}.{_tag()}."
        if self.single:
            fd, tmp = tempfile.mkstemp(dir=parent, prefix=prefix, suffix=".tmp")
            os.close(fd)
            self.tmp = Path(tmp)
            self.paths = [self.tmp]
            os.chmod(self.tmp, file_mode(self.out))  # mkstemp makes 0600; the output gets what open() would give it
        else:
            self.tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix, suffix=".tmp"))
            self.paths = [self.tmp / n for n in self.names]
            os.chmod(self.tmp, 0o777 & ~umask())     # mkdtemp makes 0700; the folder gets what mkdir() would give it
        self.fds = []
        self.headers = []
        for p, lay, nb in zip(self.paths, self.layout, self.data_bytes):
            head = _header_bytes(lay, metadata)
            fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)   # less the umask, as open() does
            os.pwrite(fd, len(head).to_bytes(8, "little") + head, 0)
            os.ftruncate(fd, 8 + len(head) + nb)
            self.fds.append(fd)
            self.headers.append(len(head))

    def write(self, name: str, start: int, values: torch.Tensor) -> None:
        """Write flat elements ``[start, start + len(values))`` of tensor ``name`` (already in its dtype)."""
        shard, off, dtype = self.where[name]
        data = values.detach().to("cpu", dtype).contiguous().reshape(-1).view(torch.uint8)
        view = memoryview(data.numpy())
        pos = 8 + self.headers[shard] + off + start * dtype.itemsize
        while len(view):
            k = os.pwrite(self.fds[shard], view, pos)
            view, pos = view[k:], pos + k

    def finish(self, metadata: Mapping[str, str], index_metadata: Mapping[str, Any] | None = None,
               extra_files: Iterable[tuple[Path, str]] = ()) -> list[Path]:
        """Final headers (``metadata`` must encode to the same length as the first), index, extra files
        copied in, everything fsynced, then the rename onto the output. Returns the written files."""
        for i, (fd, lay) in enumerate(zip(self.fds, self.layout)):
            head = _header_bytes(lay, metadata)
            if len(head) != self.headers[i]:
                raise RuntimeError("final safetensors header differs in length from the planned one")
            os.pwrite(fd, head, 8)
            os.fsync(fd)
            os.close(fd)
        self.fds = []
        if not self.single:
            if len(self.names) > 1:
                weight_map = {name: self.names[s] for name, (s, _, _) in self.where.items()}
                index = {"metadata": {"total_size": self.total_bytes, **(index_metadata or metadata)},
                         "weight_map": weight_map}
                (self.tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
            for src, rel in extra_files:
                dst = self.tmp / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
            dfd = os.open(self.tmp, os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)
        self._rename()
        return [self.out] if self.single else [self.out / n for n in self.names]

    def _rename(self) -> None:
        if self.single or not self.out.exists():
            os.replace(self.tmp, self.out)
            return
        old = Path(tempfile.mkdtemp(dir=self.out.parent, prefix=f".{self.out.name}.{_tag()}.", suffix=".tmp"))
        os.rmdir(old)
        os.replace(self.out, old)         # the previous output moves aside, the new one takes its name,
        os.replace(self.tmp, self.out)    # then the previous one goes
        shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Close and delete the temporary output (after an error)."""
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []
        if self.tmp.is_dir():
            shutil.rmtree(self.tmp, ignore_errors=True)
        elif self.tmp.exists():
            self.tmp.unlink()


def _tag() -> str:
    from ..io import _writer_tag
    return _writer_tag()
