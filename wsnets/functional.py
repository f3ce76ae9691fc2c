"""A batched functional forward: ``K`` networks of one architecture evaluated as one computation.

``forward(arch, params, x)`` runs ``K`` stacked networks (every tensor in ``params`` has a leading
``K``, as in a batched :class:`~wsnets.weights.WeightSpace`) on either one shared input batch
``[N, *input_shape]`` or one batch per network ``[K, N, *input_shape]`` and returns logits
``[K, N, out]``. Linear layers are batched matrix products (``einsum``/``baddbmm``), convolutions
are one grouped convolution with ``groups=K``, and everything else is elementwise on ``[K, N, ...]``,
so the cost is one kernel launch per layer whatever ``K`` is. It is differentiable in ``params``
(``torch.autograd`` works as usual), and runs on any device the tensors are on.

Training mode (``train=True``) matches ``nn.Module.train()`` per network: BatchNorm normalizes with
each network's own batch statistics and updates its running statistics in place (PyTorch's
momentum rule, unbiased variance); dropout draws an independent mask per network and sample.
``dropout`` (a ``[K]`` tensor of rates) adds per-network dropout after every hidden activation, so
networks with different dropout rates share one architecture and one computation (dropout is the
identity at evaluation, so the stored architecture needs no dropout layer).

Any other architecture (a DAG: residual networks, transformers, models with concatenation, see
:mod:`wsnets.arch`) runs through :func:`_forward_dag`, an interpreter over the layers with the same
batching: every activation is ``[K, N, ...]``, linear layers are ``baddbmm`` over the flattened
positions, convolutions grouped, attention one batched softmax over ``K*N*heads`` (written out, see
:func:`_attention`).
The same interpreter is the ``forward`` of :meth:`WeightSpace.to_module` for DAGs (with ``K = 1``
views of the module's own tensors, so BatchNorm's running statistics update in place in training).

Examples
--------
>>> import torch, wsnets
>>> from wsnets.functional import forward
>>> arch = wsnets.mlp(4, [8], 3)
>>> ws = wsnets.WeightSpace.random(arch, batch_size=5)
>>> forward(arch, ws.params, torch.randn(7, 4)).shape
torch.Size([5, 7, 3])
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from .arch import Architecture, Layer
from .errors import ShapeMismatchError, UnsupportedLayerError

_ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda h: h, "relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
    "elu": F.elu, "silu": F.silu, "softplus": F.softplus,
}


def activation(fn: str, h: torch.Tensor, slope: float = 0.01) -> torch.Tensor:
    """Apply a named activation (the names of :data:`wsnets.arch.ACTIVATIONS`) elementwise."""
    if fn == "leaky_relu":
        return F.leaky_relu(h, slope)
    try:
        return _ACTS[fn](h)
    except KeyError:
        raise UnsupportedLayerError(f"unsupported activation {fn!r}") from None


def forward(arch: Architecture, params: Mapping[str, torch.Tensor], x: torch.Tensor, *, train: bool = False,
            dropout: torch.Tensor | None = None, generator: torch.Generator | None = None,
            bn: str | None = None, bn_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
            activations: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Logits of ``K`` stacked networks.

    Parameters
    ----------
    arch : the shared architecture.
    params : state-dict key -> tensor with a leading ``K`` (``arch.param_shapes`` after it).
    x : ``[N, *input_shape]`` (one batch for every network) or ``[K, N, *input_shape]``.
    train : training mode: batch statistics in BatchNorm (running statistics in ``params`` are
        updated in place) and random dropout masks.
    dropout : optional ``[K]`` per-network dropout rates applied after each hidden activation in
        training mode.
    generator : random source for dropout masks (deterministic training).
    bn : how BatchNorm normalizes, independently of ``train`` (which then only switches dropout):
        ``"running"`` with the stored running statistics (eval mode); ``"batch"`` with the batch
        mean and biased variance, running statistics untouched; ``"train"`` as ``"batch"`` and the
        running statistics updated in place. Default: ``"train"`` if ``train`` else ``"running"``.
    bn_stats : with ``bn="batch"`` or ``"train"``, receives BatchNorm name -> (batch mean ``[K, C]``,
        unbiased batch variance ``[K, C]``), the values ``nn.BatchNorm`` folds into its running
        statistics (``torch.optim.swa_utils.update_bn`` averages them).
    activations : receives hidden neuron group ``g`` -> that group's output right before the next
        weight layer, ``[K, N, C, *S]`` (after the activation, before global pooling).

    Returns
    -------
    torch.Tensor ``[K, N, out]`` (``[K, N, C, *spatial]`` if the network ends in a convolution).
    """
    K = _num_models(arch, params)
    mode = bn or ("train" if train else "running")
    if mode not in ("running", "batch", "train"):
        raise ValueError(f"bn must be 'running', 'batch' or 'train', not {bn!r}")
    if not arch.is_chain:
        return _forward_dag(arch, params, x, K, train=train, dropout=dropout, generator=generator, mode=mode,
                            bn_stats=bn_stats, activations=activations)
    h, shared = _prepare_input(arch, x, K)
    last_weight = max(i for i, l in enumerate(arch.layers) if l.is_weight)
    last_group = arch.num_groups - 1
    for i, (l, g) in enumerate(zip(arch.layers, arch.layer_group)):
        if l.kind == "linear":
            if h.dim() != (2 if shared else 3):
                raise ShapeMismatchError(f"linear at {l.name!r} got a {h.dim() - (2 if shared else 3)}-d feature map; "
                                         "flatten first")
            h = _linear(h, params, l, shared)
            shared = False
        elif l.kind in ("conv1d", "conv2d"):
            h = _conv(h, params, l, shared, K)
            shared = False
        else:
            if shared:  # parameter-free layers before the first weight layer run once on the shared batch
                if l.kind == "flatten":
                    h = h.flatten(1)
                    continue
                h, shared = h.unsqueeze(0).expand(K, *h.shape), False
            h = _other(h, params, l, train, generator, mode, bn_stats)
            if l.kind == "act" and train and dropout is not None and i < last_weight:
                h = _dropout(h, dropout, generator)
        if activations is not None and 0 < g < last_group and l.kind not in ("gap", "flatten", "dropout"):
            activations[g] = h
    return h


