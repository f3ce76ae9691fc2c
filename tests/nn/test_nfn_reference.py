"""Our NP/HNP layers against the reference `nfn` package (Zhou et al.) on the same inputs.

1. Span: on an MLP with one channel, the set of linear maps our layer can express (as its
   parameters vary) contains the set nfn's layer can express (stacking both does not increase the
   rank); for NP they are equal, for HNP ours has exactly ``n_out`` more (a term nfn's HNP omits).
   The constant (bias) parts span the same space.
2. Behaviour: NP/HNP stacks + invariant pooling of both packages agree on what they are invariant
   to (hidden permutations: both; input permutations: NP yes, HNP no), on an MLP and a BN CNN.
"""

import pytest
import torch

import wsnets
from wsnets.nn import HNPLinear, NPLinear, WSFeatures

nfn_layers = pytest.importorskip("nfn.layers")
from nfn.common import WeightSpaceFeatures, network_spec_from_wsfeat  # noqa: E402

from .helpers import ARCHS, nets  # noqa: E402

SMALL = wsnets.mlp(3, [4, 3], 2)


def _to_nfn(ws):
    w, b = ws.batched().tensors()
    return WeightSpaceFeatures([x.unsqueeze(1) for x in w], [x.unsqueeze(1) for x in b])


def _unflatten(flat, arch):
    ts, i = [], 0
    for l in arch.weight_layers:
        for shape in ((l.out_features, l.in_features), (l.out_features,)):
            n = int(torch.tensor(shape).prod())
            ts.append(flat[:, i:i + n].reshape(len(flat), 1, *shape))
            i += n
    return ts


def _maps(layer, wrap, arch, n_samples):
    """Rows: vec of the linear map (flat -> flat) and the constant part, for random parameter draws."""
    P = sum(int(torch.tensor(s).prod()) for s in arch.param_shapes.values())
    eye, zero = torch.eye(P, dtype=torch.float64), torch.zeros(1, P, dtype=torch.float64)
    lin, const = [], []
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(n_samples):
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
            y0 = _flat_out(layer(wrap(_unflatten(zero, arch))))
            lin.append((_flat_out(layer(wrap(_unflatten(eye, arch)))) - y0).flatten())
            const.append(y0.flatten())
    return torch.stack(lin), torch.stack(const)


def _flat_out(f):
    return torch.cat([t.flatten(1) for pair in zip(f.weights, f.biases) for t in pair], dim=1)


def _rank(m):
    return int(torch.linalg.matrix_rank(m, rtol=1e-9))


@pytest.mark.parametrize("ours_cls,nfn_name", [(NPLinear, "NPLinear"), (HNPLinear, "HNPLinear")])
def test_same_space_of_equivariant_maps_as_nfn(ours_cls, nfn_name):
    ws = nets(SMALL, 1)
    spec = network_spec_from_wsfeat(_to_nfn(ws))
    ours = ours_cls(SMALL.group_sizes, 1, 1).double()
    ref = getattr(nfn_layers, nfn_name)(spec, 1, 1).double()
    n = max(sum(p.numel() for p in ours.parameters()), sum(p.numel() for p in ref.parameters())) + 10
    lo, co = _maps(ours, lambda ts: WSFeatures.from_tensors(ts), SMALL, n)
    lr, cr = _maps(ref, lambda ts: WeightSpaceFeatures(ts[0::2], ts[1::2]), SMALL, n)
    r_ours, r_ref = _rank(lo), _rank(lr)
    assert _rank(torch.cat([lo, lr])) == r_ours > 5  # nfn's maps are a subset of ours
    # nfn's HNPLinear omits one basis term: the bias of layer L-2 broadcast along the columns of the
    # last weight matrix (its NPLinear has it) -- one map per output neuron and channel pair.
    assert r_ours - r_ref == (SMALL.out_features if ours_cls is HNPLinear else 0)
    assert _rank(co) == _rank(cr) == _rank(torch.cat([co, cr]))


def _nfn_encoder(spec, cls_name, pool_name):
    L = nfn_layers
    return torch.nn.Sequential(getattr(L, cls_name)(spec, 1, 6), L.TupleOp(torch.nn.ReLU()),
                               getattr(L, cls_name)(spec, 6, 6), L.TupleOp(torch.nn.ReLU()),
                               getattr(L, pool_name)(spec)).double()


def _ours_encoder(arch, fixed_io):
    return wsnets.nn.WeightSpaceEncoder(arch, hidden=6, layers=2, out_dim=6, fixed_io=fixed_io).double()


def _behaviour(encode, ws):
    """(invariant to hidden permutations, invariant to input permutations)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        ref = encode(ws)
        hid = encode(wsnets.random_permute(ws, generator=g))
        p = torch.randperm(ws.arch.in_features, generator=g)
        inp = encode(wsnets.permute(ws, {0: p}, allow_fixed=True))
    tol = 1e-8 * ref.abs().max()
    return bool((ref - hid).abs().max() <= tol), bool((ref - inp).abs().max() <= tol)


@pytest.mark.parametrize("name", ["mlp", "cnn2d_bn"])
@pytest.mark.parametrize("kind", ["NP", "HNP"])
def test_same_invariance_behaviour_as_nfn(name, kind):
    ws = nets(ARCHS[name], 3).map(torch.Tensor.double).fold_batchnorm()
    spec = network_spec_from_wsfeat(_to_nfn(ws))
    ref = _nfn_encoder(spec, f"{kind}Linear", f"{kind}Pool")
    ours = _ours_encoder(ws.arch, fixed_io=kind == "HNP").eval()
    got_ref = _behaviour(lambda w: ref(_to_nfn(w)), ws)
    got_ours = _behaviour(ours, ws)
    assert got_ours == got_ref == (True, kind == "NP")
