"""The reference ``nfn`` package's HNP network (Zhou et al. 2023, "Permutation Equivariant Neural
Functionals") as a wsnets encoder, for side-by-side comparison with :mod:`wsnets.nn`'s own HNP.

``nfn-hnp``: ``HNPLinear(1 -> hidden)`` + ReLU, ``layers - 1`` more ``HNPLinear(hidden -> hidden)`` + ReLU,
``HNPPool``, flatten, ``Linear(-> out_dim)`` — the invariant architecture of nfn's examples. MLPs only
(BatchNorm folded first); input is a batched :class:`~wsnets.WeightSpace` (``representation =
"tensors"``); other architectures raise :class:`~wsnets.errors.ArchitectureMismatchError`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..arch import Architecture
from ..errors import ArchitectureMismatchError, UnsupportedLayerError
from ..symmetry import fold_batchnorm
from ..weights import WeightSpace


class NFNHNPEncoder(nn.Module):
    """nfn's HNP invariant encoder for one MLP architecture: batched WeightSpace -> ``[B, out_dim]``."""

    representation = "tensors"

    def __init__(self, arch: Architecture, hidden: int = 16, layers: int = 2, out_dim: int = 64) -> None:
        super().__init__()
        from nfn.common import NetworkSpec, ArraySpec
        from nfn.layers import HNPLinear, HNPPool, TupleOp
        if any(l.kind not in ("linear", "batchnorm", "layernorm", "act", "dropout", "flatten") for l in arch.layers):
            raise UnsupportedLayerError(f"nfn-hnp takes MLPs only, got {arch.describe()}")
        self.arch, self.out_dim = arch, out_dim
        sizes = arch.group_sizes
        L = len(sizes) - 1
        spec = NetworkSpec([ArraySpec((sizes[i + 1] if i == L - 1 else -1, sizes[0] if i == 0 else -1))
                            for i in range(L)],
                           [ArraySpec((sizes[L] if i == L - 1 else -1,)) for i in range(L)])
        mods: list[nn.Module] = []
        for k in range(layers):
            mods += [HNPLinear(spec, 1 if k == 0 else hidden, hidden), TupleOp(nn.ReLU())]
        self.body = nn.Sequential(*mods)
        self.pool = HNPPool(spec)
        self.out = nn.Linear(hidden * HNPPool.get_num_outs(spec), out_dim)

    def forward(self, ws: WeightSpace) -> torch.Tensor:
        from nfn.common import WeightSpaceFeatures
        if not isinstance(ws, WeightSpace) or ws.arch.group_sizes != self.arch.group_sizes:
            got = ws.arch.describe() if isinstance(ws, WeightSpace) else type(ws).__name__
            raise ArchitectureMismatchError(f"nfn-hnp was built for {self.arch.describe()}, got {got}")
        w, b = fold_batchnorm(ws.batched()).tensors()
        feats = WeightSpaceFeatures([x.unsqueeze(1) for x in w], [x.unsqueeze(1) for x in b])
        z = self.pool(self.body(feats))                       # [B, hidden, num_outs]
        return self.out(z.flatten(1))


def build(cfg: dict, example) -> NFNHNPEncoder:
    """Factory for ``[encoder] name = "nfn-hnp"`` (options: hidden, layers, out_dim)."""
    ws = example[0] if isinstance(example, (list, tuple)) else example
    return NFNHNPEncoder(ws.arch, **{k: v for k, v in cfg.items() if k != "name"})
