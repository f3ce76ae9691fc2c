"""Merging checkpoints of any architecture and size, tensor by tensor, in bounded memory.

:func:`merge_checkpoints` matches tensors by name (a name or shape that differs is a one-line error
naming the file and tensor, or, with ``shared_only``, left out and listed), reads one slice of one
tensor from each model at a time (:mod:`wsnets.merge.shards`), runs a registered method on it
(:mod:`wsnets.merge.engine`) in an explicit compute dtype, and writes the output shard by shard, so
peak memory depends on the slice size, not on the model. Tensors that are not floating point
(position ids, step counters) are copied from the reference model (the base, else the first model);
BatchNorm running statistics of methods with a base get the mean of the fine-tuned models'.

The output's metadata records the provenance beside the tensors: method, resolved options, compute
and output dtypes, scope, tensors left out, and the path and digest of every input file, computed
from the bytes the merge reads (:mod:`wsnets.merge.digest`; the same value as :func:`~wsnets.merge.digest.digest_files`). The
default digest is XXH3-128 (the ``xxhash`` package; what ``xxh128sum FILE`` prints): a file changed by
accident keeps its digest with probability ~2^-128, and it costs a merge ~0.1 CPU-second per GB where
SHA-256 costs ~1. It is not cryptographic (a deliberate collision can be made): where tampering matters
ask for ``digest="sha256"`` (``--hash sha256``; what ``sha256sum FILE`` prints).
Each input's entry is ``{"path": ..., "digest": "ALGORITHM:HEX"}`` (None for an in-memory input), and
``wsnets.merge.digest`` names the algorithm (``none`` when hashing is off). Earlier outputs recorded
``{"path": ..., "sha256": HEX}``; :func:`ingredients` reads both.

>>> import torch
>>> from wsnets.merge import merge_checkpoints
>>> a, b = {"w": torch.zeros(3)}, {"w": torch.ones(3)}
>>> merge_checkpoints("linear", [a, b], weight=[1, 3]).tensors["w"]
tensor([0.7500, 0.7500, 0.7500])
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from ..errors import ArchitectureMismatchError, ConfigError, NonFiniteWeightsError, OutputExistsError
from .compat import _label
from .digest import DEFAULT_DIGEST, parse_digest, placeholder
from .engine import Chunk, iter_slices, run_group
from .registry import Method, get_method
from .shards import WEIGHT_SUFFIXES, Checkpoint, ShardWriter, open_checkpoint, parse_size

META_PREFIX = "wsnets.merge."
DEFAULT_SHARD = "5GB"
DEFAULT_CHUNK_MB = 16.0
_HALF = (torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16, "bf16": torch.bfloat16}


def is_stat(name: str) -> bool:
    """True for BatchNorm running statistics (buffers, not parameters)."""
    return name.endswith(("running_mean", "running_var"))


def parse_dtype(name: str | torch.dtype | None, what: str = "dtype") -> torch.dtype | None:
    """``"float32"``/``"bf16"``/a torch dtype -> torch dtype; None or ``"auto"`` -> None."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if str(name).lower() == "auto":
        return None
    try:
        return _DTYPES[str(name).lower().removeprefix("torch.")]
    except KeyError:
        raise ConfigError(f"unknown {what} {name!r} (float32, float64, bfloat16, float16 or auto)") from None


@dataclass(frozen=True)
class TensorRule:
    """Options for the tensors whose names match ``pattern`` (a glob; first matching rule wins)."""

    pattern: str
    options: Mapping[str, Any]


@dataclass
class MergeResult:
    """What :func:`merge_checkpoints` did: the output (``out`` and its ``files``, or ``tensors`` when
    merged in memory), the resolved ``parameters``, tensors ``merged`` by the method, ``copied`` from the
    reference, averaged as ``stats``, ``left_out``, dtypes and the number of passes over the largest group."""

    method: str
    parameters: dict[str, Any]
    models: list[str]
    base: str | None
    out: Path | None
    files: list[Path] = field(default_factory=list)
    tensors: dict[str, torch.Tensor] | None = None
    merged: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    stats: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    extra_files: list[str] = field(default_factory=list)
    compute_dtype: str = ""
    scope: str = "tensor"
    passes: int = 1
    metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "parameters": self.parameters, "models": self.models, "base": self.base,
                "out": None if self.out is None else str(self.out), "files": [str(f) for f in self.files],
                "merged": len(self.merged), "copied": self.copied, "stats": self.stats, "left_out": self.left_out,
                "extra_files": self.extra_files, "compute_dtype": self.compute_dtype, "scope": self.scope,
                "passes": self.passes}


