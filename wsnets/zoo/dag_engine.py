"""The batched trainer's engine for any traced architecture (residual CNNs, transformers, plain chains).

``K`` models of one :class:`~wsnets.arch.Architecture` train as one computation: their trainable
parameters are one leaf ``theta [K, P]`` (as in the autograd engine), the forward pass is an interpreter
over the architecture's DAG, and one ``torch.autograd.grad`` of the summed per-model mean cross-entropy
gives every model its own gradient. It computes what :func:`wsnets.functional.forward` computes in
training mode (tested to float tolerance), with one difference in how values are laid out:

* convolution feature maps stay in the *grouped layout* ``[B, K*C, *S]`` (models' channels side by
  side, ``B`` samples per model), the layout a grouped convolution with ``groups=K`` reads and writes.
  So a convolution needs no transposes, and BatchNorm of ``K`` models is one ``F.batch_norm`` over
  ``K*C`` channels (per-model, per-channel batch statistics; running statistics updated in place
  through a view of the ``[K, C]`` buffers): one fused kernel forward and one backward instead of the
  ~10 elementwise passes of a batched BatchNorm written out, which were two thirds of a small ResNet's
  step. Activations, residual additions and pooling run on this layout unchanged;
* everything else uses the interpreter's layout ``[K, B, ...]`` and :func:`wsnets.functional._dag_op`
  (linear layers as ``baddbmm``, LayerNorm), except that attention is one call of PyTorch's fused
  ``scaled_dot_product_attention`` over ``K*B*heads`` (the interpreter writes attention out, for
  double backward and vmap, which training does not need) and self-attention's input projection
  (``nn.MultiheadAttention``) is one ``baddbmm`` for q, k and v together instead of three.

A value changes layout where an operation needs the other (global pooling into the linear head, a
patch embedding's tokens): one transpose of a small tensor. Dropout after hidden activations is
per model (``dropout [K]`` rates), drawn from the group's generator.

Evaluation (the recorded metrics) runs :func:`wsnets.functional.forward` in eval mode, the function
:meth:`WeightSpace.to_module` rebuilds, as the autograd engine does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..arch import Architecture, Layer
from ..functional import _attention, _dag_op, _dropout, _needed_until
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
                  dropout: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training-mode logits ``[K, B, out]`` of ``K`` models on their own batches ``x [K, B, *input_shape]``
    (BatchNorm with batch statistics, its running statistics in ``params`` updated in place; dropout
    ``[K]`` after every hidden activation). The same function as ``wsnets.functional.forward(arch,
    params, x, train=True, dropout=dropout)``; see the module docstring for the layouts."""
    K = x.shape[0]
    vals: list = []
    keep_until = _needed_until(arch)
    last = len(arch.layers) - 1
    for i, (l, ins) in enumerate(zip(arch.layers, arch.inputs)):
        xs = [x if j < 0 else vals[j] for j in ins]
        h = _op(l, xs, params, K, generator)
        if l.kind == "act" and dropout is not None and i < last:
            h = _dropout(_to_k(h, K), dropout, generator)
        vals.append(h)
        for j in keep_until[i]:
            if j != i:
                vals[j] = None
    return _to_k(vals[last], K)


def _op(l: Layer, xs: list, params: dict[str, torch.Tensor], K: int, generator: torch.Generator | None):
    k = l.kind
    if k in ("conv1d", "conv2d"):
        h = _to_g(xs[0], K)
        w = params[l.key("weight")]
        b = params.get(l.key("bias"))
        conv = F.conv1d if k == "conv1d" else F.conv2d
        return _G(conv(h, w.reshape(K * l.out_features, *w.shape[2:]), None if b is None else b.reshape(-1),
                       l.stride, l.padding, l.dilation, K))
    if k == "batchnorm" and l.momentum is not None and (isinstance(xs[0], _G) or xs[0].dim() == 3):
        h = _to_g(xs[0], K)
        w, b = (params[l.key("weight")].reshape(-1), params[l.key("bias")].reshape(-1)) if l.affine else (None, None)
        rm, rv = params[l.key("running_mean")], params[l.key("running_var")]
        return _G(F.batch_norm(h, rm.view(-1), rv.view(-1), w, b, True, l.momentum, l.eps))
    if isinstance(xs[0], _G):
        h = xs[0].t
        if k in _ELEMENTWISE and not (k == "dropout" and l.p > 0):
            return _G(_dag_op(l, [h], params, K, True, generator, "train", None)) if k != "dropout" else xs[0]
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
        return _attention(*xs, l.heads, l.mode == "causal", l.value, fused=True)
    return _dag_op(l, xs, params, K, True, generator, "train", None)


def _self_attention(l: Layer, h: torch.Tensor, params: dict[str, torch.Tensor], K: int) -> torch.Tensor:
    """``nn.MultiheadAttention(h, h, h)`` of ``K`` models, the q/k/v projection as one ``baddbmm``."""
    D = l.out_features
    lead = h.shape[:-1]
    h2 = h.reshape(K, -1, D)
    w = params[l.key("in_proj_weight")].transpose(1, 2)                                   # [K, D, 3D]
    b = params.get(l.key("in_proj_bias"))
    qkv = torch.bmm(h2, w) if b is None else torch.baddbmm(b[:, None], h2, w)             # [K, B*T, 3D]
    q, k, v = (t.reshape(*lead, D) for t in qkv.split(D, dim=-1))
    o = _attention(q, k, v, l.heads, fused=True).reshape(K, -1, D)
    wo, bo = params[l.key("out_proj.weight")].transpose(1, 2), params.get(l.key("out_proj.bias"))
    y = torch.bmm(o, wo) if bo is None else torch.baddbmm(bo[:, None], o, wo)
    return y.reshape(*lead, D)


class DAGEngine(_AutogradEngine):
    """The autograd engine with :func:`train_forward` as its training forward pass."""

    def grads(self, fidx: torch.Tensor, yb: torch.Tensor) -> list[torch.Tensor]:
        xb = self.x.index_select(0, fidx.reshape(-1)).reshape(*fidx.shape, *self.shape)
        logits = train_forward(self.arch, self.params(self.theta), xb, dropout=self.drop, generator=self.gen)
        loss = F.cross_entropy(logits.transpose(1, 2), yb, reduction="sum") / self.batch_size
        return list(torch.autograd.grad(loss, [self.theta]))
