"""``analyze``: WeightWatcher-style per-layer table for any checkpoint.

Every floating tensor with 2 dimensions (Linear, Embedding, attention projections, GPT-2 ``Conv1D``),
3 (Conv1d) or 4 (Conv2d) is analyzed under its state-dict key; 1-D tensors (biases, norms) and
integer buffers are skipped and listed in ``attrs["skipped"]``. A tensor with NaN/Inf, or with fewer
than ``min_evals`` (more than ``max_evals``) eigenvalues, gets a row whose ``status`` says so and
whose metrics are NaN; the other layers are unaffected.

Safetensors files are streamed: only the header is read up front, then tensors of one shape are
loaded in chunks of at most ``memory_mb`` and go through one batched eigenvalue call, so a
multi-GB checkpoint never needs to fit in memory at once. ``.pt``/``.pth`` files load with
``torch.load(weights_only=True)`` (a pickle cannot be streamed).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..errors import CheckpointError
from ..weights import MAX_WEIGHT
from .eigen import check_device, layer_spectrum, layout
from .metrics import fit_columns, fit_mp, jensen_shannon_distance, norm_metrics, randomized_eigenvalues
from .powerlaw import fit_powerlaw

DEFAULT_MIN_EVALS = 8
DEFAULT_MAX_EVALS = 15000
DEFAULT_MAX_N = 50000
SUMMARY_METRICS = ("log_norm", "alpha", "alpha_weighted", "log_alpha_norm", "log_spectral_norm", "stable_rank",
                   "mp_softrank")
FIT_METRICS = ("alpha", "alpha_weighted", "log_alpha_norm")
LAYER_TYPES = {"dense": "DENSE", "conv1d": "CONV1D", "conv2d": "CONV2D"}


@dataclass
class _Entry:
    name: str
    shape: tuple[int, ...]  # of one tensor (no batch dim)
    load: Callable[[], torch.Tensor]  # -> [B, *shape]


@dataclass
class ESDResult:
    """Rows (one dict per layer and model), eigenvalues by row index, and skipped tensors."""

    rows: list[dict[str, Any]]
    evals: dict[int, torch.Tensor] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


# -- sources --------------------------------------------------------------------------------------
def _entries(model: Any) -> tuple[list[_Entry], list[str], int | None]:
    """Analyzable tensors of ``model``, skipped keys (with reason) and the batch size (None = single)."""
    from ..weights import WeightSpace
    if isinstance(model, (str, os.PathLike)):
        return _file_entries(Path(model))
    batch = None
    if isinstance(model, WeightSpace):
        tensors, batch = dict(model.params), model.batch_size
    elif isinstance(model, nn.Module):
        tensors = {k: p.detach() for k, p in model.named_parameters()}
    elif isinstance(model, Mapping):
        tensors = dict(model)
    else:
        from ..errors import InputTypeError
        raise InputTypeError(f"cannot analyze a {type(model).__name__}: give an nn.Module, state_dict, WeightSpace or path")
    lead = 0 if batch is None else 1
    entries, skipped = [], []
    for k, t in tensors.items():
        if not isinstance(k, str):
            from ..errors import TensorFormatError
            raise TensorFormatError(f"entry {k!r} is named by a {type(k).__name__}; state_dict names must be strings")
        if not isinstance(t, torch.Tensor):
            skipped.append(f"{k}: a {type(t).__name__}, not a tensor")
            continue
        if t.layout != torch.strided:
            skipped.append(f"{k}: {str(t.layout).replace('torch.', '')} tensor (not dense)")
            continue
        if t.is_meta:
            skipped.append(f"{k}: a tensor on the meta device (no values)")
            continue
        why = _skip_reason(k, tuple(t.shape[lead:]), t.dtype)
        if why:
            skipped.append(why)
            continue
        entries.append(_Entry(k, tuple(t.shape[lead:]), (lambda t=t: t) if lead else (lambda t=t: t.unsqueeze(0))))
    return entries, skipped, batch


def _skip_reason(key: str, shape: tuple[int, ...], dtype: Any) -> str:
    if dtype is not None and not _is_float(dtype):
        if str(dtype).upper().startswith(("F8", "TORCH.FLOAT8")):
            return f"{key}: {dtype} tensor (float8 needs its scale tensors: dequantize first)"
        return f"{key}: {dtype} tensor (not floating point)"
    if len(shape) not in (2, 3, 4):
        return f"{key}: {len(shape)}-D tensor {tuple(shape)} (bias, norm or scalar)"
    return ""


def _is_float(dtype: Any) -> bool:
    """A dtype wsnets computes with (``wsnets.io.WEIGHT_DTYPES``; safetensors strings F16, BF16, F32, F64)."""
    from ..io import WEIGHT_DTYPES
    if isinstance(dtype, torch.dtype):
        return dtype in WEIGHT_DTYPES
    return str(dtype).upper() in ("F16", "BF16", "F32", "F64")


def _file_entries(path: Path) -> tuple[list[_Entry], list[str], None]:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                header = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
        except Exception as e:  # SafetensorError / OSError on garbage and truncation
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({str(e).splitlines()[0][:200]})") from None
        entries, skipped = [], []
        for k, (shape, dtype) in header.items():
            why = _skip_reason(k, shape, dtype)
            if why:
                skipped.append(why)
            else:
                entries.append(_Entry(k, shape, lambda k=k: _read_tensor(path, k).unsqueeze(0)))
        return entries, skipped, None
    if suffix in (".pt", ".pth", ".bin", ".ckpt"):
        from ..io import read_torch
        e, s, _ = _entries(read_torch(path))
        return e, s, None
    raise CheckpointError(f"{path}: unknown checkpoint format {suffix!r} (use .safetensors, .pt or .pth)")


def _read_tensor(path: Path, key: str) -> torch.Tensor:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key)


# -- the analysis ---------------------------------------------------------------------------------
def run(model: Any, *, min_evals: int = DEFAULT_MIN_EVALS, max_evals: int = DEFAULT_MAX_EVALS,
        max_N: int = DEFAULT_MAX_N, conv2d_norm: bool = True, mp_fit: bool = False, randomize: bool = False,
        method: str = "gram", device: str | torch.device = "cpu", layers: Iterable[str] | None = None,
        progress: bool = False, memory_mb: float = 256.0, seed: int = 0, pool: bool = True) -> ESDResult:
    """The engine behind :func:`analyze`; also returns the eigenvalues (for plots)."""
    device = check_device(device)
    entries, skipped, batch = _entries(model)
    if layers is not None:
        wanted = set(layers)
        entries = [e for e in entries if e.name in wanted or e.name.removesuffix(".weight") in wanted]
    B = 1 if batch is None else batch
    gen = torch.Generator().manual_seed(seed)
    rows: list[dict[str, Any]] = []
    blocks: list[tuple[list[int], torch.Tensor]] = []  # (row ids, [len(ids), n] eigenvalues)
    todo: dict[tuple, list[int]] = {}  # shape -> row indices waiting for eigenvalues
    heads = []
    for layer_id, e in enumerate(entries):
        lay = layout(e.shape, conv2d_norm=conv2d_norm, name=e.name)
        k = lay.rf if not pool else 1  # rows per tensor: one per slice without pooling
        n_ev = lay.num_evals // k
        base = {"layer_id": layer_id, "name": e.name, "layer_type": LAYER_TYPES[lay.kind], "N": lay.N, "M": lay.M,
                "rf": lay.rf, "Q": lay.N / lay.M if lay.M else float("nan"), "num_evals": n_ev}
        reason = ""
        if n_ev < min_evals:
            reason = f"skipped: {n_ev} eigenvalue(s) < min_evals={min_evals}"
        elif max_evals and n_ev > max_evals:
            reason = f"skipped: {n_ev} eigenvalues > max_evals={max_evals}"
        elif max_N and lay.N > max_N:
            reason = f"skipped: N={lay.N} > max_N={max_N}"
        heads.append((e, base, reason, k))
    for b in range(B):  # rows model-major: all layers of model 0, then model 1, ...
        for e, base, reason, k in heads:
            for sl in range(k):
                rows.append(({"model": b} if batch is not None else {}) | base |
                            ({"slice_id": sl} if not pool else {}) | {"status": reason})
                if not reason:
                    todo.setdefault(e.shape, []).append(len(rows) - 1)
    # eigenvalues: all tensors of one shape in memory-bounded batched calls
    by_name = {e.name: e for e in entries}
    bar = _progress(len(entries) * B, progress)
    randoms: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for shape, idx in todo.items():
        per = max(1, int(memory_mb * 2**20 // (8 * max(1, math.prod(shape)))))
        names = list(dict.fromkeys(rows[i]["name"] for i in idx))
        for c in range(0, len(names), max(1, per // B)):
            chunk = names[c:c + max(1, per // B)]
            w = torch.cat([by_name[n].load() for n in chunk])  # [len(chunk) * B, *shape]
            ids = [i for n in chunk for i in idx if rows[i]["name"] == n]
            flat = w.flatten(1)
            top = flat.abs().amax(1)  # NaN/Inf show here, and magnitudes whose squares overflow
            finite = torch.isfinite(top) & (top <= MAX_WEIGHT)
            good = ids
            if not bool(finite.all()):
                k = len(ids) // len(flat)  # rows per tensor
                per_row = lambda t: t.repeat_interleave(k).tolist()  # noqa: E731
                counts = zip(ids, per_row(finite), per_row(flat.isnan().sum(1)), per_row(flat.isinf().sum(1)),
                             per_row(top))
                for i, ok, nan, inf, big in counts:
                    if not ok:
                        rows[i]["status"] = (f"failed: {nan} NaN and {inf} Inf of {flat.shape[1]} weights" if nan or inf
                                             else f"failed: weights up to {big:.3g} in magnitude (> {MAX_WEIGHT:g})")
                good = [i for i, ok in zip(ids, per_row(finite)) if ok]
                w = w[finite]
            if good:
                spec = layer_spectrum(w, len(shape), conv2d_norm=conv2d_norm, method=method, device=device,
                                      pool=pool)
                blocks.append((good, spec.evals))  # stays on the device: fits run there too
                for i, sv_max, sv_min, loss in zip(good, spec.sv_max.tolist(), spec.sv_min.tolist(),
                                                   spec.rank_loss.tolist()):
                    rows[i].update(sv_max=sv_max, sv_min=sv_min, rank_loss=loss)
                if randomize:
                    _randomize(w, shape, spec, good, randoms, method, gen, device, pool)
            bar.update(len(ids))
    bar.close()
    _fit_and_measure(rows, blocks, method)
    evals = {i: ev[j] for ids, ev in ((ids, ev.cpu()) for ids, ev in blocks) for j, i in enumerate(ids)}
    if mp_fit:
        _mp_columns(rows, evals, "")
    if randomize:
        _random_columns(rows, evals, randoms)
    return ESDResult(rows, evals, skipped)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="esd layers", unit="layer", disable=not enabled, leave=False)


def _randomize(w, shape, spec, good, randoms, method, gen, device, pool) -> None:
    lay = spec.layout
    replicas = 5 if lay.num_evals < 100 else 1  # WeightWatcher's hack for small layers
    scale = lay.scale if pool else (lay.rf / 2 if lay.scale != 1.0 else 1.0)
    w = w.to(device)
    kw = dict(scale=scale, method=method, generator=gen, pool=pool)
    many = randomized_eigenvalues(w, len(shape), replicas=replicas, **kw)
    one = randomized_eigenvalues(w, len(shape), replicas=1, **kw)
    for j, i in enumerate(good):
        randoms[i] = (many[j].cpu(), one[j].cpu())


def _fit_and_measure(rows: list[dict[str, Any]], blocks: list[tuple[list[int], torch.Tensor]], method: str) -> None:
    """Power-law fit and norm metrics for all layers, one batched call per (length, N, M) group."""
    groups: dict[tuple[int, int, int], list[tuple[list[int], torch.Tensor]]] = {}
    for ids, ev in blocks:
        groups.setdefault((ev.shape[1], rows[ids[0]]["N"], rows[ids[0]]["M"]), []).append((ids, ev))
    for (_, N, M), parts in groups.items():
        ids = [i for p in parts for i in p[0]]
        ev = torch.cat([p[1] for p in parts])
        fit = fit_powerlaw(ev)
        cols = fit_columns(fit)
        cols.update(norm_metrics(ev, fit.alpha, N, M, method=method))
        lists = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in cols.items()}
        for j, i in enumerate(ids):
            rows[i].update({k: v[j] for k, v in lists.items()})


def _mp_columns(rows, evals, prefix: str) -> None:
    for i, ev in evals.items():
        try:
            r = fit_mp(ev.numpy(), rows[i]["N"], rows[i]["M"])
        except (ValueError, FloatingPointError, ZeroDivisionError) as e:  # degenerate ESD
            r = {k: float("nan") for k in ("num_spikes", "sigma_mp", "mp_softrank", "W_scale", "bulk_max", "bulk_min")}
            rows[i]["note"] = f"mp_fit failed: {e}"
        rows[i].update({prefix + k: v for k, v in r.items()})


def _random_columns(rows, evals, randoms) -> None:
    for i, (many, one) in randoms.items():
        ev = evals[i]
        rows[i]["max_rand_eval"] = float(many[-1])
        rows[i]["rand_distance"] = float(jensen_shannon_distance(ev[None], one[None])[0])
        rows[i]["ww_softrank"] = float(one[-1] / ev[-1])
        rows[i]["ww_maxdist"] = float(ev[-1] - one[-1])
        r = fit_mp(many.numpy(), rows[i]["N"], rows[i]["M"])
        rows[i].update({"rand_" + k: v for k, v in r.items()})
        rows[i]["num_traps"] = r["num_spikes"]


# -- public API -----------------------------------------------------------------------------------
def analyze(model: Any, **kwargs: Any):
    """Per-layer ESD metrics of a model, with WeightWatcher's column names.

    Parameters
    ----------
    model : nn.Module, state_dict, :class:`~wsnets.WeightSpace` (a batched one gives a ``model``
        column), or a path to ``.safetensors`` (streamed) / ``.pt`` / ``.pth``.
    min_evals, max_evals, max_N : WeightWatcher's layer filters (8, 15000, 50000); filtered layers
        keep a row with a ``skipped: ...`` status.
    conv2d_norm : halve Conv2d eigenvalues as WeightWatcher does (default True).
    mp_fit : add Marchenko–Pastur columns (num_spikes, sigma_mp, mp_softrank, bulk_max, ...).
    randomize : add rand_distance, ww_softrank, num_traps, rand_* columns (seeded by ``seed``).
    method : ``"gram"`` (default, eigvalsh of XᵀX) or ``"svd"``.
    device : where eigenvalues and fits are computed (``"cuda"`` works), in float64.
    layers : only these keys (with or without ``.weight``).
    progress : show a progress bar over layers. memory_mb : streaming chunk size for files.
    pool : False analyzes every conv slice (kernel position) as its own row with a ``slice_id``
        column (WeightWatcher's ``pool=False``).

    Returns
    -------
    pandas DataFrame (one row per layer; ``attrs["skipped"]`` lists skipped tensors).

    Examples
    --------
    >>> import torch.nn as nn
    >>> df = analyze(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)))
    >>> list(df["name"]), bool((df["status"] == "success").all())
    (['0.weight', '2.weight'], True)
    """
    res = run(model, **kwargs)
    return to_table(res)


def to_table(res: ESDResult):
    """Rows as a pandas DataFrame (``attrs["skipped"]`` set)."""
    import pandas as pd
    df = pd.DataFrame.from_records(res.rows)
    df.attrs["skipped"] = list(res.skipped)
    return df


def summary(details) -> dict[str, float]:
    """Model-level means of WeightWatcher's summary metrics over layers where they are defined.

    Fit-based metrics (alpha, alpha_weighted, log_alpha_norm) average only layers whose fit
    succeeded; failed fits are NaN and never enter the mean as -1 (as WeightWatcher's would).
    Also reports ``num_layers``, ``num_fitted`` and ``num_skipped`` (skipped or failed rows).
    """
    rows = details.to_dict("records") if hasattr(details, "to_dict") else list(details)
    out: dict[str, float] = {}
    for m in SUMMARY_METRICS:
        vals = [r[m] for r in rows if m in r and r[m] is not None and _finite(r[m])
                and (m not in FIT_METRICS or r.get("status") == "success")]
        if any(m in r for r in rows):
            out[m] = sum(vals) / len(vals) if vals else float("nan")
    out["num_layers"] = len(rows)
    out["num_fitted"] = sum(r.get("status") == "success" for r in rows)
    out["num_skipped"] = len(rows) - out["num_fitted"]
    return out


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False
