"""What a meta-model was trained on, and whether a network lies in that range.

A meta-model answers for any network it can read, including networks unlike every one it was trained
on (a CNN given to a meta-model of MLPs, a network trained from scratch given to a classifier of
fine-tunes). :class:`TrainingRange` records, when a meta-model is trained,

* the training networks' **architectures**: families (``mlp``, ``cnn2d``, ``resnet``, ...), depths
  (hidden layers), widths (widest hidden layer), input and output sizes, activations, convolution
  geometries (kernel, stride, padding, dilation: a CNN of the training shapes with another padding computes
  another function), the datasets;
* the **distribution of the features the heads read** (the encoder's embedding of each training network,
  or a GBM's input features): a reference set of up to :data:`MAX_REFERENCE` training networks,
  standardized per dimension. A network's distance is its mean Euclidean distance to its ``k`` nearest
  reference networks, divided by ``sqrt(dim)``. The threshold is calibrated on the training split: the
  ``quantile`` (0.99) of the training networks' own distances, each left out of its reference set;
* for a zoo of **fine-tunes** of shared bases (``bases.safetensors``): the bases, and the 0.99
  quantile of the training networks' relative distance to their nearest base ``||w - b|| / ||b||``.

:meth:`TrainingRange.check` marks each network in or out of range and says why (each architecture
property outside the training range, the distance above its threshold, a network that is not a
fine-tune of the bases). A run saved before wsnets recorded ranges has none: its networks are
``unknown``, not refused.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..arch import Architecture

MAX_REFERENCE = 4096  # training networks kept as the reference set (a seeded subsample of larger splits)
FILE = "reference.safetensors"


def profile(arch: Architecture) -> dict[str, Any]:
    """The architecture properties a range is made of."""
    sizes = arch.group_sizes
    return {"family": arch.describe().split(":", 1)[0], "depth": max(len(arch.weight_layers) - 1, 0),
            "width": max(sizes[1:-1], default=0), "in": int(sizes[0]), "out": int(sizes[-1]),
            "activation": arch.activation, "convs": conv_geometries(arch)}


def conv_geometries(arch: Architecture) -> list[str]:
    """Each convolution's kernel, stride, padding (and dilation where not 1), e.g. ``k3x3/s2x2/p0x0``."""
    out = set()
    for l in arch.layers:
        if l.kind in ("conv1d", "conv2d"):
            d = len(l.kernel_size)
            j = lambda t, fill: "x".join(map(str, t or (fill,) * d))  # noqa: E731
            dil = "" if all(x == 1 for x in (l.dilation or (1,))) else f"/d{j(l.dilation, 1)}"
            out.add(f"k{j(l.kernel_size, 1)}/s{j(l.stride, 1)}/p{j(l.padding, 0)}{dil}")
    return sorted(out)


