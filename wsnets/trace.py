"""Read any traceable ``nn.Module`` into an :class:`~wsnets.arch.Architecture` (a DAG of canonical ops).

:func:`trace` runs ``torch.fx`` with a tracer that keeps the layers wsnets knows (Linear, Conv, norms,
Embedding, MultiheadAttention, activations, pooling...) as leaves, runs the traced graph once on an
example input to learn every value's shape, and converts the graph into the canonical vocabulary of
:mod:`wsnets.arch`:

* leaf modules become their layer (named by their module path, so state-dict keys match); a
  user-written layer is traced into, and ``F.linear``/``F.conv1d``/``F.conv2d`` on parameters named
  ``<layer>.weight`` (and ``<layer>.bias``) become that Linear/Conv layer;
* parameters used directly (``self.cls_token``, ``self.pos_embed``) become ``param`` layers;
* ``+``/``*`` between tensors become ``add``/``mul``, a tensor times or over a constant ``scale``;
  ``torch.cat`` ``concat``; ``.flatten(1)``/``.view(N, -1)`` ``flatten``; ``x.flatten(2).transpose(1, 2)``
  ``tokens``; ``x.mean(1)``/``x[:, 0]`` ``mean``/``select``; a spatial mean ``gap`` (+ ``flatten``);
* attention in any of three spellings becomes one ``attention`` op on its q, k, v: hand-written
  (``view``/``transpose`` into heads, ``q @ k.transpose(-1, -2)``, scaling, ``softmax``, ``@ v``, heads
  merged), ``F.scaled_dot_product_attention`` on split heads, and ``nn.MultiheadAttention`` (kept as an
  ``mha`` layer because its q/k/v weights are one tensor); ``nn.TransformerEncoderLayer`` and
  ``nn.TransformerEncoder`` are read through their documented (non-fast-path) computation;
* values that do not depend on the input or the weights (shapes, ``torch.arange`` position ids, all-zero
  masks) are constants: an ``nn.Embedding`` looked up at positions ``0..T-1`` becomes a positional
  embedding, at all zeros a ``"zeros"`` (token type) embedding.

Where ``torch.fx`` fails (Python control flow on shapes, say), ``torch.export`` is tried instead and
its ATen graph is converted by the same rules. A module neither can trace (data-dependent control flow)
is refused with one line naming the module and the op; an op outside the vocabulary is named with where
it occurs (``aten.xyz at 'layer3.1'``). Finally the architecture's own forward
(:func:`wsnets.functional.forward`) is compared with the module on the example input, so a conversion
can never be silently wrong.
"""

from __future__ import annotations

import math
import operator
from dataclasses import replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from .arch import Architecture, Layer
from .errors import ShapeMismatchError, UnsupportedLayerError

_ACT_MODULES = {
    nn.ReLU: "relu", nn.GELU: "gelu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.LeakyReLU: "leaky_relu",
    nn.ELU: "elu", nn.SiLU: "silu", nn.Softplus: "softplus", nn.Identity: "identity",
}
_ACT_FUNCS = {
    F.relu: "relu", torch.relu: "relu", F.gelu: "gelu", torch.tanh: "tanh", F.tanh: "tanh",
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.silu: "silu", F.elu: "elu", F.softplus: "softplus",
    F.leaky_relu: "leaky_relu",
}
_ACT_METHODS = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid", "relu_": "relu", "tanh_": "tanh",
                "sigmoid_": "sigmoid"}
_PASS_METHODS = ("contiguous", "clone", "float", "to", "type_as", "expand", "expand_as", "detach")
_LEAVES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm,
           nn.RMSNorm, nn.Embedding, nn.MultiheadAttention, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
           nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
           nn.Flatten, *_ACT_MODULES)


def _tup(v, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * n


def layer_from_module(name: str, m: nn.Module) -> Layer:
    """The canonical layer of one known leaf module (raises naming an unknown one)."""
    where = f"{type(m).__name__} at {name!r}"
    if isinstance(m, nn.Linear):
        return Layer("linear", name, m.in_features, m.out_features, bias=m.bias is not None)
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        d = 1 if isinstance(m, nn.Conv1d) else 2
        if m.groups != 1:
            raise UnsupportedLayerError(f"{where}: grouped convolution (groups={m.groups})")
        if isinstance(m.padding, str):
            if m.padding == "same" and all(k % 2 == 1 for k in m.kernel_size):
                pad = tuple((k - 1) * dl // 2 for k, dl in zip(m.kernel_size, m.dilation))
            elif m.padding == "valid":
                pad = (0,) * d
            else:
                raise UnsupportedLayerError(f"{where}: padding={m.padding!r} with an even kernel")
        else:
            pad = _tup(m.padding, d)
        if m.padding_mode != "zeros":
            raise UnsupportedLayerError(f"{where}: padding_mode={m.padding_mode!r}")
        return Layer(f"conv{d}d", name, m.in_channels, m.out_channels, kernel_size=_tup(m.kernel_size, d),
                     stride=_tup(m.stride, d), padding=pad, dilation=_tup(m.dilation, d), bias=m.bias is not None,
                     dims=d)
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if not m.track_running_stats:
            raise UnsupportedLayerError(f"{where}: track_running_stats=False (no eval-mode statistics)")
        return Layer("batchnorm", name, m.num_features, m.num_features, affine=m.affine, eps=m.eps,
                     momentum=m.momentum, dims=2 if isinstance(m, nn.BatchNorm2d) else 0)
    if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
        shape = tuple(m.normalized_shape)
        if len(shape) != 1:
            raise UnsupportedLayerError(f"{where}: normalized_shape={shape} (only the last dim)")
        if isinstance(m, nn.LayerNorm):
            return Layer("layernorm", name, shape[0], shape[0], affine=m.elementwise_affine, eps=m.eps,
                         bias=m.bias is not None)
        return Layer("rmsnorm", name, shape[0], shape[0], affine=m.elementwise_affine, eps=m.eps or 0.0)
    if isinstance(m, nn.GroupNorm):
        return Layer("groupnorm", name, m.num_channels, m.num_channels, affine=m.affine, eps=m.eps,
                     heads=m.num_groups)
    if isinstance(m, nn.Embedding):
        if m.max_norm is not None:
            raise UnsupportedLayerError(f"{where}: max_norm={m.max_norm} renormalizes weights at lookup")
        return Layer("embedding", name, m.num_embeddings, m.embedding_dim, bias=False)
    if isinstance(m, nn.MultiheadAttention):
        if not m.batch_first:
            raise UnsupportedLayerError(f"{where}: batch_first=False (wsnets reads [N, T, D] attention)")
        if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
            raise UnsupportedLayerError(f"{where}: kdim/vdim, add_bias_kv or add_zero_attn")
        return Layer("mha", name, m.embed_dim, m.embed_dim, bias=m.in_proj_bias is not None, heads=m.num_heads)
    for cls, fn in _ACT_MODULES.items():
        if type(m) is cls:
            if isinstance(m, nn.GELU) and m.approximate != "none":
                raise UnsupportedLayerError(f"{where}: approximate={m.approximate!r}")
            return Layer("act", fn=fn, slope=m.negative_slope if isinstance(m, nn.LeakyReLU) else 0.01)
    if isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d)):
        return Layer("dropout", p=float(m.p))
    if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        d = 1 if isinstance(m, nn.AdaptiveAvgPool1d) else 2
        if any(s != 1 for s in _tup(m.output_size, d)):
            raise UnsupportedLayerError(f"{where}: output_size={m.output_size} (only global pooling to 1)")
        return Layer("gap", dims=d)
    if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)):
        d = 1 if isinstance(m, (nn.MaxPool1d, nn.AvgPool1d)) else 2
        kind = "maxpool" if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)) else "avgpool"
        if getattr(m, "ceil_mode", False) or (kind == "maxpool" and _tup(m.dilation, d) != (1,) * d):
            raise UnsupportedLayerError(f"{where}: ceil_mode or dilation")
        if kind == "avgpool" and not m.count_include_pad:
            raise UnsupportedLayerError(f"{where}: count_include_pad=False")
        k = _tup(m.kernel_size, d)
        return Layer(kind, kernel_size=k, stride=_tup(m.stride or k, d), padding=_tup(m.padding, d), dims=d)
    if isinstance(m, nn.Flatten):
        if m.start_dim != 1 or m.end_dim != -1:
            raise UnsupportedLayerError(f"{where}: start_dim={m.start_dim}, end_dim={m.end_dim}")
        return Layer("flatten")
    raise UnsupportedLayerError(f"unsupported layer {where}")