def _check_distinct(items: list[tuple[str, Any]]) -> None:
    """``items`` are (role, source) pairs; a file or directory listed twice is an error."""
    seen: dict[Path, str] = {}
    for role, src in items:
        if not isinstance(src, (str, os.PathLike)):
            continue
        p = Path(src).resolve()
        if p in seen:
            raise ConfigError(f"{src} is listed twice (as {seen[p]} and as {role})")
        seen[p] = role


def check_output(out: str | os.PathLike, sources: Sequence[Any], overwrite: bool = False) -> None:
    """Refuse an output that is, holds or lies inside one of the input paths ``sources`` (or the files they
    name), whatever ``overwrite`` says, and an output path that exists unless ``overwrite``
    (:class:`OutputExistsError`, one line)."""
    out = Path(out)
    o = out.resolve()
    for s in sources:
        if isinstance(s, (str, os.PathLike)):
            p = Path(s).resolve()
            if o == p or p in o.parents or o in p.parents:
                raise OutputExistsError(f"{out}: the output would overwrite the input {s}; choose another path")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise OutputExistsError(f"{out}: exists; pass --overwrite (overwrite=True) to replace it, or choose another "
                                "output")


def ingredients(metadata: Mapping[str, str]) -> list[dict[str, Any]]:
    """The inputs a merged file's metadata records, base first when there is one: ``{"role": "base" or
    "model", "path": ..., "digest": "ALGORITHM:HEX" or None}``. Reads the ``"sha256"`` entries of older
    outputs as ``"sha256:HEX"``."""
    def norm(e: Mapping[str, Any], role: str) -> dict[str, Any]:
        d = e.get("digest")
        if d is None and e.get("sha256"):
            d = f"sha256:{e['sha256']}"
        return {"role": role, "path": e.get("path"), "digest": d}
    out = []
    if f"{META_PREFIX}base" in metadata:
        out.append(norm(json.loads(metadata[f"{META_PREFIX}base"]), "base"))
    out += [norm(e, "model") for e in json.loads(metadata.get(f"{META_PREFIX}ingredients", "[]"))]
    return out


def _plan(method: Method, refs: list[Checkpoint], shared_only: bool) -> tuple[list[str], list[str]]:
    """Names to write (reference order) and names left out; raises on any difference unless shared_only."""
    ref = refs[0]
    left: dict[str, None] = {}
    names = list(ref.infos)
    for ck in refs[1:]:
        for n in names:
            if n not in ck:
                if not shared_only:
                    raise ArchitectureMismatchError(
                        f"{ck.label}: no tensor {n!r}, which {ref.label} has (pass shared_only / --shared-only "
                        "to merge only the tensors all models share)")
                left[n] = None
            elif ck.infos[n].shape != ref.infos[n].shape:
                if not shared_only:
                    raise ArchitectureMismatchError(
                        f"{ck.label}: tensor {n!r} has shape {tuple(ck.infos[n].shape)}, {ref.label} has "
                        f"{tuple(ref.infos[n].shape)}")
                left[n] = None
            elif ck.infos[n].dtype.is_floating_point != ref.infos[n].dtype.is_floating_point:
                raise ArchitectureMismatchError(
                    f"{ck.label}: tensor {n!r} is {ck.infos[n].dtype}, {ref.label} has {ref.infos[n].dtype}")
        for n in ck.infos:
            if n not in ref:
                if not shared_only:
                    raise ArchitectureMismatchError(
                        f"{ck.label}: tensor {n!r} is not in {ref.label} (pass shared_only / --shared-only "
                        "to merge only the tensors all models share)")
                left[n] = None
    return [n for n in names if n not in left], list(left)