@dataclass
class TrainingRange:
    """See the module docstring. ``reference`` ``[N, d]`` is standardized with ``center``/``scale``."""

    families: list[str]
    depths: list[int]                       # [min, max]
    widths: list[int]                       # [min, max]
    inputs: list[int]
    outputs: list[int]
    activations: list[str]
    architectures: dict[str, int]           # the most common, with counts
    datasets: dict[str, int]
    networks: int
    space: str = ""
    k: int = 5
    quantile: float = 0.99
    threshold: float | None = None
    reference: torch.Tensor | None = None
    center: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    bases: torch.Tensor | None = None       # [n_bases, P] flattened, in base_arch.param_shapes order
    base_arch: str | None = None
    base_threshold: float | None = None
    convs: list[str] = field(default_factory=list)  # empty: no convolutions, or a run saved before they were kept
    extra: dict[str, Any] = field(default_factory=dict)

    # -- fitting -----------------------------------------------------------------------------------
    @classmethod
    def fit(cls, archs: Sequence[Architecture], features: torch.Tensor | None = None, *, space: str = "",
            datasets: Sequence[str] = (), bases: dict[str, torch.Tensor] | None = None,
            base_arch: Architecture | None = None, params: Sequence[dict[str, torch.Tensor]] | None = None,
            k: int = 5, quantile: float = 0.99, seed: int = 0) -> "TrainingRange":
        """The range of training networks of architectures ``archs`` (one per network) whose head inputs are
        ``features`` ``[N, d]``; ``bases`` (+ ``base_arch`` and each network's ``params``) for fine-tunes."""
        profs = [profile(a) for a in dict.fromkeys(archs)]
        count = Counter(a.describe() for a in archs)
        r = cls(families=sorted({p["family"] for p in profs}),
                depths=[min(p["depth"] for p in profs), max(p["depth"] for p in profs)],
                widths=[min(p["width"] for p in profs), max(p["width"] for p in profs)],
                inputs=sorted({p["in"] for p in profs}), outputs=sorted({p["out"] for p in profs}),
                activations=sorted({p["activation"] for p in profs}), architectures=dict(count.most_common(12)),
                datasets=dict(Counter(datasets).most_common()), networks=len(archs), space=space, k=k,
                quantile=quantile, convs=sorted({g for p in profs for g in p["convs"]}))
        if features is not None and len(features) > 1:
            x = features.detach().double().cpu().reshape(len(features), -1)
            if len(x) > MAX_REFERENCE:
                g = torch.Generator().manual_seed(seed)
                x = x[torch.randperm(len(x), generator=g)[:MAX_REFERENCE]]
            r.center = x.mean(0)
            std = x.std(0, unbiased=False)
            r.scale = std.clamp_min(1e-3 * float(std.mean()) + 1e-12)
            r.reference = ((x - r.center) / r.scale).float()
            r.k = max(1, min(k, len(x) - 1))
            d = _knn(r.reference, r.reference, r.k, leave_out=True)
            r.threshold = float(torch.quantile(d.double(), quantile))
        if bases is not None and base_arch is not None and params is not None:
            r.base_arch = base_arch.to_json()
            keys = list(base_arch.param_shapes)
            r.bases = torch.stack([torch.cat([bases[k][b].reshape(-1).double() for k in keys])
                                   for b in range(len(bases[keys[0]]))]).float()
            rel = [_base_distance(r.bases, p, keys) for p, a in zip(params, archs) if a == base_arch]
            if rel:
                r.base_threshold = float(torch.quantile(torch.tensor(rel, dtype=torch.float64), quantile))
        return r

    # -- checking ----------------------------------------------------------------------------------
    def check(self, nets: Sequence[Any], features: torch.Tensor | None = None) -> list[dict[str, Any]]:
        """One ``{"in_range": bool, "reasons": [...], "distance": d, "threshold": t, ...}`` per network
        (a single, unbatched :class:`~wsnets.WeightSpace` each) whose head inputs are ``features``."""
        out = []
        dist = None
        if features is not None and self.reference is not None and self.center is not None:
            x = (features.detach().double().cpu().reshape(len(features), -1) - self.center) / self.scale
            if x.shape[1] == self.reference.shape[1]:
                dist = _knn(x.float(), self.reference, self.k)
        base_arch = Architecture.from_json(self.base_arch) if self.base_arch else None
        for i, ws in enumerate(nets):
            p = profile(ws.arch)
            why = []
            if p["family"] not in self.families:
                why.append(f"architecture family {p['family']} (trained on {', '.join(self.families)})")
            if not self.depths[0] <= p["depth"] <= self.depths[1]:
                why.append(f"depth {p['depth']} outside the trained {_span(self.depths)}")
            if not self.widths[0] <= p["width"] <= self.widths[1]:
                why.append(f"width {p['width']} outside the trained {_span(self.widths)}")
            if p["in"] not in self.inputs:
                why.append(f"{p['in']} inputs (trained on {', '.join(map(str, self.inputs))})")
            if p["out"] not in self.outputs:
                why.append(f"{p['out']} outputs (trained on {', '.join(map(str, self.outputs))})")
            if self.activations and p["activation"] not in self.activations:
                why.append(f"activation {p['activation']} (trained on {', '.join(self.activations)})")
            if self.convs and set(p["convs"]) - set(self.convs):
                why.append(f"convolution {', '.join(sorted(set(p['convs']) - set(self.convs)))} (trained on "
                           f"{', '.join(self.convs[:6])}{' ...' if len(self.convs) > 6 else ''})")
            row: dict[str, Any] = {}
            if dist is not None:
                row.update(distance=round(float(dist[i]), 4), threshold=round(float(self.threshold), 4))
                if not dist[i] <= self.threshold:  # NaN (features that are not finite) is out of range too
                    why.append(f"distance {float(dist[i]):.2f} to the training networks (in the {self.space}) "
                               f"above the threshold {self.threshold:.2f}" if dist[i] > self.threshold else
                               f"distance {float(dist[i])} to the training networks: its {self.space} is not finite")
            if self.bases is not None:
                if base_arch is None or ws.arch != base_arch:
                    why.append("not a fine-tune of the meta-model's bases (another architecture)")
                else:
                    rel = _base_distance(self.bases, ws.params, list(base_arch.param_shapes))
                    row.update(base_distance=round(rel, 4), base_threshold=round(float(self.base_threshold), 4))
                    if not rel <= self.base_threshold:
                        why.append(f"not a fine-tune of the meta-model's bases (relative distance {rel:.2f} to the "
                                   f"nearest, trained fine-tunes up to {self.base_threshold:.2f})")
            out.append({"in_range": not why, "reasons": why, **row})
        return out

    def summary(self) -> str:
        """One line: what the meta-model was trained on."""
        ds = ", ".join(list(self.datasets)[:4]) + (" ..." if len(self.datasets) > 4 else "")
        return (f"trained on {self.networks} networks: {', '.join(self.families)}, depth {_span(self.depths)}, "
                f"width {_span(self.widths)}, {'/'.join(map(str, self.inputs))} inputs, "
                f"{'/'.join(map(str, self.outputs))} outputs"
                + (f", activations {'/'.join(self.activations)}" if self.activations else "")
                + (f", datasets {ds}" if ds else "")
                + (", fine-tunes of its bases" if self.bases is not None else ""))

    # -- saving ------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"families": self.families, "depths": self.depths, "widths": self.widths, "inputs": self.inputs,
                "outputs": self.outputs, "activations": self.activations, "architectures": self.architectures,
                "datasets": self.datasets, "networks": self.networks, "space": self.space, "k": self.k,
                "quantile": self.quantile, "threshold": self.threshold, "base_arch": self.base_arch,
                "base_threshold": self.base_threshold, "convs": self.convs, "metric": "mean Euclidean distance to the k nearest training "
                "networks in the standardized space, divided by sqrt(dim)", **self.extra}

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {"reference": self.reference, "center": self.center, "scale": self.scale, "bases": self.bases}
        return {k: v.contiguous() for k, v in t.items() if v is not None}

    def save(self, run: Path) -> None:
        from ..io import write_safetensors
        t = self.tensors()
        if t:
            write_safetensors(run / FILE, t, {"wsnets.range": "1"})

    @classmethod
    def from_json(cls, d: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> "TrainingRange":
        names = {f for f in cls.__dataclass_fields__ if f not in ("reference", "center", "scale", "bases", "extra")}
        r = cls(**{k: d[k] for k in names if k in d})
        for k, v in (tensors or {}).items():
            setattr(r, k, v)
        if r.reference is not None and (r.center is None or r.scale is None or r.threshold is None):
            r.reference = None
        if r.bases is not None and (r.base_arch is None or r.base_threshold is None):
            r.bases = None
        return r

    @classmethod
    def load(cls, run: Path, meta: dict[str, Any]) -> "TrainingRange | None":
        """The range recorded in a run's ``config.json`` (+ ``reference.safetensors``), or None for a run
        saved before wsnets recorded ranges."""
        from ..errors import CheckpointError
        d = meta.get("trained_on")
        if d is None:
            return None
        where = f"{run / 'config.json'}: 'trained_on'"
        if not isinstance(d, dict):
            raise CheckpointError(f"{where} is a {type(d).__name__}, not a training range")
        for key in ("threshold", "base_threshold", "quantile"):  # the calibration: NaN compares false, so in range
            v = d.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
                raise CheckpointError(f"{where}: {key} is {v!r}, not a finite non-negative number")
        if not isinstance(d.get("k", 5), int) or d.get("k", 5) < 1:
            raise CheckpointError(f"{where}: k is {d.get('k')!r}, not a positive integer")
        tensors = None
        if (run / FILE).is_file():
            from ..io import read_safetensors
            tensors, _ = read_safetensors(run / FILE)
        elif d.get("threshold") is not None or d.get("base_threshold") is not None:
            raise CheckpointError(f"{run / FILE}: missing, but the meta-model's training range needs it (its "
                                  "distance threshold was calibrated on those networks)")
        try:
            return cls.from_json(d, tensors)
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{run / 'config.json'}: 'trained_on' is not a training range") from None


def _span(v: Sequence[int]) -> str:
    return f"{v[0]}" if v[0] == v[1] else f"{v[0]}-{v[1]}"


def _knn(x: torch.Tensor, ref: torch.Tensor, k: int, leave_out: bool = False, chunk: int = 1024) -> torch.Tensor:
    """Mean distance of each row of ``x`` to its ``k`` nearest rows of ``ref``, over ``sqrt(dim)``; with
    ``leave_out`` (``x`` is ``ref``) a row's distance to itself does not count."""
    out = []
    for s in range(0, len(x), chunk):
        d = torch.cdist(x[s:s + chunk].float(), ref.float())
        if leave_out:
            d[torch.arange(d.shape[0]), torch.arange(s, s + d.shape[0])] = math.inf
        kk = min(k, d.shape[1] - (1 if leave_out else 0))
        out.append(d.topk(kk, dim=1, largest=False).values.mean(1))
    return torch.cat(out) / math.sqrt(max(1, x.shape[1]))


def _base_distance(bases: torch.Tensor, params: dict[str, torch.Tensor], keys: Sequence[str]) -> float:
    """``min_b ||w - b|| / ||b||`` over the bases ``[n, P]``."""
    w = torch.cat([params[k].reshape(-1).double() for k in keys])
    b = bases.double()
    return float(((b - w).norm(dim=1) / b.norm(dim=1).clamp_min(1e-12)).min())


def for_dataset(mm: Any, ds: Any, device: Any = "cpu", batch_size: int = 128) -> "TrainingRange | None":
    """The training range of meta-model ``mm`` trained on dataset ``ds`` (a ZooDataset's training split):
    its networks' architectures and datasets, the head inputs ``mm`` computes for them (the encoder's
    embedding, or a GBM's features), and the bases of a fine-tuning zoo. None for data without networks."""
    if not hasattr(ds, "weightspaces"):
        return None
    nets = ds.weightspaces()
    if not nets:
        return None
    if getattr(mm, "X", None) is not None:  # a GBM: the features it was fitted on, in the dataset's order
        feats, space = mm.X, f"{mm.representation} features ({mm.X.shape[1]}-d)"
    else:
        feats = _embeddings(mm, ds, device, batch_size)
        space = f"encoder embedding ({feats.shape[1]}-d)"
    rows = getattr(ds, "rows", []) or []
    kw: dict[str, Any] = {}
    root = getattr(getattr(ds, "zoo", None), "root", None)
    if root is not None and (Path(root) / "bases.safetensors").is_file():
        from ..io import ARCH_KEY, arch_from_metadata, read_safetensors
        bases, meta = read_safetensors(Path(root) / "bases.safetensors")
        if ARCH_KEY in meta:
            kw = {"bases": bases, "base_arch": arch_from_metadata(meta[ARCH_KEY]), "params": [w.params for w in nets]}
    return TrainingRange.fit([w.arch for w in nets], feats, space=space,
                             datasets=[str(r.get("dataset")) for r in rows if r.get("dataset")], **kw)


@torch.no_grad()
def _embeddings(mm: Any, ds: Any, device: Any, batch_size: int) -> torch.Tensor:
    from .loop import _loader, to_device
    mm.eval()
    dev = torch.device(device)
    return torch.cat([mm.encoder(to_device(x, dev)).float().cpu() for x, _ in _loader(ds, batch_size=batch_size)])