# -- tracing --------------------------------------------------------------------------------------
def _encoder_layer_forward(m: nn.TransformerEncoderLayer, src, src_mask=None, src_key_padding_mask=None,
                           is_causal=False):
    """``nn.TransformerEncoderLayer``'s documented computation (its slow path), traceable."""
    if src_mask is not None or src_key_padding_mask is not None:
        raise UnsupportedLayerError("TransformerEncoderLayer with masks")
    act = m.activation
    if not (act is F.relu or act is F.gelu or isinstance(act, (nn.ReLU, nn.GELU))):
        raise UnsupportedLayerError(f"TransformerEncoderLayer activation {act}")

    def sa(x):
        return m.dropout1(m.self_attn(x, x, x, need_weights=False)[0])

    def ff(x):
        return m.dropout2(m.linear2(m.dropout(act(m.linear1(x)))))
    x = src
    if m.norm_first:
        x = x + sa(m.norm1(x))
        return x + ff(m.norm2(x))
    x = m.norm1(x + sa(x))
    return m.norm2(x + ff(x))


def _encoder_forward(m: nn.TransformerEncoder, src, mask=None, src_key_padding_mask=None, is_causal=None):
    """``nn.TransformerEncoder``'s documented computation: its layers in turn, then its norm."""
    if mask is not None or src_key_padding_mask is not None:
        raise UnsupportedLayerError("TransformerEncoder with masks")
    x = src
    for layer in m.layers:
        x = layer(x)
    return m.norm(x) if m.norm is not None else x


_ENCODERS = {nn.TransformerEncoderLayer: _encoder_layer_forward, nn.TransformerEncoder: _encoder_forward}


def _encoder_fn(m: nn.Module) -> Callable | None:
    return next((fn for cls, fn in _ENCODERS.items() if isinstance(m, cls)), None)


class _Tracer(fx.Tracer):
    """Known layers (and any module without children) are leaves; the module path stack is kept for errors."""

    def __init__(self) -> None:
        super().__init__()
        self.path: list[tuple[str, str]] = []
        self.failed_in: tuple[str, str] | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if _encoder_fn(m) is not None:
            return False
        # torch's own layers with tensors that wsnets does not know (an LSTM) stay leaves and are refused by
        # name; parameter-free helper modules and user-written layers (F.linear on self.weight) are traced
        return isinstance(m, _LEAVES) or (type(m).__module__.startswith("torch.") and
                                          not any(True for _ in m.children()) and
                                          any(True for _ in m.parameters(recurse=False)))

    def call_module(self, m: nn.Module, forward: Callable, args, kwargs):
        qual = self.path_of_module(m)
        self.path.append((qual, type(m).__name__))
        try:
            if _encoder_fn(m) is not None:
                return _encoder_fn(m)(m, *args, **kwargs)
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path[-1]
            raise
        finally:
            self.path.pop()


