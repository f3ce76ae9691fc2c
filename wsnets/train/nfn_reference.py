"""The reference ``nfn`` package's HNP network (Zhou et al. 2023, "Permutation Equivariant Neural
Functionals") as a wsnets encoder, for side-by-side comparison with :mod:`wsnets.nn`'s own HNP.

``nfn-hnp``: ``HNPLinear(1 -> hidden)`` + ReLU, ``layers - 1`` more ``HNPLinear(hidden -> hidden)`` + ReLU,
``HNPPool``, flatten, ``Linear(-> out_dim)`` — the invariant architecture of nfn's examples. It reads
MLPs and, as nfn does for the Small CNN Zoo, Conv2d stacks (kernels ``[out, in, k, k]``) with global
average pooling before a Linear head; BatchNorm is folded first. Input is a batched
:class:`~wsnets.WeightSpace` or a :class:`~wsnets.weights.MixedBatch` (``representation = "tensors"``);
like nfn it sees weights only, not the activation function. Conv1d (which nfn's layers do not take)
raises :class:`~wsnets.errors.UnsupportedLayerError`; other tensor shapes raise
:class:`~wsnets.errors.ArchitectureMismatchError`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..arch import Architecture
from ..errors import ArchitectureMismatchError, UnsupportedLayerError
from ..symmetry import fold_batchnorm
from ..weights import MixedBatch, WeightSpace

_LAYERS = ("linear", "conv2d", "batchnorm", "layernorm", "act", "dropout", "flatten", "gap")


class NFNHNPEncoder(nn.Module):
    """nfn's HNP invariant encoder for one MLP or Conv2d architecture: batched WeightSpace -> ``[B, out_dim]``."""

    representation = "tensors"

    def __init__(self, arch: Architecture, hidden: int = 16, layers: int = 2, out_dim: int = 64) -> None:
        super().__init__()
        from nfn.common import NetworkSpec, ArraySpec
        from nfn.layers import HNPLinear, HNPPool, TupleOp
        bad = [l for l in arch.layers if l.kind not in _LAYERS]
        if bad:
            raise UnsupportedLayerError(f"nfn-hnp takes MLPs and Conv2d networks (nfn's layers), got {bad[0].kind} "
                                        f"at {bad[0].name!r} in {arch.describe()}")
        self.arch, self.out_dim = arch, out_dim
        self.shapes = tuple(arch.param_shapes.items())
        sizes = arch.group_sizes
        L = len(sizes) - 1
        wl = arch.weight_layers
        spec = NetworkSpec([ArraySpec((sizes[i + 1] if i == L - 1 else -1, sizes[0] if i == 0 else -1,
                                       *wl[i].kernel_size)) for i in range(L)],
                           [ArraySpec((sizes[L] if i == L - 1 else -1,)) for i in range(L)])
        mods: list[nn.Module] = []
        for k in range(layers):
            mods += [HNPLinear(spec, 1 if k == 0 else hidden, hidden), TupleOp(nn.ReLU())]
        self.body = nn.Sequential(*mods)
        self.pool = HNPPool(spec)
        self.out = nn.Linear(hidden * HNPPool.get_num_outs(spec), out_dim)

    def forward(self, x: WeightSpace | MixedBatch) -> torch.Tensor:
        from nfn.common import WeightSpaceFeatures
        ws = x.ws if isinstance(x, MixedBatch) else x
        if not isinstance(ws, WeightSpace) or tuple(ws.arch.param_shapes.items()) != self.shapes:
            got = ws.arch.describe() if isinstance(ws, WeightSpace) else type(x).__name__
            raise ArchitectureMismatchError(f"nfn-hnp was built for {self.arch.describe()}, got {got}")
        w, b = fold_batchnorm(ws.batched()).tensors()
        feats = WeightSpaceFeatures([t.unsqueeze(1) for t in w], [t.unsqueeze(1) for t in b])
        z = self.pool(self.body(feats))                       # [B, hidden, num_outs]
        return self.out(z.flatten(1))


def build(cfg: dict, example) -> NFNHNPEncoder:
    """Factory for ``[encoder] name = "nfn-hnp"`` (options: hidden, layers, out_dim)."""
    ws = example[0] if isinstance(example, (list, tuple)) else example
    ws = ws.ws if isinstance(ws, MixedBatch) else ws
    return NFNHNPEncoder(ws.arch, **{k: v for k, v in cfg.items() if k != "name"})
