"""TOML merge configs: the models, their weights and per-tensor options in one file.

.. code-block:: toml

    method = "ties"                 # any registered method (wsnets merge --help lists them)
    base = "base/"                  # for methods with a base; paths are relative to this file
    out = "merged/"                 # a directory (sharded Hugging Face layout) or a .safetensors file
    dtype = "float32"               # compute dtype (default: float32 for half-precision inputs)
    out_dtype = "bfloat16"          # default: the reference model's dtype of each tensor
    scope = "tensor"                # unit of whole-tensor statistics: "tensor" or "model"
    shared_only = false             # true: merge the tensors all models share, list the rest
    shard_size = "5GB"
    digest = "xxh3_128"             # of each input, in the provenance: xxh3_128 (default), sha256 or none

    [parameters]                    # method options for every tensor and model
    density = 0.5

    [[models]]
    path = "ft1/"
    weight = 0.7                    # per-model options go with their model
    [[models]]
    path = "ft2/"
    weight = 0.3

    [[tensors]]                     # per-tensor overrides; the first rule whose glob matches wins
    match = "*.attention.*"
    density = 0.8
    weight = [0.5, 0.5]             # a per-model option here takes one value per model

Every key is checked: an unknown key, option or method is a one-line error naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .registry import Method, Option, get_method
from .digest import parse_digest
from .stream import MergeResult, TensorRule, merge_checkpoints

_TOP = {"method", "base", "models", "out", "dtype", "out_dtype", "scope", "shared_only", "shard_size", "chunk_mb",
        "digest", "parameters", "tensors"}


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Keyword arguments of :func:`~wsnets.merge.merge_checkpoints` read from a TOML merge config."""
    from ..io import read_toml
    path = Path(path)
    cfg = read_toml(path, "merge config")
    where = str(path)
    unknown = sorted(set(cfg) - _TOP)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (keys: {', '.join(sorted(_TOP))})")
    if "method" not in cfg:
        raise ConfigError(f"{where}: no 'method' (e.g. method = \"ties\")")
    method = get_method(str(cfg["method"]))
    root = path.parent

    def resolve(p: Any, what: str) -> str:
        if not isinstance(p, str):
            raise ConfigError(f"{where}: {what} must be a path string, got {p!r}")
        return str(root / p) if not os.path.isabs(p) else p

    raw_models = cfg.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        raise ConfigError(f"{where}: 'models' must be a list of [[models]] tables (path = ...) or paths")
    params = cfg.get("parameters", {})
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: [parameters] must be a table")
    for k in params:
        _option(where, method, k)
    paths, per_model = [], {}
    for i, m in enumerate(raw_models):
        if isinstance(m, str):
            m = {"path": m}
        if not isinstance(m, dict) or "path" not in m:
            raise ConfigError(f"{where}: models[{i}] needs a path")
        paths.append(resolve(m["path"], f"models[{i}].path"))
        for k, v in m.items():
            if k == "path":
                continue
            if not _option(where, method, k).per_model:
                raise ConfigError(f"{where}: models[{i}]: {k!r} is not a per-model option of {method.name} "
                                  "(put it under [parameters])")
            per_model.setdefault(k, {})[i] = v
    options = dict(params)
    for k, vals in per_model.items():
        fallback = params.get(k, method.option(k).default)
        options[k] = [vals.get(i, fallback) for i in range(len(paths))]
    rules = []
    for i, r in enumerate(cfg.get("tensors", [])):
        if not isinstance(r, dict) or not isinstance(r.get("match"), str):
            raise ConfigError(f"{where}: tensors[{i}] needs match = \"glob\"")
        opts = {k: v for k, v in r.items() if k != "match"}
        for k in opts:
            _option(where, method, k)
        rules.append(TensorRule(r["match"], opts))
    out = {"method": method, "models": paths, "options": options, "tensor_rules": rules}
    if "base" in cfg:
        out["base"] = resolve(cfg["base"], "base")
    if "out" in cfg:
        out["out"] = resolve(cfg["out"], "out")
    for k in ("dtype", "out_dtype", "scope", "shard_size", "chunk_mb", "digest"):
        if k in cfg:
            out[k] = cfg[k]
    if "digest" in cfg:
        try:
            parse_digest(cfg["digest"])
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    if "shared_only" in cfg:
        if not isinstance(cfg["shared_only"], bool):
            raise ConfigError(f"{where}: shared_only must be true or false")
        out["shared_only"] = cfg["shared_only"]
    return out


def _option(where: str, method: Method, k: str) -> Option:
    try:
        return method.option(k)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def merge_config(path: str | os.PathLike, out: str | os.PathLike | None = None, **overrides: Any) -> MergeResult:
    """Run the merge a TOML config describes (``out`` and keyword arguments override the file)."""
    kw = load_config(path)
    if out is not None:
        kw["out"] = out
    if "out" not in kw:
        raise ConfigError(f"{path}: no 'out' in the config and none given")
    kw.update(overrides)
    return merge_checkpoints(**kw)