def merge_checkpoints(method: str | Method, models: Sequence[Any], *, base: Any = None, out: str | os.PathLike | None = None,
                      options: Mapping[str, Any] | None = None, tensor_rules: Sequence[TensorRule] = (),
                      dtype: str | torch.dtype | None = None, out_dtype: str | torch.dtype | None = None,
                      scope: str | None = None, shared_only: bool = False, shard_size: str | int = DEFAULT_SHARD,
                      chunk_mb: float = DEFAULT_CHUNK_MB, device: str | torch.device = "cpu",
                      digest: str | None = DEFAULT_DIGEST, overwrite: bool = False,
                      copy_files: bool = True, progress: bool = False, names: Sequence[str] | None = None,
                      metadata: Mapping[str, str] | None = None, **kwargs: Any) -> MergeResult:
    """Merge checkpoints tensor by tensor with a registered method.

    Parameters
    ----------
    method : a registered method name (``linear``, ``slerp``, ``task_arithmetic``, ``ties``, ``dare_ties``,
        ``dare_linear``, ``breadcrumbs``, ``breadcrumbs_ties``, ``model_stock``) or a :class:`Method`.
    models : state_dicts, ``.safetensors``/``.pt`` files, sharded indexes or checkpoint directories
        (for a method with a base: the fine-tuned models).
    base : the base model, for methods that take one.
    out : a ``.safetensors`` file, or a directory for the Hugging Face layout (``model.safetensors`` or
        ``model-0000i-of-0000n.safetensors`` shards of at most ``shard_size`` and their index; the reference
        model's other files, e.g. ``config.json`` and the tokenizer, are copied when it is a directory).
        None merges in memory (``result.tensors``). An existing output is refused unless ``overwrite``
        (then replaced atomically at the end); an output that is or holds an input always is.
    options : method options (also accepted as keyword arguments); per-model options take a list.
    tensor_rules : :class:`TensorRule` overrides of options for tensors matching a glob (``scope="tensor"``).
    dtype : compute dtype; by default float32 for half-precision (and float8) inputs, else the inputs' own.
    out_dtype : output dtype; by default the reference model's dtype of each tensor.
    scope : unit of whole-tensor statistics (TIES's top-k, SLERP's angle, ...): ``"tensor"`` or
        ``"model"``; by default the method's (TIES: the whole model, as the paper).
    shared_only : merge only the tensors every model has with the same shape; the rest are left out
        (listed in the result and the output's metadata) instead of being an error.
    chunk_mb : slice size per model in MB of compute dtype; bounds memory (peak ~ a few slices).
    digest : the digest of each input file recorded in the provenance: ``"xxh3_128"`` (fast, catches
        any accidental change), ``"sha256"`` (cryptographic, ~9x the CPU) or None (none recorded); see
        :func:`~wsnets.merge.digest.digest_files`.
    names : labels of ``models`` in errors and provenance (default: their paths).
    """
    method = get_method(method)
    digest = parse_digest(digest)
    options = {**(options or {}), **kwargs}
    scope = scope or method.scope
    if scope not in ("tensor", "model"):
        raise ConfigError(f"scope must be 'tensor' or 'model', got {scope!r}")
    models = list(models)
    K = len(models)
    labels = [_label(m, i, names) for i, m in enumerate(models)]
    if method.base and base is None:
        raise ConfigError(f"{method.name} needs a base model (the one the others were fine-tuned from)")
    if not method.base and base is not None:
        raise ConfigError(f"{method.name} takes no base model; list every model to merge")
    if K < method.min_models or (method.max_models is not None and K > method.max_models):
        want = (f"exactly {method.min_models}" if method.min_models == method.max_models
                else f"at least {method.min_models}")
        raise ConfigError(f"{method.name} needs {want} model{'s' if method.min_models > 1 else ''}"
                          f"{' besides the base' if method.base else ''}, got {K}")
    _check_distinct(([("the base", base)] if base is not None else []) +
                    [(f"model {i + 1}", m) for i, m in enumerate(models)])
    if out is not None:
        check_output(out, [*models, base], overwrite)
    opts = method.resolve(options, K, model_names=labels)
    rules = [(r.pattern, method.resolve({**options, **r.options}, K, where=f"{method.name} [tensors {r.pattern!r}]",
                                        model_names=labels)) for r in tensor_rules]
    if rules and scope == "model":
        raise ConfigError(f"{method.name}: per-tensor options need scope 'tensor' (the model scope takes one "
                          "set of options for all tensors)")
    try:
        budget = int(float(chunk_mb) * (1 << 20))
    except (TypeError, ValueError, OverflowError):       # NaN, infinity, not a number
        raise ConfigError(f"chunk_mb must be a positive finite number of MB, got {chunk_mb!r}") from None
    if budget < 8:
        raise ConfigError(f"chunk_mb must be positive (at least 8 bytes' worth), got {chunk_mb}")
    job = _Job(method, opts, rules, tensor_rules, scope, parse_dtype(dtype), parse_dtype(out_dtype, "out_dtype"),
               budget, torch.device(device), dict(metadata or {}))
    try:
        job.open(models, labels, base)
        if out is not None:       # the files the inputs name (an index's shards) are inputs too
            check_output(out, [f for ck in job.opened for f in ck.files], overwrite=True)
        job.plan(shared_only)
        return job.run(out, parse_size(shard_size), digest, copy_files, progress)
    finally:
        job.close()


