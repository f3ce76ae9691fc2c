"""Loading and saving checkpoints, safely.

* ``.safetensors`` is preferred: files written by :func:`save` carry the architecture as JSON under
  the metadata key ``wsnets.arch``, so every checkpoint is self-describing. Foreign safetensors files
  are read as bare state_dicts.
* A directory or ``*.index.json`` in the Hugging Face layout (``model.safetensors`` or shards named by
  ``model.safetensors.index.json``, as ``wsnets merge`` writes) loads as one checkpoint.
* ``.pt``/``.pth`` load only through ``torch.load(..., weights_only=True)``: a pickle that would run
  code is refused with :class:`~wsnets.errors.UnsafeCheckpointError` and its code never runs. A dict
  with a ``state_dict``/``model``/``model_state_dict`` entry is unwrapped.
* Writes are atomic: a temporary file in the same directory, fsynced, then renamed.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import sqlite3
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .arch import Architecture
from .errors import (CheckpointError, InputTypeError, MetadataError, TensorFormatError, UnsafeCheckpointError,
                     WSNetsError)
from .weights import WeightSpace

ARCH_KEY = "wsnets.arch"
# the floating-point dtypes wsnets computes with; float8 formats are refused (they come with scale tensors
# that a plain cast would ignore: a silently wrong network)
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BATCH_KEY = "wsnets.batch_size"
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")


def load(obj: Any, *, activation: str = "relu", input_shape: tuple[int, ...] | None = None,
         allow_nonfinite: bool = False, module: "nn.Module | str | None" = None,
         arch: "Architecture | str | os.PathLike | None" = None) -> WeightSpace:
    """Load anything that holds weights into a :class:`WeightSpace`.

    Parameters
    ----------
    obj : nn.Module, state_dict (mapping of str -> Tensor), WeightSpace, or path to
        ``.safetensors``/``.pt``/``.pth``.
    activation : hidden activation assumed for a bare state_dict (not stored in one).
    input_shape : input shape without batch dim, if known (``(64,)``, ``(1, 8, 8)``).
    allow_nonfinite : keep NaN/Inf weights instead of raising :class:`NonFiniteWeightsError`.
    module : the architecture of a bare state_dict/file, as a module (its weights are replaced by the
        file's) or ``"file.py:Class"`` / ``"file.py:Class(arg=...)"`` (a class built with those literal
        keyword arguments). Tensors of the file the module does not use are reported by a warning.
    arch : the architecture as an :class:`Architecture` or a path to its JSON (``arch.to_json()``).

    Examples
    --------
    >>> import torch.nn as nn, wsnets
    >>> ws = wsnets.load(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    >>> ws.arch.group_sizes
    (4, 8, 2)
    """
    source = ""
    given = resolve_arch(module, arch, input_shape)
    if given is not None and not isinstance(obj, (WeightSpace, nn.Module)):
        if isinstance(obj, (str, os.PathLike)):
            source = str(obj)
            sd = _read_any(Path(obj))
        elif isinstance(obj, Mapping):
            sd = obj
        else:
            raise InputTypeError(f"cannot load weights from {type(obj).__name__}")
        ws = _with_arch(sd, given, source)
    elif isinstance(obj, WeightSpace):
        ws = obj
    elif isinstance(obj, nn.Module):
        ws = WeightSpace.from_module(obj, input_shape)
    elif isinstance(obj, Mapping):
        ws = from_state_dict(obj, activation=activation, input_shape=input_shape)
    elif isinstance(obj, (str, os.PathLike)):
        source = str(obj)
        ws = load_file(obj, activation=activation, input_shape=input_shape)
    else:
        raise InputTypeError(f"cannot load weights from a {type(obj).__name__} (give a path, a state_dict, an "
                             "nn.Module or a WeightSpace)")
    check_params(ws, source)
    return ws if allow_nonfinite else ws.check_finite(source)


def resolve_arch(module, arch, input_shape=None) -> Architecture | None:
    """The architecture given by ``module`` (a module or ``"file.py:Class(...)"``) or ``arch`` (an
    Architecture or a JSON file), or None."""
    if module is not None and arch is not None:
        from .errors import ConfigError
        raise ConfigError("give the architecture once: a module or an architecture JSON, not both")
    if module is not None:
        from .trace import trace
        m = load_module_spec(module) if isinstance(module, str) else module
        return trace(m, input_shape)
    if arch is None or isinstance(arch, Architecture):
        return arch
    path = Path(arch)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such architecture file")
    try:
        return Architecture.from_json(path.read_text())
    except WSNetsError as e:
        raise type(e)(f"{path}: {e}") from None
    except (TypeError, ValueError, AttributeError) as e:
        from .errors import ConfigError
        raise ConfigError(f"{path}: not an architecture JSON ({_first_line(e)})") from None


def load_module_spec(spec: str) -> nn.Module:
    """Build the module named by ``"path/file.py:Class"`` or ``"path/file.py:Class(arg=1, name='x')"``
    (keyword arguments are Python literals; nothing else is evaluated)."""
    import ast
    import importlib.util
    from .errors import ConfigError
    head, _, _ = spec.partition("(")
    file, sep, _ = head.rpartition(":")
    rest = spec[len(file) + 1:]
    if not sep or not (file.endswith(".py") or file.replace(".", "").replace("_", "").isalnum()):
        raise ConfigError(f"--module {spec!r}: expected file.py:Class or file.py:Class(arg=...)")
    if file.endswith(".py") and not Path(file).is_file():
        raise ConfigError(f"--module {spec!r}: no such file {file}")
    name, _, args = rest.partition("(")
    kwargs = {}
    if args:
        try:
            call = ast.parse(f"f({args}", mode="eval").body
            if call.args:
                raise ValueError("positional arguments")
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
        except (SyntaxError, ValueError) as e:
            raise ConfigError(f"--module {spec!r}: arguments must be keyword=literal ({_first_line(e)})") from None
    try:
        if file.endswith(".py"):
            mod_spec = importlib.util.spec_from_file_location(f"wsnets_user_{Path(file).stem}", file)
            mod = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(mod)
        else:
            mod = importlib.import_module(file)
    except (Exception, SystemExit) as e:  # a module that calls sys.exit() on import is a bad input too
        raise ConfigError(f"--module {spec!r}: importing {file} fails ({type(e).__name__}: {_first_line(e)})") from None
    cls = getattr(mod, name.strip(), None)
    if not callable(cls):
        raise ConfigError(f"--module {spec!r}: {file} defines no nn.Module class {name.strip()!r}")
    import warnings
    try:
        with warnings.catch_warnings():  # torch's remarks while building it ("zero-element tensors")
            warnings.simplefilter("ignore")
            out = cls(**kwargs)
    except (Exception, SystemExit) as e:
        raise ConfigError(f"--module {spec!r}: {name.strip()}(**{kwargs}) fails ({type(e).__name__}: "
                          f"{_first_line(e)})") from None
    if not isinstance(out, nn.Module):
        raise ConfigError(f"--module {spec!r}: {name.strip()} does not make an nn.Module")
    return out.eval()


def _read_any(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix.lower() == ".safetensors":
        return read_safetensors(path)[0]
    return read_torch(path)


def _with_arch(sd: Mapping[str, Any], arch: Architecture, source: str) -> WeightSpace:
    """The tensors of ``sd`` the architecture uses; missing ones raise, unused ones are named in a warning."""
    import warnings
    from .errors import MissingKeyError
    where = f"{source}: " if source else ""
    sd = check_entries(sd, source)
    missing = [k for k in arch.param_shapes if k not in sd]
    if missing:
        raise MissingKeyError(f"{where}the architecture needs tensor {missing[0]!r} ({len(missing)} missing), "
                              "which the checkpoint lacks")
    unused = sorted(k for k in sd if k not in arch.param_shapes and not k.endswith("num_batches_tracked"))
    if unused:
        warnings.warn(f"{where}{len(unused)} tensor(s) the architecture does not use were left out: "
                      f"{', '.join(unused[:4])}{' ...' if len(unused) > 4 else ''}", stacklevel=3)
    tensors = {k: sd[k] for k in arch.param_shapes}
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{where}entry {k!r} is a {type(v).__name__}, not a tensor")
    return WeightSpace(arch, tensors)


def check_params(ws: WeightSpace, source: str = "") -> WeightSpace:
    """Every parameter the architecture uses is a real floating-point tensor (float16, bfloat16, float32 or
    float64), else :class:`TensorFormatError` naming it (an integer, boolean or complex tensor where a weight
    belongs: a quantized or otherwise encoded checkpoint)."""
    for k, v in ws.params.items():
        if v.dtype not in WEIGHT_DTYPES and v.is_floating_point():
            raise TensorFormatError(_float8_message(k, v, source))
        if not v.is_floating_point():
            where = f"{source}: " if source else ""
            kind = "complex" if v.is_complex() else ("boolean" if v.dtype == torch.bool else "integer")
            raise TensorFormatError(f"{where}tensor {k!r} is {kind} ({v.dtype}), but it is a weight of the "
                                    "network: weights must be floating point (dequantize or convert the checkpoint)")
    return ws


def check_entries(sd: Mapping[Any, Any], source: str = "") -> dict[str, torch.Tensor]:
    """A state_dict's entries checked where they enter: string names, tensors, dense (strided) layout,
    not complex; ``num_batches_tracked`` counters dropped. Returns a plain dict."""
    where = f"{source}: " if source else ""
    tensors = {}
    for k, v in sd.items():
        if not isinstance(k, str):
            raise TensorFormatError(f"{where}entry {k!r} is named by a {type(k).__name__}; state_dict names must be "
                                    "strings (e.g. '0.weight')")
        if k.endswith("num_batches_tracked"):
            continue
        if not isinstance(v, torch.Tensor):
            raise TensorFormatError(f"{where}entry {k!r} is a {type(v).__name__}, not a tensor")
        if v.layout != torch.strided:
            raise TensorFormatError(f"{where}tensor {k!r} is {str(v.layout).replace('torch.', '')}, not dense; "
                                    "save dense weights (tensor.to_dense())")
        if v.is_complex():
            raise TensorFormatError(f"{where}tensor {k!r} is complex ({v.dtype}); weights must be real")
        if v.is_meta:
            raise TensorFormatError(f"{where}tensor {k!r} is on the meta device (no values)")
        if v.is_floating_point() and v.dtype not in WEIGHT_DTYPES:
            raise TensorFormatError(_float8_message(k, v, source))
        tensors[k] = v
    return tensors


def _float8_message(key: str, v: torch.Tensor, source: str = "") -> str:
    where = f"{source}: " if source else ""
    name = str(v.dtype).replace("torch.", "")
    return (f"{where}tensor {key!r} is {name}: wsnets reads float16, bfloat16, float32 and float64 weights; a "
            f"{name} checkpoint is dequantized with its scale tensors first (a plain cast would be a different network)")


def compute_dtype(ws: WeightSpace, source: str = "", dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64),
                  to: torch.dtype = torch.float32) -> tuple[WeightSpace, str | None]:
    """``ws`` cast to ``to`` when a computation needs it (half precision for a Hessian, a meta-model in
    float32), with a note saying so (None if nothing was cast)."""
    if ws.dtype in dtypes:
        return ws, None
    name = str(ws.dtype).replace("torch.", "")
    return ws.to(to), f"{source + ': ' if source else ''}{name} weights, computed in {str(to).replace('torch.', '')}"


def from_state_dict(sd: Mapping[str, Any], *, activation: str = "relu",
                    input_shape: tuple[int, ...] | None = None, arch: Architecture | None = None,
                    source: str = "") -> WeightSpace:
    """A WeightSpace from a state_dict; the architecture is inferred unless given."""
    from .convert import arch_from_state_dict
    tensors = check_entries(sd, source)
    if arch is None:
        arch = arch_from_state_dict(tensors, activation=activation, input_shape=input_shape)
    return WeightSpace(arch, tensors)


def load_file(path: str | os.PathLike, **kwargs: Any) -> WeightSpace:
    """Load a ``.safetensors``, ``.pt`` or ``.pth`` file (see module docstring)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not (path.is_dir() or path.name.endswith(".index.json")) and path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty")
    suffix = path.suffix.lower()
    try:
        if path.is_dir() or path.name.endswith(".index.json"):
            from .merge.shards import read_tensors    # a Hugging Face layout (as wsnets merge writes)
            return _from_tensors(*read_tensors(path), path, **kwargs)
        if suffix == ".safetensors":
            return _load_safetensors(path, **kwargs)
        if suffix in (".pt", ".pth", ".bin", ".ckpt"):
            sd = read_torch(path)
            return from_state_dict(sd, source=str(path), **kwargs)
    except WSNetsError as e:
        msg = str(e)
        raise type(e)(msg if str(path) in msg else f"{path}: {msg}") from None
    raise CheckpointError(f"{path}: unknown checkpoint format {suffix!r} (use .safetensors, .pt or .pth)")


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, with corrupt files reported by name."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises SafetensorError / OSError on truncation and garbage
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({_first_line(e)})") from None
    return tensors, meta


def _load_safetensors(path: Path, **kwargs: Any) -> WeightSpace:
    return _from_tensors(*read_safetensors(path), path, **kwargs)


def _from_tensors(tensors: dict[str, torch.Tensor], meta: Mapping[str, str], path: Path, *, activation: str = "relu",
                  input_shape=None) -> WeightSpace:
    arch, batch = read_wsnets_metadata(meta, str(path))
    if arch is not None:
        return WeightSpace(arch, check_entries(tensors, str(path)), batch)
    return from_state_dict(tensors, activation=activation, input_shape=input_shape, source=str(path))


def read_wsnets_metadata(meta: Mapping[str, str], source: str = "") -> tuple[Architecture | None, int | None]:
    """The architecture and batch size a safetensors file's wsnets metadata records (None, None without
    one), checked: a malformed value is a one-line :class:`MetadataError` naming the file and key."""
    if ARCH_KEY not in meta:
        return None, None
    arch = arch_from_metadata(meta[ARCH_KEY], source)
    batch = meta.get(BATCH_KEY)
    if batch in (None, "", "none"):
        return arch, None
    if not batch.isdigit() or int(batch) < 1:
        raise MetadataError(f"{source}: metadata {BATCH_KEY!r} is {batch!r}, not a positive integer or 'none'")
    return arch, int(batch)


_MAX_ARCH_JSON = 50_000_000  # characters; a real architecture's JSON is kilobytes


def arch_from_metadata(text: str, source: str = "") -> Architecture:
    """The :class:`Architecture` in a safetensors file's ``wsnets.arch`` metadata, validated: JSON that is
    not an object (a list, a number, null), nested too deeply, too large or not an architecture is a
    one-line :class:`MetadataError` naming the file and key."""
    where = f"{source}: " if source else ""
    what = f"{where}metadata {ARCH_KEY!r}"
    if len(text) > _MAX_ARCH_JSON:
        raise MetadataError(f"{what} is {len(text):,} characters, not an architecture description")
    try:
        obj = json.loads(text)
    except RecursionError:
        raise MetadataError(f"{what} is JSON nested too deeply to be an architecture") from None
    except json.JSONDecodeError as e:
        raise MetadataError(f"{what} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        kind = {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(obj), "a number")
        raise MetadataError(f"{what} is {kind}, not a JSON object describing an architecture")
    try:
        return Architecture.from_json(text)
    except WSNetsError as e:
        raise MetadataError(f"{what} does not describe an architecture ({e})") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError) as e:
        raise MetadataError(f"{what} does not describe an architecture ({type(e).__name__}: {_first_line(e)})") \
            from None


def read_torch(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``torch.load(path, weights_only=True)`` with unwrapping and one-line errors."""
    import warnings
    try:
        with warnings.catch_warnings():  # torch's remarks on old formats (TypedStorage, pickle protocol): not ours
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if _truncated_global(path, str(e)):
            raise CheckpointError(f"{path}: corrupt or truncated checkpoint (the pickle ends inside a name)") from None
        if "Unsupported operand" in str(e) and not _pickle_names_code(path):
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (corrupt, or another format: no pickle that "
                                  f"names code, nor a PyTorch archive)") from None
        raise UnsafeCheckpointError(
            f"{path}: refused to unpickle: the file holds objects other than tensors and could run code "
            f"({_first_line(e).split('.')[0]}); re-save it as a state_dict or safetensors") from None
    except Exception as e:  # noqa: BLE001 - EOFError, OSError, RuntimeError, BadZipFile, struct.error, IndexError...
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}: {_first_line(e)})") \
            from None
    if isinstance(obj, Mapping):
        for k in _WRAPPER_KEYS:
            if k in obj and isinstance(obj[k], Mapping):
                obj = obj[k]
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state_dict")
    return dict(obj)


def _pickle_names_code(path: str | os.PathLike) -> bool:
    """Whether the file, read as a pickle (never executed: :func:`pickletools.genops` only parses), names a
    callable before it stops parsing. torch's weights-only unpickler says "Unsupported operand" both for
    pickle protocols it does not read (which may carry code) and for bytes that are no pickle at all."""
    import pickletools
    code = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4"}
    try:
        with open(path, "rb") as f:
            for op, _, _ in pickletools.genops(f):
                if op.name in code:
                    return True
    except Exception:  # noqa: BLE001 - ValueError/EOF at a byte that is no opcode: parsing ends there
        pass
    return False


def _truncated_global(path: str | os.PathLike, msg: str) -> bool:
    """Whether a refused legacy pickle merely ends inside a class name (a truncated file, not foreign code):
    the 'unsupported global' is the file's last bytes."""
    import re
    m = re.search(r"GLOBAL (\S*)", msg)
    if not m:
        return False
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 256))
            tail = f.read().rstrip(b"\n")
    except OSError:
        return False
    name = m.group(1)
    if name in ("", "."):  # the file ends right after the GLOBAL opcode
        return bool(tail)
    module, _, attr = name.rpartition(".")
    # pickle reads the unterminated last line and drops its last character as if it were the newline
    return any(part and (tail.endswith(part.encode()) or tail[:-1].endswith(part.encode())) for part in (attr, module))