class _EncoderLayerRoot(nn.Module):
    """A traced root that is an ``nn.TransformerEncoderLayer`` or ``nn.TransformerEncoder``: the same
    children, its documented forward."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self._modules = m._modules
        self._fn = _encoder_fn(m)
        if isinstance(m, nn.TransformerEncoderLayer):
            self.norm_first, self.activation = m.norm_first, m.activation
        else:
            self.norm = m.norm   # a plain attribute when None

    def forward(self, src: torch.Tensor) -> torch.Tensor:
        return self._fn(self, src)


def _fx_graph(module: nn.Module) -> fx.GraphModule:
    import inspect
    if _encoder_fn(module) is not None:
        module = _EncoderLayerRoot(module)
    tracer = _Tracer()
    sig = inspect.signature(module.forward)
    names = list(sig.parameters)
    concrete = {n: p.default for n, p in list(sig.parameters.items())[1:] if p.default is not inspect.Parameter.empty}
    if len(names) - len(concrete) != 1:
        raise UnsupportedLayerError(f"{type(module).__name__}.forward takes {len(names) - len(concrete)} required "
                                    "inputs; wsnets reads modules with one input tensor")
    try:
        graph = tracer.trace(module, concrete_args=concrete or None)
    except UnsupportedLayerError:
        raise
    except Exception as e:  # fx raises TraceError, TypeError, ... from user code
        where = tracer.failed_in or ("", type(module).__name__)
        last = list(tracer.graph.nodes)[-1] if tracer.graph is not None and len(tracer.graph.nodes) else None
        op = f"{last.op} {_target_name(last.target)}" if last is not None else "forward"
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _TraceFailure(f"{where[1]} at {where[0]!r}: cannot be traced after {op} ({msg})") from None
    return fx.GraphModule(tracer.root, graph)


class _TraceFailure(Exception):
    pass


def _target_name(t: Any) -> str:
    if isinstance(t, str):
        return t
    mod = getattr(t, "__module__", "") or ""
    name = getattr(t, "__name__", repr(t))
    if str(t).startswith("aten."):
        return str(t).rsplit(".", 1)[0] if str(t).count(".") > 1 else str(t)
    return f"{mod.replace('torch._C._nn', 'F').replace('torch.nn.functional', 'F')}.{name}" if mod else name


def example_input(module: nn.Module | None, input_shape: tuple[int, ...] | None, n: int = 2, *,
                  ids_vocab: int | None = None, seed: int = 0) -> torch.Tensor:
    """A random example input: float ``[n, *input_shape]``, or token ids if the network starts with an
    embedding. Without ``input_shape`` it is guessed from the first Linear/Conv/Embedding."""
    g = torch.Generator().manual_seed(seed)
    first = None
    if module is not None:
        first = next((m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding,
                                                                    nn.MultiheadAttention))), None)
        if isinstance(first, nn.Embedding):
            ids_vocab = first.num_embeddings
    if input_shape is None:
        if isinstance(first, nn.Conv2d):
            input_shape = (first.in_channels, 8, 8)
        elif isinstance(first, nn.Conv1d):
            input_shape = (first.in_channels, 16)
        elif isinstance(first, nn.Linear):
            input_shape = (first.in_features,)
        elif isinstance(first, nn.Embedding):
            input_shape = (8,)
        elif isinstance(first, nn.MultiheadAttention):
            input_shape = (6, first.embed_dim)
        else:
            raise ShapeMismatchError("cannot guess an input shape; pass input_shape=")
    if ids_vocab is not None:
        return torch.randint(0, ids_vocab, (n, *input_shape), generator=g)
    dtype = next(iter(module.parameters()), torch.empty(0)).dtype if module is not None else torch.float32
    return torch.randn((n, *input_shape), generator=g).to(dtype if dtype.is_floating_point else torch.float32)


def trace(module: nn.Module, input_shape: tuple[int, ...] | None = None, *,
          example: torch.Tensor | None = None, check: bool = True) -> Architecture:
    """The :class:`Architecture` of ``module`` (see the module docstring).

    ``input_shape`` (without the batch dim) or ``example`` (a batch) sets the input the graph is run on;
    without either, the module's own ``input_shape`` attribute if it has one, else a guess from its first
    layer. A sequential MLP gets ``input_shape = (in,)`` and a
    sequential CNN none unless given, as they always had.
    """
    if type(module).forward is nn.Module.forward:
        for name, m in module.named_modules():
            if not any(True for _ in m.children()) and not isinstance(m, _LEAVES):
                raise UnsupportedLayerError(f"unsupported layer {type(m).__name__} at {name!r}")
        raise UnsupportedLayerError(f"{type(module).__name__} has no forward()")
    if isinstance(module, _LEAVES) or not any(True for _ in module.children()):
        module = nn.Sequential(module)  # a bare layer: name it "0" as a one-layer Sequential would
    if input_shape is None and example is None and isinstance(getattr(module, "input_shape", None), (tuple, list)):
        input_shape = tuple(module.input_shape)   # a module may say what it reads
    if example is None:
        example = example_input(module, input_shape)
    was = module.training
    module.eval()
    try:
        if isinstance(module, nn.Sequential):  # a chain of known layers: its shapes are checked layer by layer
            chain = _sequential_layers(module)
            if chain is not None:
                Architecture(tuple(chain), None)
        try:
            gm = _fx_graph(module)
            arch = _Converter(gm, example, fx_mode=True).run()
        except _TraceFailure as fx_error:
            try:
                gm = _export_graph(module, example)
            except Exception:
                raise UnsupportedLayerError(f"{fx_error}; torch.export fails too (data-dependent control flow?): "
                                            "give the architecture with --arch arch.json") from None
            arch = _Converter(gm, example, fx_mode=False).run()
        if arch.is_chain:
            arch = Architecture(arch.layers, input_shape if input_shape is not None else _mlp_input(arch.layers))
        else:
            arch = Architecture(arch.layers, tuple(example.shape[1:]))
        _refuse_tied(module, arch)
        if check:
            _check_same(module, arch, example)
        from .symmetry import permutation_spec
        permutation_spec(arch)   # a network whose symmetry cannot be derived is refused here, naming the op
    finally:
        module.train(was)
    return arch


def _sequential_layers(module: nn.Module, prefix: str = "") -> list[Layer] | None:
    """The layers of nested ``nn.Sequential``s of known leaves, or None if anything else is inside."""
    out: list[Layer] = []
    for name, m in module.named_children():
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(m, nn.Sequential):
            sub = _sequential_layers(m, full)
            if sub is None:
                return None
            out += sub
        elif isinstance(m, _LEAVES) and not isinstance(m, (nn.Embedding, nn.MultiheadAttention)):
            l = layer_from_module(full, m)
            out.append(l if l.has_params else replace(l, name=""))
        else:
            return None
    return out


def _mlp_input(layers) -> tuple[int, ...] | None:
    first = next((l for l in layers if l.is_weight or l.kind == "flatten"), None)
    return (first.in_features,) if first is not None and first.kind == "linear" else None


def _refuse_tied(module: nn.Module, arch: Architecture) -> None:
    """One Parameter under two state-dict keys (weight tying) is refused: the spec would permute the two
    keys independently, and a permuted or aligned network could not be loaded back into the module."""
    first: dict[int, str] = {}
    for key, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first and key in arch.param_shapes and first[id(p)] in arch.param_shapes:
            raise UnsupportedLayerError(f"{type(module).__name__}: {key!r} is the same tensor as {first[id(p)]!r} "
                                        "(tied weights); wsnets treats each state-dict key as its own tensor, so "
                                        "permuting or merging would untie them: give each its own copy")
        first.setdefault(id(p), key)


def _check_same(module: nn.Module, arch: Architecture, example: torch.Tensor) -> None:
    from .functional import forward
    sd = module.state_dict()
    missing = [k for k in arch.param_shapes if k not in sd]
    if missing:
        raise UnsupportedLayerError(f"{type(module).__name__}: traced tensor {missing[0]!r} is not in its state_dict")
    with torch.no_grad():
        want = module(example)
        got = forward(arch, {k: sd[k].unsqueeze(0) for k in arch.param_shapes}, example)[0]
    if not isinstance(want, torch.Tensor) or want.shape != got.shape or not torch.allclose(
            want.to(got.dtype), got, rtol=1e-4, atol=1e-5 * max(1.0, want.abs().max().item())):
        diff = (want - got).abs().max().item() if isinstance(want, torch.Tensor) and want.shape == got.shape else "shape"
        raise UnsupportedLayerError(f"{type(module).__name__}: the traced architecture does not compute the module's "
                                    f"function (max |difference| {diff}); an op wsnets misreads?")


# -- conversion -----------------------------------------------------------------------------------
class _V:
    """What an fx value is to the converter."""
    __slots__ = ("kind", "idx", "data")

    def __init__(self, kind: str, idx: int = -2, **data: Any) -> None:
        self.kind, self.idx, self.data = kind, idx, data


class _Converter:
    def __init__(self, gm: fx.GraphModule, example: torch.Tensor, fx_mode: bool) -> None:
        self.gm, self.example, self.fx_mode = gm, example, fx_mode
        self.layers: list[Layer] = []
        self.ins: list[tuple[int, ...]] = []
        self.shapes: list[tuple[int, ...]] = []
        self.values: dict[fx.Node, Any] = {}
        self.params = dict(gm.named_parameters()) if fx_mode else dict(getattr(gm, "_wsnets_params", {}))
        self.buffers = dict(gm.named_buffers())
        self.lifted: dict[str, str] = getattr(gm, "_wsnets_lifted", {})

    # layers -------------------------------------------------------------------------------------
    def emit(self, layer: Layer, inputs: list[int], shape: tuple[int, ...]) -> _V:
        self.layers.append(layer)
        self.ins.append(tuple(inputs))
        self.shapes.append(tuple(shape))
        return _V("t", len(self.layers) - 1)

    def shape_of(self, v: _V) -> tuple[int, ...]:
        return tuple(self.example.shape) if v.idx == -1 else self.shapes[v.idx]

    def where(self, node: fx.Node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        if not isinstance(path, str):
            path = str(path)
        return path.replace("L['self'].", "").replace("L__self___", "")

    def unknown(self, node: fx.Node, what: str | None = None) -> UnsupportedLayerError:
        name = what or (f"{node.op} {_target_name(node.target)}" if self.fx_mode else _target_name(node.target))
        return UnsupportedLayerError(f"unknown op {name} at {self.where(node)!r}")

    def run(self) -> Architecture:
        interp = _Recorder(self.gm, self.values, tuple(self.example.shape))
        with torch.no_grad():
            try:
                interp.run(self.example) if self.fx_mode else interp.run(*self._export_inputs())
            except ShapeMismatchError as e:   # torch.fx appends "While executing ..." lines to the message
                raise ShapeMismatchError(str(e).splitlines()[0]) from None
        env: dict[fx.Node, _V] = {}
        depends = self._depends()
        out_v = None
        for node in self.gm.graph.nodes:
            if node.op == "output":
                res = node.args[0]
                if isinstance(res, (tuple, list, dict)) and len(res) != 1 or isinstance(res, dict):
                    raise UnsupportedLayerError(
                        f"forward returns a {'dict' if isinstance(res, dict) else type(res).__name__} of {len(res)} outputs; wsnets reads modules that "
                        "return one tensor "
                        "(wrap it in a module that returns the logits)")
                out_v = self.arg(env, res[0] if isinstance(res, (tuple, list)) else res)
                break
            if node.op == "placeholder":
                env[node] = self._placeholder(node)
                continue
            if node not in depends:
                env[node] = _V("const", value=self.values.get(node))
                continue
            env[node] = self.convert(node, env)
        if out_v is None or out_v.kind != "t" or out_v.idx < 0:
            raise UnsupportedLayerError("the module's output is not a tensor computed by its layers")
        return self._finish(out_v.idx)

    def _placeholder(self, node: fx.Node) -> _V:
        if self.fx_mode or node.name == self._user_input:
            return _V("t", -1)
        fqn = self.lifted.get(node.name)
        if fqn in self.params:
            return _V("weight", fqn=fqn)
        return _V("const", value=self.values.get(node))

    def _depends(self) -> set:
        """Nodes whose value depends on the input's values or on a parameter (the rest are constants:
        shapes, position ids, ``zeros_like`` token types, masks)."""
        dep: set = set()
        for node in self.gm.graph.nodes:
            if node.target in _SHAPE_ONLY:
                continue
            if node.op == "placeholder":
                if self.fx_mode or node.name == self._user_input or self.lifted.get(node.name) in self.params:
                    dep.add(node)
            elif node.op == "call_module":
                dep.add(node)
            elif node.op == "get_attr":
                if node.target in self.params:
                    dep.add(node)
            elif any(a in dep and isinstance(self.values.get(a), (torch.Tensor, tuple)) for a in node.all_input_nodes):
                dep.add(node)
        return dep

    def _finish(self, out: int) -> Architecture:
        """Drop layers the output does not need, renumber, and store default inputs as ``()``."""
        need = {out}
        for i in range(out, -1, -1):
            if i in need:
                need.update(j for j in self.ins[i] if j >= 0)
        keep = sorted(need)
        new = {old: k for k, old in enumerate(keep)}
        new[-1] = -1
        layers = []
        for k, old in enumerate(keep):
            ins = tuple(new[j] for j in self.ins[old])
            l = self.layers[old]
            layers.append(replace(l, inputs=() if ins == (k - 1,) else ins))
        return Architecture(tuple(layers), tuple(self.example.shape[1:]))

    # values -------------------------------------------------------------------------------------
    def arg(self, env: dict, a: Any) -> _V:
        if isinstance(a, fx.Node):
            return env[a]
        return _V("const", value=a)

    def tensor(self, env: dict, node: fx.Node, a: Any) -> _V:
        v = self.arg(env, a)
        if v.kind == "weight":
            t = self.params[v.data["fqn"]]
            return self.emit(Layer("param", v.data["fqn"], shape=tuple(t.shape)), [], tuple(t.shape))
        if v.kind != "t":
            raise self.unknown(node)
        return v

    def convert(self, node: fx.Node, env: dict) -> _V:
        if node.op == "call_module":
            return self.module(node, env)
        if node.op == "get_attr":
            t = self.params[node.target]
            return self.emit(Layer("param", node.target, shape=tuple(t.shape)), [], tuple(t.shape))
        name = node.target if node.op == "call_method" else _canon_fn(node.target)
        args = list(node.args)
        return _OPS.get(name, _op_unknown)(self, node, env, args, dict(node.kwargs))

    def module(self, node: fx.Node, env: dict) -> _V:
        m = self.gm.get_submodule(node.target)
        layer = layer_from_module(node.target, m)
        if layer.kind not in ("mha", "embedding") and not layer.has_params:
            layer = replace(layer, name="")
        out = self.values[node]
        if layer.kind == "dropout" and self.arg(env, node.args[0]).kind != "t":
            return self.arg(env, node.args[0])  # dropout on attention probabilities: identity in eval
        if layer.kind == "embedding":
            ids = self.arg(env, node.args[0])
            if ids.kind == "const":
                return self.const_embedding(node, layer, ids.data["value"])
            return self.emit(layer, [self.tensor(env, node, node.args[0]).idx], out.shape)
        if layer.kind == "mha":
            kw = dict(node.kwargs)
            for k in ("key_padding_mask", "attn_mask"):
                if kw.get(k) is not None:
                    raise self.unknown(node, f"MultiheadAttention {k}")
            if kw.get("is_causal"):
                raise self.unknown(node, "MultiheadAttention is_causal")
            qkv = [self.tensor(env, node, a).idx for a in node.args[:3]]
            ins = qkv[:1] if len(set(qkv)) == 1 else qkv
            v = self.emit(layer, ins, out[0].shape)
            return _V("tuple", items=[v, _V("const", value=None)])
        return self.emit(layer, [self.tensor(env, node, node.args[0]).idx], out.shape)

    def const_embedding(self, node: fx.Node, layer: Layer, ids: torch.Tensor) -> _V:
        ids = torch.as_tensor(ids)
        T = ids.shape[-1]
        flat = ids.reshape(-1, T)
        if bool((flat == torch.arange(T)).all()):
            mode = "positions"
        elif bool((flat == 0).all()):
            mode = "zeros"
        else:
            raise self.unknown(node, "Embedding of constant ids that are neither positions 0..T-1 nor zeros")
        ref = next(((j, s) for j, s in [(-1, tuple(self.example.shape))] + [(i, self.shapes[i]) for i in
                    range(len(self.layers) - 1, -1, -1)] if len(s) >= 2 and s[1] == T), None)
        if ref is None:
            raise self.unknown(node, f"positional Embedding over {T} positions that no input axis has")
        j, s = ref
        N = self.example.shape[0]
        return self.emit(replace(layer, mode=mode, dim=1 - len(s)), [j], (N, T, layer.out_features))


_SHAPE_ONLY = (torch.zeros_like, torch.ones_like, torch.arange, "size", "dim", "new_zeros", "new_ones")


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, store: dict, example_shape=()) -> None:
        super().__init__(gm)
        self.store = store
        self.example_shape = example_shape[1:]

    def run_node(self, n: fx.Node) -> Any:
        try:
            out = super().run_node(n)
        except Exception as e:
            stack = n.meta.get("nn_module_stack") or {}
            path = n.target if n.op == "call_module" else (list(stack.values())[-1][0] if stack else "")
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ShapeMismatchError(f"running the module on an example input {tuple(self.example_shape)} fails at "
                                     f"{path!r} ({msg}): give the input shape (wsnets.load(..., input_shape=...), or "
                                     "an input_shape attribute on the module)") from None
        self.store[n] = out
        return out


def _canon_fn(t: Any) -> str:
    """A name for a call_function target shared by the fx and the ATen spellings."""
    if t in (operator.add, operator.iadd, torch.add):
        return "add"
    if t in (operator.mul, operator.imul, torch.mul):
        return "mul"
    if t in (operator.truediv, operator.itruediv, torch.div):
        return "div"
    if t in (operator.sub, operator.isub, torch.sub):
        return "sub"
    if t in (operator.neg, torch.neg):
        return "neg"
    if t in (operator.matmul, torch.matmul, torch.bmm):
        return "matmul"
    if t is operator.getitem:
        return "getitem"
    if t in (torch.cat, torch.concat):
        return "cat"
    if t is torch.flatten:
        return "flatten"
    if t in (torch.mean,):
        return "mean"
    if t in (torch.softmax, F.softmax):
        return "softmax"
    if t in (torch.transpose,):
        return "transpose"
    if t in (torch.permute,):
        return "permute"
    if t in (torch.reshape,):
        return "reshape"
    if t in (F.dropout, torch.dropout):
        return "dropout"
    if t is F.scaled_dot_product_attention:
        return "sdpa"
    if t is F.linear:
        return "aten_linear"
    if t in (F.conv1d, F.conv2d):
        return "aten_conv"
    if t is F.adaptive_avg_pool2d or t is F.adaptive_avg_pool1d:
        return "adaptive_avg_pool"
    if t is getattr:
        return "getattr"
    if t in _ACT_FUNCS:
        return "act:" + _ACT_FUNCS[t]
    s = str(t)
    if s.startswith("aten."):
        return _ATEN.get(s.split(".")[1], s.rsplit(".", 1)[0] if s.count(".") > 1 else s)
    return _target_name(t)


_ATEN = {"add": "add", "mul": "mul", "div": "div", "sub": "sub", "neg": "neg", "matmul": "matmul", "bmm": "matmul", "cat": "cat",
         "flatten": "flatten", "mean": "mean", "softmax": "softmax", "_softmax": "softmax", "transpose": "transpose",
         "permute": "permute", "view": "reshape", "reshape": "reshape", "_unsafe_view": "reshape",
         "dropout": "dropout", "scaled_dot_product_attention": "sdpa", "relu": "act:relu", "gelu": "act:gelu",
         "tanh": "act:tanh", "sigmoid": "act:sigmoid", "silu": "act:silu", "elu": "act:elu", "softplus": "act:softplus",
         "leaky_relu": "act:leaky_relu", "contiguous": "contiguous", "clone": "contiguous", "expand": "expand",
         "select": "aten_select", "slice": "aten_slice", "unsqueeze": "unsqueeze", "linear": "aten_linear",
         "conv1d": "aten_conv", "conv2d": "aten_conv", "embedding": "aten_embedding", "layer_norm": "aten_layer_norm",
         "_native_batch_norm_legit_no_training": "aten_batch_norm", "batch_norm": "aten_batch_norm",
         "adaptive_avg_pool2d": "adaptive_avg_pool", "adaptive_avg_pool1d": "adaptive_avg_pool",
         "max_pool2d": "aten_max_pool", "max_pool1d": "aten_max_pool", "t": "t", "alias": "contiguous",
         "_to_copy": "contiguous", "to": "contiguous", "detach": "contiguous", "lift_fresh_copy": "contiguous"}


def _full_dim(d: int, rank: int) -> int:
    return d - rank if d >= 0 else d


def _op_unknown(c: _Converter, node, env, args, kw):
    raise c.unknown(node)


def _op_pass(c: _Converter, node, env, args, kw):
    return c.arg(env, args[0])


def _op_act(c: _Converter, node, env, args, kw):
    fn = (node.target if node.op == "call_method" else _canon_fn(node.target)).replace("act:", "")
    fn = _ACT_METHODS.get(fn, fn)
    if fn == "gelu" and kw.get("approximate", args[1] if len(args) > 1 else "none") != "none":
        raise c.unknown(node, "gelu(approximate='tanh')")
    slope = 0.01
    if fn == "leaky_relu":
        slope = float(kw.get("negative_slope", args[1] if len(args) > 1 else 0.01))
    v = c.tensor(env, node, args[0])
    return c.emit(Layer("act", fn=fn, slope=slope), [v.idx], c.shape_of(v))


def _op_dropout(c: _Converter, node, env, args, kw):
    v = c.arg(env, args[0])
    if v.kind != "t":  # dropout on attention probabilities and the like: identity in eval
        return v
    p = float(kw.get("p", args[1] if len(args) > 1 else 0.5))
    return c.emit(Layer("dropout", p=p), [v.idx], c.shape_of(v))


def _is_tensor_value(v: _V) -> bool:
    return v.kind in ("t", "weight")


def _op_add(c: _Converter, node, env, args, kw):
    a, b = c.arg(env, args[0]), c.arg(env, args[1])
    if a.kind == "scores" and b.kind == "const" or b.kind == "scores" and a.kind == "const":
        s, m = (a, b) if a.kind == "scores" else (b, a)
        mask = m.data["value"]
        if isinstance(mask, (int, float)) and mask == 0 or isinstance(mask, torch.Tensor) and not mask.any():
            return s
        if isinstance(mask, torch.Tensor) and _is_causal(mask):
            return _V("scores", **{**s.data, "causal": True})
        raise c.unknown(node, "attention mask that is neither zero nor causal")
    if _is_tensor_value(a) and _is_tensor_value(b):
        a, b = c.tensor(env, node, args[0]), c.tensor(env, node, args[1])
        out = tuple(torch.broadcast_shapes(c.shape_of(a), c.shape_of(b)))
        return c.emit(Layer("add"), [a.idx, b.idx], out)
    raise c.unknown(node, f"{_target_name(node.target)} of a tensor and a constant")


def _is_causal(mask: torch.Tensor) -> bool:
    T = mask.shape[-1]
    m = mask.reshape(-1, mask.shape[-2], T)[0]
    upper = torch.ones(m.shape[0], T, dtype=torch.bool).triu(1)
    return bool((m[upper] < -1e4).all() and (m[~upper] == 0).all())


def _scalar(v: _V) -> float | None:
    if v.kind != "const":
        return None
    x = v.data["value"]
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return float(x)
    return None


def _op_mul(c: _Converter, node, env, args, kw, div: bool = False):
    a, b = c.arg(env, args[0]), c.arg(env, args[1])
    sa, sb = _scalar(a), _scalar(b)
    if sa is not None or sb is not None:
        s, v = (sa, b) if sa is not None else (sb, a)
        if div and sa is not None:
            raise c.unknown(node, "a constant divided by a tensor")
        s = 1.0 / s if div else s
        if v.kind in ("heads", "scores"):
            return _V(v.kind, v.idx, **{**v.data, "scale": v.data.get("scale", 1.0) * s})
        t = c.tensor(env, node, v if isinstance(v, fx.Node) else (args[0] if sa is None else args[1]))
        return c.emit(Layer("scale", value=s), [t.idx], c.shape_of(t))
    if div:
        raise c.unknown(node, "division of two tensors")
    if _is_tensor_value(a) and _is_tensor_value(b):
        a, b = c.tensor(env, node, args[0]), c.tensor(env, node, args[1])
        return c.emit(Layer("mul"), [a.idx, b.idx], tuple(torch.broadcast_shapes(c.shape_of(a), c.shape_of(b))))
    raise c.unknown(node)


def _op_div(c, node, env, args, kw):
    return _op_mul(c, node, env, args, kw, div=True)


def _op_neg(c: _Converter, node, env, args, kw):
    v = c.tensor(env, node, args[0])
    return c.emit(Layer("scale", value=-1.0), [v.idx], c.shape_of(v))


def _op_sub(c: _Converter, node, env, args, kw):
    """``a - b`` of two tensors: ``a + (-1) * b`` (a residual with a negated branch)."""
    a, b = c.arg(env, args[0]), c.arg(env, args[1])
    if not (_is_tensor_value(a) and _is_tensor_value(b)) or kw.get("alpha", 1) != 1:
        raise c.unknown(node, f"{_target_name(node.target)} of a tensor and a constant" if not (
            _is_tensor_value(a) and _is_tensor_value(b)) else "sub with alpha")
    a, b = c.tensor(env, node, args[0]), c.tensor(env, node, args[1])
    nb = c.emit(Layer("scale", value=-1.0), [b.idx], c.shape_of(b))
    return c.emit(Layer("add"), [a.idx, nb.idx], tuple(torch.broadcast_shapes(c.shape_of(a), c.shape_of(b))))


def _op_cat(c: _Converter, node, env, args, kw):
    items = args[0]
    dim = kw.get("dim", args[1] if len(args) > 1 else 0)
    vs = [c.tensor(env, node, a) for a in items]
    shapes = [c.values[a].shape for a in items]
    r = len(shapes[0])
    d = _full_dim(dim, r)
    out = tuple(c.values[node].shape)
    return c.emit(Layer("concat", dim=d), [v.idx for v in vs], out)


def _op_reshape(c: _Converter, node, env, args, kw):
    """view/reshape/flatten: a flatten, a head split or merge, or a spatial flatten before ``tokens``."""
    v = c.arg(env, args[0])
    src = tuple(c.values[args[0]].shape)
    out = tuple(c.values[node].shape)
    if out == src:
        return v
    if v.kind == "ctxT" and len(out) == 3 and out[:2] == src[:2]:
        return _emit_attention(c, v, out)
    if v.kind != "t":
        raise c.unknown(node, f"{node.target if node.op == 'call_method' else 'reshape'} of an attention intermediate")
    if len(src) == 3 and len(out) == 4 and out[:2] == src[:2] and out[2] * out[3] == src[2]:
        return _V("split", v.idx, heads=out[2])
    if len(src) >= 4 and len(out) == 3 and out[:2] == src[:2] and out[2] == math.prod(src[2:]):
        return _V("flat2", v.idx)
    if len(out) == 2 and out[0] == src[0]:
        return c.emit(Layer("flatten"), [v.idx], out)
    raise c.unknown(node, f"reshape {list(src[1:])} -> {list(out[1:])}")


def _op_flatten(c: _Converter, node, env, args, kw):
    start = kw.get("start_dim", args[1] if len(args) > 1 else 0)
    return _op_reshape(c, node, env, args, kw) if start in (1, 2) or tuple(c.values[node].shape) != (
        c.values[node].numel(),) else _op_unknown(c, node, env, args, kw)


def _swap(node: fx.Node, args, kw, c: _Converter) -> tuple[int, int] | None:
    """The two axes a transpose/permute swaps (non-negative), or None if it is no single swap."""
    rank = len(c.values[args[0]].shape)
    if (node.target if node.op == "call_method" else _canon_fn(node.target)) in ("transpose",):
        a, b = args[1], args[2]
        return tuple(sorted((a % rank, b % rank)))
    if (node.op == "call_method" and node.target == "t") or _canon_fn(node.target) == "t":
        return (0, 1)
    perm = args[1:] if len(args) > 2 else (args[1] if len(args) > 1 else kw.get("dims"))
    perm = [p % rank for p in perm]
    moved = [i for i, p in enumerate(perm) if p != i]
    if len(moved) == 2 and perm[moved[0]] == moved[1]:
        return tuple(moved)
    return None


def _op_transpose(c: _Converter, node, env, args, kw):
    v = c.arg(env, args[0])
    sw = _swap(node, args, kw, c)
    rank = len(c.values[args[0]].shape)
    if v.kind == "split" and sw == (1, 2):
        return _V("heads", v.idx, heads=v.data["heads"])
    if v.kind == "heads" and sw == (rank - 2, rank - 1):
        return _V("headsT", v.idx, **v.data)
    if v.kind == "ctx" and sw == (1, 2):
        return _V("ctxT", **v.data)
    if v.kind == "flat2" and sw == (1, 2):
        out = tuple(c.values[node].shape)
        return c.emit(Layer("tokens"), [v.idx], out)
    if v.kind == "t" and sw == (0, 1):
        raise c.unknown(node, "transpose of the batch axis (sequence-first attention? wsnets reads batch_first=True "
                              "modules)")
    raise c.unknown(node, f"transpose/permute {sw} of {'a tensor' if v.kind == 't' else 'an attention intermediate'}")


def _op_matmul(c: _Converter, node, env, args, kw):
    a, b = c.arg(env, args[0]), c.arg(env, args[1])
    if a.kind == "heads" and b.kind == "headsT" and a.data["heads"] == b.data["heads"]:
        return _V("scores", q=a.idx, k=b.idx, heads=a.data["heads"],
                  scale=a.data.get("scale", 1.0) * b.data.get("scale", 1.0), causal=False)
    if a.kind == "probs" and b.kind == "heads":
        return _V("ctx", **a.data, v=b.idx)
    raise c.unknown(node, "matmul outside the attention pattern q @ k^T, softmax, @ v")


def _op_softmax(c: _Converter, node, env, args, kw):
    v = c.arg(env, args[0])
    dim = kw.get("dim", args[1] if len(args) > 1 else None)
    if v.kind == "scores" and dim in (-1, 3):
        return _V("probs", **v.data)
    raise c.unknown(node, "softmax outside attention")


def _op_sdpa(c: _Converter, node, env, args, kw):
    q, k, v = (c.arg(env, a) for a in args[:3])
    if not (q.kind == k.kind == v.kind == "heads"):
        raise c.unknown(node, "scaled_dot_product_attention on tensors not split into heads")
    if kw.get("attn_mask", args[3] if len(args) > 3 else None) is not None:
        raise c.unknown(node, "scaled_dot_product_attention with attn_mask")
    d = c.values[args[0]].shape[-1]
    scale = kw.get("scale")
    s = (scale if scale is not None else 1 / math.sqrt(d)) * q.data.get("scale", 1.0) * k.data.get("scale", 1.0)
    return _V("ctx", q=q.idx, k=k.idx, v=v.idx, heads=q.data["heads"], scale=s,
              causal=bool(kw.get("is_causal", args[5] if len(args) > 5 else False)))


def _emit_attention(c: _Converter, v: _V, out: tuple[int, ...]) -> _V:
    d = c.shape_of(_V("t", v.data["q"]))[-1] // v.data["heads"]
    rel = v.data["scale"] * math.sqrt(d)
    rel = 1.0 if abs(rel - 1.0) < 1e-6 else rel
    return c.emit(Layer("attention", heads=v.data["heads"], value=rel, mode="causal" if v.data.get("causal") else ""),
                  [v.data["q"], v.data["k"], v.data["v"]], out)


def _op_mean(c: _Converter, node, env, args, kw):
    v = c.tensor(env, node, args[0])
    dims = kw.get("dim", args[1] if len(args) > 1 else None)
    keep = kw.get("keepdim", args[2] if len(args) > 2 else False)
    src = c.shape_of(v)
    r = len(src)
    dims = tuple(sorted(d % r for d in (dims if isinstance(dims, (tuple, list)) else [dims])))
    layer = c.layers[v.idx] if v.idx >= 0 else None
    spatial = tuple(range(2, r))
    if dims == spatial and r >= 3 and _channels_first(c, v):
        g = c.emit(Layer("gap", dims=r - 2), [v.idx], (*src[:2], *(1,) * (r - 2)))
        return g if keep else c.emit(Layer("flatten"), [g.idx], src[:2])
    if len(dims) == 1 and not keep and r >= 3 and dims[0] != r - 1 and not _channels_first(c, v):
        return c.emit(Layer("mean", dim=dims[0] - r), [v.idx], src[:dims[0]] + src[dims[0] + 1:])
    del layer
    raise c.unknown(node, f"mean over axes {list(dims)} of a {r}-d tensor")


def _channels_first(c: _Converter, v: _V) -> bool:
    """Whether a value is a conv feature map [N, C, *S] (traced back through its producers)."""
    i = v.idx
    while i >= 0:
        l = c.layers[i]
        if l.kind in ("conv1d", "conv2d", "batchnorm", "groupnorm", "maxpool", "avgpool", "gap"):
            return True
        if l.kind in ("linear", "tokens", "embedding", "mha", "attention", "layernorm", "rmsnorm", "param", "flatten"):
            return False
        # an element-wise op with a free tensor (a per-channel scale or bias): follow the computed operand
        ins = [j for j in c.ins[i] if j < 0 or c.layers[j].kind != "param"] or list(c.ins[i])
        i = ins[0] if ins else -1
    return len(c.example.shape) >= 3 and c.example.is_floating_point()


def _op_getitem(c: _Converter, node, env, args, kw):
    v = c.arg(env, args[0])
    idx = args[1]
    if v.kind == "tuple":
        return v.data["items"][idx]
    if v.kind == "const":
        return _V("const", value=c.values.get(node))
    if v.kind == "t":
        src = c.shape_of(v)
        key = idx if isinstance(idx, tuple) else (idx,)
        # x[:, i] / x[:, i, :] : a token select
        if len(key) >= 2 and key[0] == slice(None) and isinstance(key[1], int) and all(
                k == slice(None) or k is Ellipsis for k in key[2:]) and len(src) >= 3:
            return c.emit(Layer("select", dim=1 - len(src), index=key[1]), [v.idx], src[:1] + src[2:])
    raise c.unknown(node, f"indexing {idx!r}")


def _op_getattr(c: _Converter, node, env, args, kw):
    return _V("const", value=c.values.get(node))


def _op_adaptive_pool(c: _Converter, node, env, args, kw):
    v = c.tensor(env, node, args[0])
    size = args[1] if len(args) > 1 else kw.get("output_size")
    src = c.shape_of(v)
    if all(s == 1 for s in _tup(size, len(src) - 2)):
        return c.emit(Layer("gap", dims=len(src) - 2), [v.idx], (*src[:2], *(1,) * (len(src) - 2)))
    raise c.unknown(node, f"adaptive pooling to {size}")


_OPS: dict[str, Callable] = {
    "add": _op_add, "__add__": _op_add, "add_": _op_add, "mul": _op_mul, "__mul__": _op_mul, "div": _op_div,
    "mul_": _op_mul, "div_": _op_div, "sub": _op_sub, "__sub__": _op_sub, "sub_": _op_sub, "neg": _op_neg,
    "__neg__": _op_neg,
    "truediv": _op_div, "__truediv__": _op_div, "cat": _op_cat, "reshape": _op_reshape, "view": _op_reshape,
    "flatten": _op_flatten, "transpose": _op_transpose, "permute": _op_transpose, "t": _op_transpose,
    "matmul": _op_matmul, "__matmul__": _op_matmul, "bmm": _op_matmul, "softmax": _op_softmax, "sdpa": _op_sdpa,
    "mean": _op_mean, "getitem": _op_getitem, "getattr": _op_getattr, "size": _op_getattr, "dim": _op_getattr,
    "dropout": _op_dropout, "adaptive_avg_pool": _op_adaptive_pool,
    **{m: _op_pass for m in _PASS_METHODS}, **{f"act:{a}": _op_act for a in set(_ACT_FUNCS.values())},
    **{m: _op_act for m in _ACT_METHODS},
}


# -- torch.export fallback ------------------------------------------------------------------------
def _export_graph(module: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """An ATen graph from ``torch.export`` whose lifted parameters are named by their state-dict keys."""
    import contextlib
    import io
    import logging
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)   # torch.export logs and prints a failed trace's whole graph: our one line
    try:                               # (naming the module and the op) says what went wrong
        with contextlib.redirect_stderr(io.StringIO()):
            ep = torch.export.export(module, (example,))
            ep = ep.run_decompositions({})
    finally:
        logging.disable(previous)
    gm = ep.graph_module
    sig = ep.graph_signature
    lifted = dict(sig.inputs_to_parameters)
    lifted.update(sig.inputs_to_buffers)
    params = {k: v for k, v in module.named_parameters()}
    root = nn.Module()
    for k, p in params.items():
        _set_param(root, k, p)
    out = fx.GraphModule(root, gm.graph)
    out._wsnets_lifted = lifted
    out._wsnets_user_input = sig.user_inputs[0]
    out._wsnets_state = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    out._wsnets_params = dict(module.named_parameters())
    return out


def _set_param(root: nn.Module, key: str, p: torch.Tensor) -> None:
    *path, leaf = key.split(".")
    m = root
    for part in path:
        if not hasattr(m, part):
            m.add_module(part, nn.Module())
        m = getattr(m, part)
    m.register_parameter(leaf, p if isinstance(p, nn.Parameter) else nn.Parameter(p, requires_grad=False))


def _export_inputs(self: _Converter) -> list[torch.Tensor]:
    state = self.gm._wsnets_state
    out = []
    for node in self.gm.graph.nodes:
        if node.op == "placeholder":
            out.append(self.example if node.name == self._user_input else state[self.lifted[node.name]])
    return out


_Converter._export_inputs = _export_inputs
_Converter._user_input = property(lambda self: getattr(self.gm, "_wsnets_user_input", None))


def _param_name(c: _Converter, v: _V) -> str | None:
    """The state-dict key of a parameter value (a lifted weight, or a traced ``param`` layer)."""
    if v.kind == "weight":
        return v.data["fqn"]
    if v.kind == "t" and v.idx >= 0 and c.layers[v.idx].kind == "param":
        return c.layers[v.idx].name
    return None


def _weight_layer_name(c: _Converter, node, env, w: Any, b: Any, what: str) -> str:
    """``F.linear``/``F.conv*`` on parameters: they must be ``<layer>.weight`` (and ``<layer>.bias``), the keys a
    Linear/Conv layer has, to be read as one."""
    wname = _param_name(c, c.arg(env, w))
    bname = _param_name(c, c.arg(env, b)) if b is not None else None
    if wname is None or not wname.endswith(".weight") or (b is not None and bname != wname[:-len("weight")] + "bias"):
        raise c.unknown(node, f"{what} on tensors that are not parameters named '<layer>.weight' and '<layer>.bias'")
    return wname[:-len(".weight")]


def _op_aten_linear(c: _Converter, node, env, args, kw):
    x = c.tensor(env, node, args[0])
    b = kw.get("bias", args[2] if len(args) > 2 else None)
    name = _weight_layer_name(c, node, env, args[1], b, "linear")
    W = c.params[name + ".weight"]
    out = tuple(c.values[node].shape)
    return c.emit(Layer("linear", name, W.shape[1], W.shape[0], bias=b is not None), [x.idx], out)


def _op_aten_conv(c: _Converter, node, env, args, kw):
    x = c.tensor(env, node, args[0])
    b = kw.get("bias", args[2] if len(args) > 2 else None)
    name = _weight_layer_name(c, node, env, args[1], b, "convolution")
    W = c.params[name + ".weight"]
    d = W.dim() - 2
    stride, padding, dilation, groups = (kw.get(k, args[3 + i] if len(args) > 3 + i else dflt) for i, (k, dflt) in
                                         enumerate([("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1)]))
    if groups != 1 or isinstance(padding, str):
        raise c.unknown(node, "grouped or string-padded convolution")
    return c.emit(Layer(f"conv{d}d", name, W.shape[1], W.shape[0],
                        kernel_size=tuple(W.shape[2:]), stride=_tup(stride, d), padding=_tup(padding, d),
                        dilation=_tup(dilation, d), bias=b is not None, dims=d),
                  [x.idx], tuple(c.values[node].shape))


def _op_aten_layer_norm(c: _Converter, node, env, args, kw):
    x = c.tensor(env, node, args[0])
    w = c.arg(env, args[2]) if len(args) > 2 and args[2] is not None else None
    if w is None or w.kind != "weight":
        raise c.unknown(node, "layer_norm without affine weights")
    eps = args[4] if len(args) > 4 else 1e-5
    n = args[1][-1]
    bias = len(args) > 3 and args[3] is not None
    return c.emit(Layer("layernorm", w.data["fqn"][:-len(".weight")], n, n, eps=float(eps), bias=bias), [x.idx],
                  c.shape_of(x))


def _op_aten_embedding(c: _Converter, node, env, args, kw):
    w = c.arg(env, args[0])
    W = c.params[w.data["fqn"]]
    layer = Layer("embedding", w.data["fqn"][:-len(".weight")], W.shape[0], W.shape[1], bias=False)
    ids = c.arg(env, args[1])
    if ids.kind == "const":
        return c.const_embedding(node, layer, ids.data["value"])
    return c.emit(layer, [c.tensor(env, node, args[1]).idx], tuple(c.values[node].shape))


_OPS.update({"aten_linear": _op_aten_linear, "aten_conv": _op_aten_conv, "aten_layer_norm": _op_aten_layer_norm,
             "aten_embedding": _op_aten_embedding, "expand": _op_pass, "unsqueeze": _op_unknown})
