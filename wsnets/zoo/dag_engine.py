"""The batched trainer's engine for any traced architecture (residual CNNs, transformers, plain chains).

``K`` models of one :class:`~wsnets.arch.Architecture` train as one computation: their trainable
parameters are one leaf ``theta [K, P]`` (as in the autograd engine), the forward pass is an interpreter
over the architecture's DAG, and one ``torch.autograd.grad`` of the summed per-model mean cross-entropy
gives every model its own gradient. It computes what :func:`wsnets.functional.forward` computes in
training mode (tested to float tolerance), with one difference in how values are laid out:

* convolution feature maps stay in the *grouped layout* ``[B, K*C, *S]`` (models' channels side by
  side, ``B`` samples per model), the layout a grouped convolution with ``groups=K`` reads and writes,
  2-d maps in channels-last memory order: oneDNN's grouped convolution of a few channels per group
  is 1.5-4x faster so, its weight gradient most (small ResNet group: 22 -> 13 ms a step). BatchNorm of
  ``K`` models is one fused kernel over ``K*C`` channels (per-model, per-channel batch statistics;
  running statistics updated in place through a view of the ``[K, C]`` buffers) instead of the ~10
  elementwise passes of a batched BatchNorm written out; on channels-last maps its batch statistics
  are summed by :class:`_BatchNormCL` (PyTorch's channels-last CPU kernel sums them too coarsely).
  Activations, residual additions and pooling run on this layout unchanged;
* everything else uses the interpreter's layout ``[K, B, ...]`` and :func:`wsnets.functional._dag_op`
  (linear layers as ``baddbmm``, LayerNorm), except: a patch embedding (stride = kernel) is one
  ``bmm`` of the patches, a reshape (:func:`_patchify`); attention is written out with the scores
  transposed so that the softmax over a few tokens is vectorized (:func:`_attention`, ~3x faster
  than over the last dim, and faster than PyTorch's fused CPU attention on 5-17 tokens); and
  self-attention's input projection (``nn.MultiheadAttention``) is one ``baddbmm`` for q, k and v.

A value changes layout where an operation needs the other (global pooling into the linear head, a
patch embedding's tokens): one transpose of a small tensor. Dropout after hidden activations is
per model (``dropout [K]`` rates), drawn from the group's generator.

Evaluation (the recorded metrics) runs the same interpreter in evaluation mode
(:meth:`DAGEngine.logits`; BatchNorm with the running statistics, no dropout): the function of
:func:`wsnets.functional.forward` and of the module :meth:`WeightSpace.to_module` rebuilds (tested to
float tolerance; a stored checkpoint's module gets exactly its recorded accuracy), 1.0-2.4x faster
than the interpreter's eval mode on the groups of ``benchmarks/zoo_speed.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..arch import Architecture, Layer
from ..functional import _dag_op, _dropout, _needed_until
from .trainer import _AutogradEngine

_ELEMENTWISE = ("act", "dropout", "scale")


class _G:
    """A conv feature map of ``K`` models in the grouped layout ``[B, K*C, *S]``."""

    __slots__ = ("t",)

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


def _to_k(v, K: int) -> torch.Tensor:
    """The interpreter's layout ``[K, B, C, *S]`` of a value."""
    if not isinstance(v, _G):
        return v
    t = v.t
    return t.reshape(t.shape[0], K, t.shape[1] // K, *t.shape[2:]).transpose(0, 1)


def _to_g(v, K: int) -> torch.Tensor:
    """The grouped layout ``[B, K*C, *S]`` of a value in either layout."""
    if isinstance(v, _G):
        return v.t
    return v.transpose(0, 1).reshape(v.shape[1], K * v.shape[2], *v.shape[3:])


def train_forward(arch: Architecture, params: dict[str, torch.Tensor], x: torch.Tensor, *,
                  dropout: torch.Tensor | None = None, generator: torch.Generator | None = None,
                  train: bool = True) -> torch.Tensor:
    """Training-mode logits ``[K, B, out]`` of ``K`` models on their own batches ``x [K, B, *input_shape]``
    (BatchNorm with batch statistics, its running statistics in ``params`` updated in place; dropout
    ``[K]`` after every hidden activation). The same function as ``wsnets.functional.forward(arch,
    params, x, train=True, dropout=dropout)``; see the module docstring for the layouts.
    ``train=False``: evaluation mode (BatchNorm with the running statistics, no dropout), the same
    function as ``forward(arch, params, x)``."""
    K = x.shape[0]
    vals: list = []
    keep_until = _needed_until(arch)
    last = len(arch.layers) - 1
    for i, (l, ins) in enumerate(zip(arch.layers, arch.inputs)):
        xs = [x if j < 0 else vals[j] for j in ins]
        h = _op(l, xs, params, K, generator, train)
        if l.kind == "act" and train and dropout is not None and i < last:
            h = _dropout(_to_k(h, K), dropout, generator)
        vals.append(h)
        for j in keep_until[i]:
            if j != i:
                vals[j] = None
    return _to_k(vals[last], K)


def _op(l: Layer, xs: list, params: dict[str, torch.Tensor], K: int, generator: torch.Generator | None,
        train: bool):
    k = l.kind
    if k == "conv2d" and _is_patchify(l):
        return _patchify(l, _to_k(xs[0], K), params, K)
    if k in ("conv1d", "conv2d"):
        h = _to_g(xs[0], K)
        if h.dim() == 4:  # channels last: oneDNN's grouped convolution of few channels per group is 1.5-3x
            h = h.contiguous(memory_format=torch.channels_last)  # faster, its weight gradient most
        w = params[l.key("weight")]
        b = params.get(l.key("bias"))
        conv = F.conv1d if k == "conv1d" else F.conv2d
        return _G(conv(h, w.reshape(K * l.out_features, *w.shape[2:]), None if b is None else b.reshape(-1),
                       l.stride, l.padding, l.dilation, K))
    if k == "batchnorm" and (l.momentum is not None or not train) and (isinstance(xs[0], _G) or xs[0].dim() == 3):
        h = _to_g(xs[0], K)
        w, b = (params[l.key("weight")].reshape(-1), params[l.key("bias")].reshape(-1)) if l.affine else (None, None)
        rm, rv = params[l.key("running_mean")], params[l.key("running_var")]
        if train and h.is_contiguous(memory_format=torch.channels_last) and not h.is_contiguous():
            return _G(_BatchNormCL.apply(h, w, b, rm.view(-1), rv.view(-1), l.momentum, l.eps))
        return _G(F.batch_norm(h, rm.view(-1), rv.view(-1), w, b, train, l.momentum or 0.0, l.eps))
    if isinstance(xs[0], _G):
        h = xs[0].t
        if k in _ELEMENTWISE and not (k == "dropout" and l.p > 0 and train):
            return _G(_dag_op(l, [h], params, K, train, generator, "train", None)) if k != "dropout" else xs[0]
        if k in ("maxpool", "avgpool"):
            pool = getattr(F, f"{'max' if k == 'maxpool' else 'avg'}_pool{l.dims}d")
            return _G(pool(h, l.kernel_size, stride=l.stride or l.kernel_size, padding=l.padding or 0))
        if k == "gap":
            return _G(h.mean(dim=tuple(range(2, h.dim())), keepdim=True))
        if k in ("add", "mul") and all(isinstance(v, _G) and v.t.shape == h.shape for v in xs):
            out = xs[0].t
            for v in xs[1:]:
                out = out + v.t if k == "add" else out * v.t
            return _G(out)
    xs = [_to_k(v, K) for v in xs]
    if k == "mha" and len(xs) == 1:
        return _self_attention(l, xs[0], params, K)
    if k == "attention":
        return _attention(*xs, l.heads, l.mode == "causal", l.value)
    return _dag_op(l, xs, params, K, train, generator, "train" if train else "running", None)


class _BatchNormCL(torch.autograd.Function):
    """Training-mode BatchNorm of a channels-last ``[B, C, H, W]`` map with its batch statistics summed
    as PyTorch's default-layout kernel sums them. PyTorch's channels-last CPU kernel accumulates them in
    one float32 running sum per channel: ~20x the error on off-centre values, enough to move a BatchNorm
    ResNet ~1e-3 away from its reference within one epoch. Here: the mean and the centred sum of squares
    by ``sum`` over the ``[B*H*W, C]`` view (cascade summation), then one pass of the evaluation-mode
    kernel with those statistics; the backward is PyTorch's (it reads the saved mean and 1/std)."""

    @staticmethod
    def forward(ctx, x, w, b, rm, rv, momentum: float, eps: float):
        X = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])                                 # a view
        n = X.shape[0]
        mean = X.sum(0) / n
        var = (X - mean).square_().sum(0) / n
        with torch.no_grad():
            rm.mul_(1 - momentum).add_(mean, alpha=momentum)
            rv.mul_(1 - momentum).add_(var * (n / max(n - 1, 1)), alpha=momentum)
        ctx.save_for_backward(x, w, mean, torch.rsqrt(var + eps))
        ctx.eps = eps
        return F.batch_norm(x, mean, var, w, b, False, 0.0, eps)

    @staticmethod
    def backward(ctx, g):
        x, w, mean, invstd = ctx.saved_tensors
        affine = w is not None
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(g, x, w, None, None, mean, invstd, True, ctx.eps,
                                                               [True, affine, affine])
        return gx, gw, gb, None, None, None, None