class _Job:
    """One streamed merge: the opened inputs, the plan (which tensors are merged, averaged, copied, in which
    dtypes), the provenance, the output, and the groups of slices run through the engine."""

    def __init__(self, method: Method, opts: dict[str, Any], rules: list[tuple[str, dict[str, Any]]],
                 tensor_rules: Sequence[TensorRule], scope: str, cdtype: torch.dtype | None,
                 odtype: torch.dtype | None, budget: int, device: torch.device, metadata: dict[str, str]):
        self.method, self.opts, self.rules, self.tensor_rules, self.scope = method, opts, rules, tensor_rules, scope
        self.cdtype, self.odtype, self.budget, self.device, self.extra_meta = cdtype, odtype, budget, device, metadata
        self.opened: list[Checkpoint] = []
        self.writer: ShardWriter | None = None
        self.digest: str | None = None
        self.tensors: dict[str, torch.Tensor] | None = None
        self._bufs: dict[str, torch.Tensor] = {}
        self.bar = None

    # -- inputs and plan --------------------------------------------------------------------------
    def open(self, models: list[Any], labels: list[str], base: Any) -> None:
        self.sources = ([base] if base is not None else []) + models
        self.labels = labels
        self.base_label = None if base is None else str(base) if isinstance(base, (str, os.PathLike)) else "base"
        for src, lab in zip(self.sources, ([self.base_label] if base is not None else []) + labels):
            ck = open_checkpoint(src, lab)
            if not isinstance(src, (str, os.PathLike)):
                ck.label = lab
            self.opened.append(ck)
        self.base_ck = self.opened[0] if base is not None else None
        self.model_cks = self.opened[1:] if base is not None else self.opened
        self.ref = self.opened[0]

    def plan(self, shared_only: bool) -> None:
        self.names, self.left_out = _plan(self.method, self.opened, shared_only)
        self.kinds = {}
        for n in self.names:
            if not self.ref.infos[n].dtype.is_floating_point:
                self.kinds[n] = "copy"
            elif self.method.base and is_stat(n):
                self.kinds[n] = "stat"
            else:
                self.kinds[n] = "merge"
        self.out_dtypes = {n: self.odtype if self.odtype is not None and self.kinds[n] != "copy"
                           else self.ref.infos[n].dtype for n in self.names}
        self.used = sorted({str(self.compute_dtype(n)).removeprefix("torch.") for n in self.names
                            if self.kinds[n] != "copy"})

    def compute_dtype(self, n: str) -> torch.dtype:
        if self.cdtype is not None:
            return self.cdtype
        def up(t: torch.dtype) -> torch.dtype:  # before promoting: torch does not promote float8 with others
            return torch.float32 if t in _HALF else t
        d = up(self.ref.infos[n].dtype)
        for ck in self.opened[1:]:
            d = torch.promote_types(d, up(ck.infos[n].dtype))
        return d

    # -- provenance ---------------------------------------------------------------------------------
    def start_digests(self, algorithm: str) -> None:
        """Digest each input file from the bytes the merge reads (inputs given as paths)."""
        self.digest = algorithm
        for ck, src in zip(self.opened, self.sources):
            if isinstance(src, (str, os.PathLike)) and ck.files:
                ck.start_digest(algorithm)

    def metadata(self, final: bool) -> dict[str, str]:
        """The output's metadata; before the end the digests are placeholders of the same length."""
        from .. import __version__
        from ..io import ARCH_KEY, BATCH_KEY
        algorithm = self.digest

        def digest(i: int) -> str | None:
            ck = self.opened[i]
            return None if ck.digesting is None else ck.finish_digest() if final else placeholder(algorithm)
        off = 1 if self.base_ck is not None else 0
        ing = [{"path": lab, "digest": digest(i + off)} for i, lab in enumerate(self.labels)]
        m = {"format": "pt", f"{META_PREFIX}method": self.method.name, f"{META_PREFIX}ingredients": json.dumps(ing),
             f"{META_PREFIX}parameters": json.dumps(_plain(self.opts), default=str),
             f"{META_PREFIX}version": __version__, f"{META_PREFIX}dtype": ",".join(self.used) or "none",
             f"{META_PREFIX}scope": self.scope, f"{META_PREFIX}digest": algorithm or "none"}
        if self.base_ck is not None:
            m[f"{META_PREFIX}base"] = json.dumps({"path": self.base_label, "digest": digest(0)})
        if self.rules:
            m[f"{META_PREFIX}tensor_options"] = json.dumps(
                [{"match": r.pattern, **_plain(dict(r.options))} for r in self.tensor_rules], default=str)
        if self.left_out:
            m[f"{META_PREFIX}left_out"] = json.dumps(self.left_out)
        if self.odtype is not None:
            m[f"{META_PREFIX}out_dtype"] = str(self.odtype).removeprefix("torch.")
        archs = {ck.metadata.get(ARCH_KEY) for ck in self.opened}
        if len(archs) == 1 and None not in archs and not self.left_out:
            m[ARCH_KEY], m[BATCH_KEY] = archs.pop(), "none"
        m.update({str(k): str(v) for k, v in self.extra_meta.items()})
        return m

    # -- reading slices -----------------------------------------------------------------------------
    def _scratch(self, key: str, numel: int, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
        """A buffer reused from slice to slice (the bytes read, the models' values, the result, the result
        in the output dtype): allocated afresh for every slice, blocks of megabytes come from ``mmap``
        (always above 32 MB; above 1 MB under the CLI's :func:`wsnets.memory.tame_allocator`) as pages the
        kernel must zero and map, which cost a linear merge as much system time as its arithmetic. The
        engine drops each slice before the next is read."""
        buf = self._bufs.get(key)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            self._bufs.pop(key, None)
            buf = self._bufs[key] = torch.empty(numel, dtype=dtype, device=device or self.device)
        return buf[:numel]

    def _read(self, n: str, s: int, e: int, cd: torch.dtype, with_base: bool, go: int, row_len: int) -> Chunk:
        K, m = len(self.model_cks), e - s
        flat = self._scratch("values", (K + with_base) * m, cd)
        raw = self._scratch("bytes", m * max(ck.infos[n].dtype.itemsize for ck in self.opened), torch.uint8,
                            torch.device("cpu"))
        mods = flat[:K * m].view(K, m)
        for k, ck in enumerate(self.model_cks):
            mods[k].copy_(ck.read(n, s, e, out=raw))
        b = None
        if with_base:
            b = flat[K * m:].copy_(self.base_ck.read(n, s, e, out=raw))
        return Chunk(mods, b, n, s, go + s, row_len, out=self._scratch("result", m, cd))

    def _slices(self, group: list[str], with_base: bool) -> Iterator[Chunk]:
        go = 0
        for n in group:
            info = self.ref.infos[n]
            cd = self.compute_dtype(n)
            row_len = info.numel // info.shape[0] if len(info.shape) >= 2 and info.shape[0] else max(info.numel, 1)
            for s, e in iter_slices(info.numel, row_len, max(1, self.budget // cd.itemsize)):
                yield self._read(n, s, e, cd, with_base, go, row_len)    # no local keeps the slice alive
            go += info.numel

    def _group(self, m: Method, o: dict[str, Any], group: list[str], name: str, with_base: bool) -> int:
        """Run ``m`` over a group of tensors (one, or the whole model); returns the number of passes."""
        info = self.ref.infos[group[0]]
        one = len(group) == 1 and info.numel <= max(1, self.budget // self.compute_dtype(group[0]).itemsize)
        rows = (info.shape[0] if len(info.shape) >= 2 else 1) if len(group) == 1 else None
        return run_group(m, o, lambda: self._slices(group, with_base), numel=sum(self.ref.infos[n].numel for n in group),
                         name=name, rows=rows, sink=self._sink, whole=one)   # one slice: requests resolve in one pass

    def _sink(self, chunk: Chunk, values: torch.Tensor) -> None:
        if values.is_floating_point() and not bool(torch.isfinite(values.sum())) and not bool(values.isfinite().all()):
            self._not_finite(chunk)
        od = self.out_dtypes[chunk.tensor]
        v = values if values.dtype == od else self._scratch("out", values.numel(), od, values.device).copy_(values)
        if self.tensors is not None:
            self.tensors[chunk.tensor].view(-1)[chunk.offset:chunk.offset + v.numel()] = v.cpu()
        else:
            self.writer.write(chunk.tensor, chunk.offset, v)
        if self.bar is not None:
            self.bar.update(v.numel() * v.element_size())

    # -- the merge ------------------------------------------------------------------------------------
    def run(self, out: str | os.PathLike | None, shard_bytes: int, digest: str | None, copy_files: bool,
            progress: bool) -> MergeResult:
        ref, names, kinds = self.ref, self.names, self.kinds
        if out is None:
            self.tensors = {n: torch.empty(ref.infos[n].shape, dtype=self.out_dtypes[n]) for n in names}
        else:
            if digest is not None:
                self.start_digests(digest)
            self.writer = ShardWriter(out, [(n, ref.infos[n].shape, self.out_dtypes[n]) for n in names],
                                      metadata=self.metadata(False), shard_bytes=shard_bytes)
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=sum(ref.infos[n].nbytes for n in names), unit="B", unit_scale=True,
                            desc=f"merge {self.method.name}", leave=False, disable=None)   # on a terminal only
        merged = [n for n in names if kinds[n] == "merge"]
        passes = 1
        if self.scope == "model" and merged:
            passes = self._group(self.method, self.opts, merged, "*", self.method.base)
        mean = get_method("linear")
        for n in names:
            if kinds[n] == "merge" and self.scope == "tensor":
                o = next((ro for pat, ro in self.rules if fnmatch.fnmatchcase(n, pat)), self.opts)
                passes = max(passes, self._group(self.method, o, [n], n, self.method.base))
            elif kinds[n] == "stat":
                self._group(mean, {"weight": (1.0,) * len(self.model_cks), "normalize": True}, [n], n, False)
            elif kinds[n] == "copy":
                info = ref.infos[n]
                for s, e in iter_slices(info.numel, max(info.numel, 1), max(1, self.budget // info.dtype.itemsize)):
                    self._sink(Chunk(torch.empty(0), None, n, s, s, 1), ref.read(n, s, e))
        result = MergeResult(self.method.name, _plain(self.opts), self.labels, self.base_label,
                             None if out is None else Path(out), tensors=self.tensors, merged=merged,
                             copied=[n for n in names if kinds[n] == "copy"],
                             stats=[n for n in names if kinds[n] == "stat"], left_out=self.left_out,
                             compute_dtype=",".join(self.used), scope=self.scope, passes=passes)
        if self.writer is not None:
            extra = []
            if copy_files and not self.writer.single and ref.root is not None:
                for p in sorted(ref.root.rglob("*")):
                    rel = p.relative_to(ref.root)
                    if (p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and not p.name.endswith(".index.json")
                            and not any(part.startswith(".") for part in rel.parts)):
                        extra.append((p, str(rel)))
            result.metadata = self.metadata(True)
            result.files = self.writer.finish(result.metadata, extra_files=extra)
            result.extra_files = [r for _, r in extra]
            self.writer = None
        return result

    def _not_finite(self, chunk: Chunk) -> None:
        """A slice of the output holds NaN or Inf: name the input it came from (every method masks by
        multiplying, so an input's NaN or Inf reaches the output), else the overflow."""
        n, s = chunk.tensor, chunk.offset
        e = s + chunk.models.shape[1]
        for ck in self.opened:
            if not bool(ck.read(n, s, e).float().isfinite().all()):
                raise NonFiniteWeightsError(f"{ck.label}: tensor {n!r} has NaN or Inf values")
        raise NonFiniteWeightsError(f"merging tensor {n!r} overflowed the compute dtype "
                                    f"{str(self.compute_dtype(n)).removeprefix('torch.')} (choose --dtype float32)")

    def close(self) -> None:
        """Delete an unfinished output, close the inputs."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.abort()
        for ck in self.opened:
            ck.close()


def _plain(opts: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()}


def merge_spaces(method: str | Method, models: Any, *, base: Any = None, names: Sequence[str] | None = None,
                 scope: str | None = None, **options: Any) -> Any:
    """A registered method on WeightSpaces of one architecture (checked as :func:`~wsnets.merge.gather`
    does): the models (and base) stacked, merged in memory, returned as one WeightSpace."""
    from ..weights import WeightSpace
    from .compat import gather
    if base is not None:
        both = gather([base, *(list(models) if isinstance(models, WeightSpace) else models)],
                      None if names is None else ["base", *names])
        b, batch = both[0], both[1:]
    else:
        b, batch = None, gather(models, names)
    sds = [{k: v[i] for k, v in batch.params.items()} for i in range(batch.batch_size)]
    res = merge_checkpoints(method, sds, base=None if b is None else dict(b.params), scope=scope, options=options,
                            names=names, device=batch.device)
    return WeightSpace(batch.arch, res.tensors, check=False).to(batch.device)