def save(ws: WeightSpace, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
    """Atomically write ``ws`` as safetensors with its architecture in the metadata."""
    path = Path(path)
    meta = {ARCH_KEY: ws.arch.to_json(), BATCH_KEY: "none" if ws.batch_size is None else str(ws.batch_size)}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    write_safetensors(path, ws.params, meta)
    return path


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """A safetensors file's bytes that depend only on ``tensors`` and ``metadata``: the library writes the
    metadata in a random order in every process (a Rust hash map), so the same zoo's shards differed
    byte for byte; here the header is rewritten with its metadata keys sorted and its tensor entries in
    data order (same format: any safetensors reader reads it)."""
    from safetensors.torch import save
    raw = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
               metadata=None if metadata is None else dict(metadata))
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", None)
    out = {"__metadata__": dict(sorted(meta.items()))} if meta else {}
    out.update(sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"], kv[0])))
    head = json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode()
    head += b" " * (-len(head) % 8)  # the library's alignment of the data section
    return len(head).to_bytes(8, "little") + head + raw[8 + n:]


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Atomically write a safetensors file whose bytes depend only on its content (:func:`safetensors_bytes`)."""
    path = Path(path)
    data = safetensors_bytes(tensors, metadata)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return path


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def remove_stale_temps(directory: Path) -> int:
    """Delete the temporary files :func:`atomic_write` (and the directories of sharded merge outputs)
    left in ``directory`` when its process was killed (same host, process gone); those of live writers
    are kept. Returns how many went."""
    host = _host()
    n = 0
    for p in Path(directory).glob(".*.tmp"):
        parts = p.name.split(".")
        if len(parts) < 5 or "-" not in parts[-3]:
            continue
        h, _, pid = parts[-3].rpartition("-")
        if h != host or not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            if p.is_dir():  # a sharded output of wsnets merge
                import shutil
                shutil.rmtree(p)
            else:
                p.unlink()
            n += 1
        except OSError:
            pass
    return n


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def cache_dir(kind: str) -> Path:
    """``$WSNETS_CACHE/<kind>``, else ``$XDG_CACHE_HOME/wsnets/<kind>`` (default ``~/.cache/wsnets/<kind>``):
    the main job's zoos (``kind="zoos"``) and generated datasets (``kind="datasets"``)."""
    root = os.environ.get("WSNETS_CACHE")
    if root:
        return Path(root) / kind
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wsnets" / kind


def _host() -> str:
    import socket
    return socket.gethostname().replace(".", "_")


def _writer_tag() -> str:
    return f"{_host()}-{os.getpid()}"


def check_output_path(path: str | os.PathLike, what: str = "output") -> None:
    """Refuse, before any work, an output whose nearest existing parent is a file (``--out notes.txt/x``):
    :class:`~wsnets.errors.OutputError` naming it (the folders below it would be created on write)."""
    from .errors import OutputError
    for parent in Path(path).absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{path}: cannot write the {what} there: {parent} is a file, not a folder")
            return


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then fsync and rename onto ``path``; the old file survives any crash.

    The temporary file, ``.<name>.<host>-<pid>.<random>.tmp`` beside ``path``, names its writer, so
    :func:`remove_stale_temps` can delete those of killed writers without touching a live one's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_writer_tag()}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, file_mode(path))  # mkstemp makes 0600; a written file gets the mode open() would give it
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def file_mode(path: str | os.PathLike) -> int:
    """The permission bits a file written at ``path`` gets: an existing file's own, else ``0o666`` less the
    process umask (what ``open(path, "w")`` gives a new file)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return 0o666 & ~umask()


def umask() -> int:
    """The process umask, read without changing it where the system allows (Linux: /proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but brief)
    os.umask(mask)
    return mask


_FULL_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG) if e is not None)


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` says a write ran out of space: ``ENOSPC``, a quota (``EDQUOT``), a file-size limit
    (``EFBIG``), or SQLite's ``database or disk is full``."""
    if isinstance(e, OSError):
        return e.errno in _FULL_ERRNOS
    if isinstance(e, sqlite3.Error):
        return getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(e)
    return False


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Atomic text write (JSON reports, configs)."""
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_toml(path: str | os.PathLike, what: str = "file") -> dict[str, Any]:
    """Parse a TOML file; a missing file or bad TOML is a one-line :class:`ConfigError` naming it."""
    import tomllib

    from .errors import ConfigError
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such {what} file")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML in {what} ({e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: {what} is not UTF-8 text (byte {e.start}), as TOML must be") from None


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:200] if s else type(e).__name__