def _is_patchify(l: Layer) -> bool:
    """A patch embedding: a convolution whose windows tile the input (stride = kernel > 1, no padding or
    dilation). A 1x1 convolution is left to oneDNN (as fast here, and the kernels a reference module runs)."""
    return (tuple(l.stride) == tuple(l.kernel_size) and max(l.kernel_size) > 1 and not any(l.padding or ())
            and all(d == 1 for d in l.dilation or ()))


def _patchify(l: Layer, h: torch.Tensor, params: dict[str, torch.Tensor], K: int) -> torch.Tensor:
    """A patch embedding (:func:`_is_patchify`) of ``h [K, B, C, H, W]`` as one batched matrix product of
    the patches ``[K, B*Ho*Wo, C*kh*kw]`` with the weights: its windows do not overlap, so the patches are a
    reshape (oneDNN's grouped convolution of one input channel per group took ~15% of a small ViT's step).
    Returns ``[K, B, out, Ho, Wo]``, a view of a ``[K, B, Ho, Wo, out]`` tensor (the layout of the tokens
    that usually follow)."""
    (kh, kw), (H, W) = l.kernel_size, h.shape[-2:]
    Ho, Wo, B, C = H // kh, W // kw, h.shape[1], h.shape[2]
    patches = h[..., :Ho * kh, :Wo * kw].reshape(K, B, C, Ho, kh, Wo, kw).permute(0, 1, 3, 5, 2, 4, 6)
    w = params[l.key("weight")].reshape(K, l.out_features, -1).transpose(1, 2)           # [K, C*kh*kw, out]
    b = params.get(l.key("bias"))
    p2 = patches.reshape(K, B * Ho * Wo, C * kh * kw)
    y = torch.bmm(p2, w) if b is None else torch.baddbmm(b[:, None], p2, w)
    return y.view(K, B, Ho, Wo, l.out_features).permute(0, 1, 4, 2, 3)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool = False,
               scale: float = 1.0) -> torch.Tensor:
    """:func:`wsnets.functional._attention` with the scores transposed, ``[M, keys, queries]``, and the
    softmax over dim 1: PyTorch's CPU softmax over the last dim of a few (5-17) tokens runs a scalar loop
    per row, over dim 1 it is vectorized across the queries (~3x faster on 5 tokens, with its backward)."""
    lead = q.shape[:-2]
    T, S = q.shape[-2], k.shape[-2]

    def split(t: torch.Tensor, n: int) -> torch.Tensor:
        t = t.expand(*lead, *t.shape[-2:]) if t.shape[:-2] != lead else t
        d = t.shape[-1] // heads
        return t.reshape(-1, n, heads, d).transpose(1, 2).reshape(-1, n, d)           # [M*heads, n, d]
    qh, kh, vh = split(q, T), split(k, S), split(v, S)
    st = torch.bmm(kh, qh.transpose(1, 2)) * (scale / qh.shape[-1] ** 0.5)             # [M*heads, S, T]
    if causal:  # query t sees keys s <= t
        st = st.masked_fill(torch.ones(S, T, dtype=torch.bool, device=q.device).tril(-1), float("-inf"))
    out = torch.bmm(st.softmax(1).transpose(1, 2), vh)                                   # [M*heads, T, d]
    return out.reshape(-1, heads, T, out.shape[-1]).transpose(1, 2).reshape(*lead, T, v.shape[-1])