def _forward_dag(arch: Architecture, params: Mapping[str, torch.Tensor], x: torch.Tensor, K: int, *,
                 train: bool, dropout: torch.Tensor | None, generator: torch.Generator | None, mode: str,
                 bn_stats: dict | None, activations: dict | None) -> torch.Tensor:
    """:func:`forward` for a DAG architecture (see the module docstring)."""
    nd = len(arch.input_shape)
    if x.dim() == nd + 1:
        x = x.unsqueeze(0).expand(K, *x.shape)
    elif not (x.dim() == nd + 2 and x.shape[0] == K):
        raise ShapeMismatchError(f"input of shape {tuple(x.shape)} fits neither [N, *{arch.input_shape}] "
                                 f"nor [{K}, N, *{arch.input_shape}] for {arch.describe()}")
    vals: list[torch.Tensor] = []
    last = len(arch.layers) - 1
    keep = _needed_until(arch)
    fixed = _fixed_classes(arch) if activations is not None else None
    for i, (l, ins) in enumerate(zip(arch.layers, arch.inputs)):
        xs = [x if j < 0 else vals[j] for j in ins]
        h = _dag_op(l, xs, params, K, train, generator, mode, bn_stats)
        if l.kind == "act" and train and dropout is not None and i < last:
            h = _dropout(h, dropout, generator)
        vals.append(h)
        if activations is not None and fixed is not None and i in fixed:
            g, axis = fixed[i]
            activations[g] = h if h.dim() + axis == 2 else h.movedim(axis, 2)   # [K, N, C, *positions]
        for j in keep[i]:  # free what no later layer reads
            if j != i:
                vals[j] = None  # type: ignore[call-overload]
    return vals[last]


def _needed_until(arch: Architecture) -> list[list[int]]:
    """``out[i]``: the layers whose output is last read by layer ``i`` (freed after it)."""
    last_use = {j: i for i, ins in enumerate(arch.inputs) for j in ins if j >= 0}
    out: list[list[int]] = [[] for _ in arch.layers]
    for j, i in last_use.items():
        out[i].append(j)
    return out


def _fixed_classes(arch: Architecture) -> dict[int, tuple[int, int]]:
    """Layer index -> (hidden group whose activation it produces, that output's feature axis)."""
    from .symmetry import permutation_spec
    spec = permutation_spec(arch)
    return {i: (g, spec.layer_axes[i]) for i, g in spec.activation_layers.items()}