def _self_attention(l: Layer, h: torch.Tensor, params: dict[str, torch.Tensor], K: int) -> torch.Tensor:
    """``nn.MultiheadAttention(h, h, h)`` of ``K`` models, the q/k/v projection as one ``baddbmm``."""
    D = l.out_features
    lead = h.shape[:-1]
    h2 = h.reshape(K, -1, D)
    w = params[l.key("in_proj_weight")].transpose(1, 2)                                   # [K, D, 3D]
    b = params.get(l.key("in_proj_bias"))
    qkv = torch.bmm(h2, w) if b is None else torch.baddbmm(b[:, None], h2, w)             # [K, B*T, 3D]
    q, k, v = (t.reshape(*lead, D) for t in qkv.split(D, dim=-1))
    o = _attention(q, k, v, l.heads).reshape(K, -1, D)
    wo, bo = params[l.key("out_proj.weight")].transpose(1, 2), params.get(l.key("out_proj.bias"))
    y = torch.bmm(o, wo) if bo is None else torch.baddbmm(bo[:, None], o, wo)
    return y.reshape(*lead, D)


#: bytes of one value of the group that the checkpoint evaluation's chunks of images aim at
_EVAL_BYTES = 8 << 20


class DAGEngine(_AutogradEngine):
    """The autograd engine with :func:`train_forward` as its training forward pass.

    ``eval_chunk``: images per chunk of the checkpoint evaluation, 16-256, a power of two that keeps the
    group's largest value near :data:`_EVAL_BYTES` (8 MB). Larger values are fresh mappings from the
    allocator each time, pages the kernel faults in and zeroes: with 256 images, a group of 25 32-channel
    ResNets spent 23% of its evaluation in the kernel (0.97 of 4.18 s, 614k page faults); with 32, none
    (3.58 s). The values of an image do not depend on the chunk it is evaluated in (up to rounding)."""

    def __init__(self, arch, params, bank, batch_size, drop, n_drop, gen):
        super().__init__(arch, params, bank, batch_size, drop, n_drop, gen)
        per_image = 4 * self.K * max(math.prod(s[1:]) for s in arch.shapes)
        self.eval_chunk = 1 << max(4, min(8, (_EVAL_BYTES // per_image).bit_length() - 1))

    def grads(self, fidx: torch.Tensor, yb: torch.Tensor) -> list[torch.Tensor]:
        xb = self.x.index_select(0, fidx.reshape(-1)).reshape(*fidx.shape, *self.shape)
        logits = train_forward(self.arch, self.params(self.theta), xb, dropout=self.drop, generator=self.gen)
        loss = F.cross_entropy(logits.transpose(1, 2), yb, reduction="sum") / self.batch_size
        return list(torch.autograd.grad(loss, [self.theta]))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluation logits ``[K, C, N]`` of inputs ``[N, ...]`` (shared) or ``[K, N, ...]``: the
        grouped-layout interpreter in evaluation mode (the function of ``forward(arch, params, x)``)."""
        if x.dim() == len(self.shape) + 1:
            x = x.expand(self.K, *x.shape)
        return train_forward(self.arch, self.params(), x, train=False).transpose(1, 2)