def _right_align(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Insert singleton axes after ``K`` so every operand has the same rank (torch broadcasting per network)."""
    r = max(t.dim() for t in ts)
    return [t if t.dim() == r else t.reshape(t.shape[0], *(1,) * (r - t.dim()), *t.shape[1:]) for t in ts]


def _dag_op(l: Layer, xs: list[torch.Tensor], params: Mapping[str, torch.Tensor], K: int, train: bool,
            generator: torch.Generator | None, mode: str, bn_stats: dict | None) -> torch.Tensor:
    k = l.kind
    h = xs[0] if xs else None
    if k == "linear":
        lead = h.shape[:-1]
        return _linear(h.reshape(K, -1, h.shape[-1]), params, l, False).reshape(*lead, l.out_features)
    if k in ("conv1d", "conv2d"):
        return _conv(h, params, l, False, K)
    if k == "embedding":
        w = params[l.key("weight")]  # [K, V, D]
        if l.mode == "positions":
            return w[:, None, :h.shape[l.dim]]                                    # [K, 1, T, D]
        if l.mode == "zeros":
            return w[:, None, None, 0]                                            # [K, 1, 1, D]
        kk = torch.arange(K, device=w.device).reshape(K, *(1,) * (h.dim() - 1))
        return w[kk, h.long()]
    if k == "param":
        return params[l.key("")]
    if k == "mha":
        return _mha(l, xs, params, K)
    if k == "attention":
        return _attention(*xs, l.heads, l.mode == "causal", l.value)
    if k in ("add", "mul"):
        ts = _right_align(xs)
        out = ts[0]
        for t in ts[1:]:
            out = out + t if k == "add" else out * t
        return out
    if k == "scale":
        return h * l.value
    if k == "concat":
        ts = _right_align(xs)
        shape = list(torch.broadcast_shapes(*[t.shape[:l.dim] + (1,) + t.shape[t.dim() + l.dim + 1:] for t in ts]))
        ts = [t.expand(*shape[:len(shape) + l.dim], t.shape[l.dim], *shape[len(shape) + l.dim + 1:]) for t in ts]
        return torch.cat(ts, dim=l.dim)
    if k == "tokens":
        return h.flatten(3).transpose(-1, -2)
    if k == "mean":
        return h.mean(dim=l.dim)
    if k == "select":
        return h.select(l.dim, l.index)
    if k in ("layernorm", "rmsnorm"):
        if k == "layernorm":
            out = F.layer_norm(h, (l.out_features,), eps=l.eps)
        else:
            out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + (l.eps or torch.finfo(h.dtype).eps))
        if l.affine:
            view = (K,) + (1,) * (h.dim() - 2) + (l.out_features,)
            out = out * params[l.key("weight")].reshape(view)
            if k == "layernorm" and l.bias:
                out = out + params[l.key("bias")].reshape(view)
        return out
    if k == "groupnorm":
        N, C = h.shape[1], h.shape[2]
        out = F.group_norm(h.reshape(K * N, C, *h.shape[3:]), l.heads, eps=l.eps).reshape(h.shape)
        if l.affine:
            view = (K, 1, C) + (1,) * (h.dim() - 3)
            out = out * params[l.key("weight")].reshape(view) + params[l.key("bias")].reshape(view)
        return out
    return _other(h, params, l, train, generator, mode, bn_stats)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool = False,
               scale: float = 1.0) -> torch.Tensor:
    """Multi-head softmax attention on ``[K, N, T, heads*d]`` q, k, v (heads split, attended, merged).

    Written out: ``F.scaled_dot_product_attention``'s CPU kernel has no double backward (Hessian-vector
    products) and no vmap rule (landscapes evaluate many points at once). The zoo trainer's engine has its
    own variant with the scores transposed (:func:`wsnets.zoo.dag_engine._attention`)."""
    lead = q.shape[:-2]
    T, S = q.shape[-2], k.shape[-2]

    def split(t: torch.Tensor, n: int) -> torch.Tensor:
        t = t.expand(*lead, *t.shape[-2:]) if t.shape[:-2] != lead else t
        return t.reshape(-1, n, heads, t.shape[-1] // heads).transpose(1, 2)     # [M, heads, n, d]
    qh, kh, vh = split(q, T), split(k, S), split(v, S)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * (scale / qh.shape[-1] ** 0.5)
    if causal:
        scores = scores.masked_fill(torch.ones(T, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    out = torch.matmul(scores.softmax(-1), vh)
    return out.transpose(1, 2).reshape(*lead, T, v.shape[-1])


def _mha(l: Layer, xs: list[torch.Tensor], params: Mapping[str, torch.Tensor], K: int) -> torch.Tensor:
    """``nn.MultiheadAttention`` (batch first, no masks) for ``K`` networks."""
    D = l.out_features
    w = params[l.key("in_proj_weight")]                                          # [K, 3D, D]
    b = params.get(l.key("in_proj_bias"))
    q_in, k_in, v_in = (xs * 3)[:3] if len(xs) == 1 else xs
    proj = []
    for i, t in enumerate((q_in, k_in, v_in)):
        wi = w[:, i * D:(i + 1) * D]
        lead = t.shape[:-1]
        t2 = t.reshape(K, -1, D)
        y = torch.bmm(t2, wi.transpose(1, 2)) if b is None else torch.baddbmm(b[:, None, i * D:(i + 1) * D], t2,
                                                                              wi.transpose(1, 2))
        proj.append(y.reshape(*lead, D))
    o = _attention(*proj, l.heads)
    wo, bo = params[l.key("out_proj.weight")], params.get(l.key("out_proj.bias"))
    lead = o.shape[:-1]
    o2 = o.reshape(K, -1, D)
    y = torch.bmm(o2, wo.transpose(1, 2)) if bo is None else torch.baddbmm(bo[:, None], o2, wo.transpose(1, 2))
    return y.reshape(*lead, D)


def _num_models(arch: Architecture, params: Mapping[str, torch.Tensor]) -> int:
    key, shape = next(iter(arch.param_shapes.items()))
    if key not in params:
        raise ShapeMismatchError(f"params lack {key!r} for {arch.describe()}")
    t = params[key]
    if t.dim() != len(shape) + 1:
        raise ShapeMismatchError(f"params[{key!r}] has shape {tuple(t.shape)}: expected a leading K before {shape}")
    return int(t.shape[0])


def _prepare_input(arch: Architecture, x: torch.Tensor, K: int) -> tuple[torch.Tensor, bool]:
    """Return ``(x, shared)``: shared inputs stay ``[N, ...]`` until the first weight layer."""
    if arch.input_shape is not None:
        nd = len(arch.input_shape)
        if x.dim() == nd + 1 and tuple(x.shape[1:]) == arch.input_shape:
            return x, True
        if x.dim() == nd + 2 and tuple(x.shape[2:]) == arch.input_shape and x.shape[0] == K:
            return x, False
        raise ShapeMismatchError(f"input of shape {tuple(x.shape)} fits neither [N, *{arch.input_shape}] "
                                 f"nor [{K}, N, *{arch.input_shape}] for {arch.describe()}")
    first = arch.weight_layers[0]
    nd = first.dims if first.kind != "linear" else 0
    if x.dim() == nd + 2:
        return x, True
    if x.dim() == nd + 3 and x.shape[0] == K:
        return x, False
    raise ShapeMismatchError(f"input of shape {tuple(x.shape)} does not fit {arch.describe()} with K={K}")


def _linear(h: torch.Tensor, params: Mapping[str, torch.Tensor], l: Layer, shared: bool) -> torch.Tensor:
    w = params[f"{l.name}.weight"]  # [K, out, in]
    b = params.get(f"{l.name}.bias")  # [K, out]
    if shared:  # h [N, in]: the same batch for all K weight matrices (a stride-0 batch dim, no copy;
        h = h.expand(w.shape[0], *h.shape)  # ~2x faster on CPU than einsum + a bias add on its permuted output)
    if b is None:
        return torch.bmm(h, w.transpose(1, 2))
    return torch.baddbmm(b[:, None, :], h, w.transpose(1, 2))  # [K, N, out]


def _conv(h: torch.Tensor, params: Mapping[str, torch.Tensor], l: Layer, shared: bool, K: int) -> torch.Tensor:
    w = params[f"{l.name}.weight"]  # [K, out, in, *k]
    b = params.get(f"{l.name}.bias")
    conv = F.conv1d if l.kind == "conv1d" else F.conv2d
    wk = w.reshape(K * l.out_features, *w.shape[2:])
    bk = None if b is None else b.reshape(-1)
    if shared:  # h [N, C, *S]: an ordinary conv with K*out output channels
        out = conv(h, wk, bk, stride=l.stride, padding=l.padding, dilation=l.dilation)
        N = h.shape[0]
    else:  # h [K, N, C, *S] -> [N, K*C, *S], grouped conv with groups=K
        N = h.shape[1]
        hk = h.transpose(0, 1).reshape(N, K * l.in_features, *h.shape[3:])
        out = conv(hk, wk, bk, stride=l.stride, padding=l.padding, dilation=l.dilation, groups=K)
    return out.reshape(N, K, l.out_features, *out.shape[2:]).transpose(0, 1)


def _other(h: torch.Tensor, params: Mapping[str, torch.Tensor], l: Layer, train: bool,
           generator: torch.Generator | None, bn: str = "running",
           bn_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
    if l.kind == "act":
        return activation(l.fn, h, l.slope)
    if l.kind == "batchnorm":
        return _batchnorm(h, params, l, bn, bn_stats)
    if l.kind == "layernorm":
        if h.dim() != 3:
            raise UnsupportedLayerError(f"layernorm at {l.name!r} over a feature map is not supported")
        out = F.layer_norm(h, (l.out_features,), eps=l.eps)
        if l.affine:
            out = out * params[f"{l.name}.weight"][:, None]
            if l.bias:
                out = out + params[f"{l.name}.bias"][:, None]
        return out
    if l.kind == "dropout":
        if not train or l.p == 0:
            return h
        return _dropout(h, torch.full((h.shape[0],), l.p, device=h.device), generator)
    if l.kind == "gap":
        return h.mean(dim=tuple(range(3, h.dim())), keepdim=True)
    if l.kind == "flatten":
        return h.flatten(2)
    if l.kind == "scale":
        return h * l.value
    if l.kind in ("maxpool", "avgpool"):
        K, N = h.shape[:2]
        pool = getattr(F, f"{'max' if l.kind == 'maxpool' else 'avg'}_pool{l.dims}d")
        out = pool(h.reshape(K * N, *h.shape[2:]), l.kernel_size, stride=l.stride or l.kernel_size,
                   padding=l.padding or 0)
        return out.reshape(K, N, *out.shape[1:])
    raise UnsupportedLayerError(f"functional forward cannot run {l!r}")  # pragma: no cover


def _batchnorm(h: torch.Tensor, params: Mapping[str, torch.Tensor], l: Layer, mode: str,
               stats: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
    """Per-network BatchNorm on ``h`` ``[K, N, C, *S]`` (``mode``: see :func:`forward`'s ``bn``)."""
    K, C = h.shape[0], h.shape[2]
    view = (K, 1, C) + (1,) * (h.dim() - 3)
    rm, rv = params[f"{l.name}.running_mean"], params[f"{l.name}.running_var"]
    if mode != "running":
        dims = (1,) + tuple(range(3, h.dim()))
        n = h.numel() // (K * C)
        if n < 2:
            raise ShapeMismatchError(f"batchnorm at {l.name!r} needs more than one value per channel in a batch")
        var, mean = torch.var_mean(h, dim=dims, correction=0)  # [K, C]
        if stats is not None:
            stats[l.name] = (mean.detach(), var.detach() * n / (n - 1))
        if mode == "train":
            with torch.no_grad():
                rm.mul_(1 - l.momentum).add_(mean.detach(), alpha=l.momentum)
                rv.mul_(1 - l.momentum).add_(var.detach() * (n / (n - 1)), alpha=l.momentum)
    else:
        mean, var = rm, rv
    out = (h - mean.reshape(view)) * torch.rsqrt(var.reshape(view) + l.eps)
    if l.affine:
        out = out * params[f"{l.name}.weight"].reshape(view) + params[f"{l.name}.bias"].reshape(view)
    return out


def _dropout(h: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Inverted dropout with rate ``p[k]`` for network ``k``; an independent mask per element.

    When the networks with ``p > 0`` form one contiguous block (the zoo trainer sorts them so), masks
    are drawn for that block only.
    """
    on = (p > 0).nonzero().flatten().tolist()
    if not on:
        return h
    s, e = on[0], on[-1] + 1
    if e - s == len(on) and e - s < len(p):
        return torch.cat([h[:s], _dropout(h[s:e], p[s:e], generator), h[e:]])
    view = (-1,) + (1,) * (h.dim() - 1)
    keep = (1 - p.to(h.dtype)).reshape(view)
    u = torch.rand(h.shape, generator=generator, device=h.device, dtype=h.dtype)
    return torch.where(u < keep, h / keep.clamp_min(1e-12), torch.zeros((), dtype=h.dtype, device=h.device))


def predict(arch: Architecture, params: Mapping[str, torch.Tensor], x: torch.Tensor, *,
            chunk: int = 4096) -> torch.Tensor:
    """Evaluation-mode logits ``[K, N, out]`` without gradients, over ``x`` in chunks of ``chunk`` samples."""
    with torch.no_grad():
        return torch.cat([forward(arch, params, x[i:i + chunk]) for i in range(0, max(len(x), 1), chunk)], dim=1)
