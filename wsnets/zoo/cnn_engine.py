"""The batched trainer's hand-written engine for small CNNs: conv stacks -> global average pooling ->
linear layers (the Small CNN Zoo's architecture), ``K`` models at once, without autograd.

Layout: activations are channels-last, ``[K, B * Q, C]`` (``Q`` output positions of a layer, row-major),
and a convolution is an im2col gather plus one batched matrix product per layer and direction:

* forward: ``cols [K, B * Q, T * Cin]`` (``T`` kernel taps) times the layer's weight block
  ``[K, T * Cin, Cout]`` (a view of the flat parameter row ``theta [K, P]``);
* backward: the weight gradient ``cols^T @ dz`` and the input gradient ``dz @ W^T`` scattered back
  over the input positions (col2im, a gather-sum over the at most ``ceil(k / s)^d`` windows that read
  a position);
* the first layer's columns are gathered from the dataset once (its im2col is computed when the engine
  is built), a layer whose single window covers its whole input needs no gather at all (the third layer
  of the Small CNN Zoo on 16x16 inputs), and the linear head runs feature-major ``[K, F, B]`` as the
  MLP engine's does (PyTorch's softmax over dim 1 of ``[K, C, B]`` is ~30x faster than over a last dim
  of 10);
* a layer whose ``T * Cin`` is not a multiple of 16 (the first: 9 taps of one channel) has its bias folded
  into the product: its columns end in a constant one, so the forward is one ``bmm`` (no pass copying
  the bias into the output) and the weight and bias gradients one product (no sum over positions);
* on CPU the dropout factors and the tanh/ReLU backward are one pass (``cpu_kernels.act_backward``), and
  the gradients are written by their products straight into the flat gradient block;
* evaluation reuses its buffers, and the training split is evaluated on each model's own subset, its
  first-layer columns taken from the training table (:meth:`CNNEngine.row_logits`).

Models train in chunks (forward, backward and the optimizer's update of a chunk back to back, its
tensors cache-sized). Dropout after each hidden activation uses the MLP engine's per-model masks
(:func:`wsnets.zoo.trainer._dropout_rows`). ``benchmarks/conv_speed.py`` compares this engine with
autograd through grouped convolutions and through ``F.unfold`` + ``bmm``.
"""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import torch

from ..arch import Architecture, Layer
from ..errors import ConfigError
from . import cpu_kernels


def conv_maps(shape: tuple[int, ...], k: int, s: int, pad: int) -> tuple[tuple[int, ...], torch.Tensor, torch.Tensor]:
    """The index maps of a convolution (kernel ``k``, stride ``s``, padding ``pad`` on every axis) over
    an input of spatial ``shape``: ``(out_shape, fwd, bwd)``.

    ``fwd [Q * T]``: input position read by window ``q`` at tap ``t`` (row-major), ``P`` (one past the
    last position) where the tap falls on padding. ``bwd [R, P]``: for each input position the entries
    ``q * T + t`` of the windows that read it, in increasing order, padded with ``Q * T`` (a zero slot)
    to the largest count ``R``.
    """
    out = tuple((n + 2 * pad - k) // s + 1 for n in shape)
    if min(out) < 1:
        raise ConfigError(f"a {k}-wide convolution with stride {s} and padding {pad} does not fit input {shape}")
    P, Q, T = math.prod(shape), math.prod(out), k ** len(shape)
    fwd = torch.full((Q, T), P, dtype=torch.long)
    readers: list[list[int]] = [[] for _ in range(P)]
    for qi, q in enumerate(itertools.product(*[range(o) for o in out])):
        for ti, t in enumerate(itertools.product(*[range(k)] * len(shape))):
            pos = [q[j] * s + t[j] - pad for j in range(len(shape))]
            if all(0 <= pos[j] < shape[j] for j in range(len(shape))):
                p = 0
                for j, n in enumerate(shape):
                    p = p * n + pos[j]
                fwd[qi, ti] = p
                readers[p].append(qi * T + ti)
    R = max(1, max(len(r) for r in readers))
    bwd = torch.full((R, P), Q * T, dtype=torch.long)
    for p, r in enumerate(readers):
        bwd[:len(r), p] = torch.tensor(r, dtype=torch.long)
    return out, fwd.reshape(-1), bwd


class _Conv:
    """One conv layer of the engine: shapes, index maps and parameter offsets in ``theta``."""

    def __init__(self, layer: Layer, act: Layer, shape: tuple[int, ...], offset: int, device: torch.device):
        if len(set(layer.kernel_size)) != 1 or len(set(layer.stride)) != 1 or len(set(layer.padding)) != 1 \
                or set(layer.dilation) != {1}:
            raise ConfigError(f"cnn engine: conv layer {layer.name!r} needs equal kernel size, stride and padding on "
                              "every axis and no dilation")
        self.layer, self.act = layer, act
        self.cin, self.cout = layer.in_features, layer.out_features
        self.k, self.s, self.pad = layer.kernel_size[0], layer.stride[0], layer.padding[0]
        self.in_shape = shape
        self.out_shape, self.fwd, self.bwd = conv_maps(shape, self.k, self.s, self.pad)
        self.P, self.Q, self.T = math.prod(shape), math.prod(self.out_shape), self.k ** len(shape)
        self.padded = bool((self.fwd == self.P).any())
        self.identity = self.Q == 1 and bool(torch.equal(self.fwd, torch.arange(self.P)))  # one window = the input
        self.rows = self.T * self.cin  # rows of the weight block [T * Cin, Cout]
        self.w0, self.b0 = offset, offset + self.rows * self.cout
        self.end = self.b0 + self.cout
        # the bias folded into the matrix product: columns [.., T * Cin + 1] end in a one, the weight block
        # and the bias that follows it in theta are one [T * Cin + 1, Cout] matrix (and its gradient one
        # product); not for a layer read without a gather (its columns are a view of the previous output),
        # nor where T * Cin is a multiple of 16 (rows of 64-byte multiples: one more float misaligns them
        # and slows the products and the gathers more than the bias's own pass costs; the Small CNN Zoo's
        # layers 2 and 3), on CPU
        self.fold = not self.identity and (self.rows % 16 != 0 or device.type != "cpu")
        self.width = self.rows + self.fold


class CNNEngine:
    """Conv (+bias) -> activation stacks -> global average pooling -> linear (+bias) layers, with a
    hand-written forward and backward for ``K`` models (see the module docstring).

    Parameters live in one flat block ``theta [K, P]`` (per conv layer its weights as ``[T * Cin, Cout]``,
    taps row-major, then its bias; per linear layer ``nn.Linear``'s ``[out, in]`` then the bias), so
    the optimizer runs a few kernels per chunk whatever the depth.
    """

    @staticmethod
    def supports(arch: Architecture) -> bool:
        try:
            CNNEngine._parse(arch)
        except ConfigError:
            return False
        return True

    @staticmethod
    def _parse(arch: Architecture) -> tuple[list[tuple[Layer, Layer]], list[Layer], list[Layer]]:
        """``(convs with their activation, linears, activations between linears)`` or a ConfigError."""
        from .trainer import _ACT_BACKWARD
        ls = list(arch.layers)
        convs: list[tuple[Layer, Layer]] = []
        i = 0
        while i + 1 < len(ls) and ls[i].kind in ("conv1d", "conv2d") and ls[i + 1].kind == "act":
            convs.append((ls[i], ls[i + 1]))
            i += 2
        if not convs or [l.kind for l in ls[i:i + 2]] != ["gap", "flatten"]:
            raise ConfigError(f"cnn engine: {arch.describe()} is not conv -> activation stacks -> gap -> flatten -> linear")
        rest = ls[i + 2:]
        lins, acts = rest[::2], rest[1::2]
        if not lins or [l.kind for l in lins] != ["linear"] * len(lins) or [l.kind for l in acts] != ["act"] * (len(lins) - 1):
            raise ConfigError(f"cnn engine: {arch.describe()} must end in linear layers (with activations between)")
        bad = [l.name for l, _ in convs if not l.bias] + [l.name for l in lins if not l.bias]
        if bad:
            raise ConfigError(f"cnn engine: layers {bad} have no bias")
        fns = {a.fn for _, a in convs} | {a.fn for a in acts}
        if not fns <= set(_ACT_BACKWARD):
            raise ConfigError(f"cnn engine: activations {sorted(fns - set(_ACT_BACKWARD))} have no hand-written backward")
        if arch.input_shape is None or len(arch.input_shape) != convs[0][0].dims + 1:
            raise ConfigError(f"cnn engine: {arch.describe()} needs its input shape [C, *spatial]")
        return convs, lins, acts

    def __init__(self, arch: Architecture, params: dict[str, torch.Tensor], bank, batch_size: int,
                 drop: torch.Tensor, n_drop: int, gen: torch.Generator, chunk: int | None = None):
        from .trainer import _dropout_state, _flat_inputs
        convs, self.lins, self.lin_acts = self._parse(arch)
        if n_drop and len(self.lins) > 1:
            raise ConfigError("cnn engine: dropout after hidden linear layers is not written (use engine 'autograd')")
        self.arch, self.K, self.B = arch, len(drop), batch_size
        K, B, dev = self.K, self.B, drop.device
        _dropout_state(self, gen, dev)
        shape = tuple(arch.input_shape[1:])
        self.convs: list[_Conv] = []
        off = 0
        for layer, act in convs:
            c = _Conv(layer, act, shape, off, dev)
            self.convs.append(c)
            shape, off = c.out_shape, c.end
        self.lin_off = []
        for l in self.lins:
            self.lin_off.append(off)
            off += l.out_features * l.in_features + l.out_features
        self.n_params = off
        for c in self.convs:
            c.fwd_d, c.bwd_d = c.fwd.to(dev), c.bwd.to(dev)
        # theta [K, P] in the engine's layout
        blocks = []
        for c in self.convs:
            w = params[f"{c.layer.name}.weight"].reshape(K, c.cout, c.cin, c.T)  # [K, out, in, T]
            blocks += [w.permute(0, 3, 2, 1).reshape(K, -1), params[f"{c.layer.name}.bias"].reshape(K, -1)]
        for l in self.lins:
            blocks += [params[f"{l.name}.weight"].reshape(K, -1), params[f"{l.name}.bias"].reshape(K, -1)]
        self.theta = torch.cat(blocks, 1).to(dev).contiguous()
        self.blocks, self.buffers = [self.theta], []
        # the first layer's columns of every training sample, gathered once: [D * Nmax, Q * T * Cin]
        self.x1 = self._im2col(_flat_inputs(bank, False))
        self.s0 = K - n_drop
        self.keep = (1 - drop).reshape(-1, 1, 1)
        # models per chunk: a chunk's activations, columns and gradients stay at ~16 MB (18 models of the
        # Small CNN Zoo on 16x16 digits, 43 on MNIST-1D: 10-20% faster per sample than half or twice that)
        per_model = B * sum(c.Q * (3 * c.cout + 2 * c.width) for c in self.convs) + 2 * self.n_params
        self.C = C = min(K, chunk or (max(4, (1 << 22) // per_model) if dev.type == "cpu" else K))
        f = dict(device=dev)
        self.cols = [torch.empty(C, B * c.Q, c.width, **f) for c in self.convs]  # gathered inputs of each layer
        for c, t in zip(self.convs, self.cols):
            if c.fold:
                t[..., c.rows] = 1.0  # the gathers never write this column
        self.z = [torch.empty(C, B * c.Q, c.cout, **f) for c in self.convs]  # pre-activations
        self.y = [torch.empty(C, B * c.Q, c.cout, **f) for c in self.convs]  # activations (after dropout)
        self.dcols = [torch.empty(C, B * c.Q, c.rows, **f) for c in self.convs]
        self.dh = [torch.empty(C, B * c.P, c.cin, **f) for c in self.convs]
        self.gflat = torch.empty(C, self.n_params, **f)  # the gradients, written in place by their products
        self.neg = torch.full((C, 1, B), -1.0 / B, **f)
        self.inv_b = 1.0 / B
        self.softmax_in_place = dev.type == "cpu"
        self.views: dict[int, tuple] = {}

    # -- parameters --------------------------------------------------------------------------------------
    def _w(self, theta: torch.Tensor, c: _Conv) -> tuple[torch.Tensor, torch.Tensor]:
        n = theta.shape[0]
        return theta[:, c.w0:c.b0].view(n, c.rows, c.cout), theta[:, c.b0:c.end].view(n, 1, c.cout)

    def _wb(self, theta: torch.Tensor, c: _Conv) -> torch.Tensor:
        """The weights and the bias of a folded layer as one ``[n, T * Cin + 1, Cout]`` matrix."""
        return theta[:, c.w0:c.end].view(theta.shape[0], c.width, c.cout)

    def _conv(self, theta: torch.Tensor, c: _Conv, cols: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """A conv layer's pre-activations ``[n, rows, Cout]`` from its columns (bias folded or added)."""
        if c.fold:
            return torch.bmm(cols, self._wb(theta, c), out=out)
        w, bias = self._w(theta, c)
        return torch.baddbmm(bias, cols, w, out=out)

    def _lin(self, theta: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        l, o = self.lins[i], self.lin_off[i]
        n, m = theta.shape[0], l.out_features * l.in_features
        return theta[:, o:o + m].view(n, l.out_features, l.in_features), theta[:, o + m:o + m + l.out_features].view(n, -1, 1)

    def params(self) -> dict[str, torch.Tensor]:
        """The state dict ``[K, ...]`` of every model (PyTorch layouts)."""
        th, K, out = self.theta.detach(), self.K, {}
        for c in self.convs:
            w, b = self._w(th, c)
            w = w.reshape(K, c.T, c.cin, c.cout).permute(0, 3, 2, 1)  # [K, out, in, T]
            out[f"{c.layer.name}.weight"] = w.reshape(K, c.cout, c.cin, *c.layer.kernel_size).contiguous()
            out[f"{c.layer.name}.bias"] = b.reshape(K, -1).contiguous()
        for i, l in enumerate(self.lins):
            w, b = self._lin(th, i)
            out[f"{l.name}.weight"], out[f"{l.name}.bias"] = w.contiguous(), b.reshape(K, -1).contiguous()
        return out

    def kernel_masks(self) -> list[torch.Tensor]:
        """1 on the weights of ``theta``, 0 on the biases (the entries an ``l2`` penalty acts on)."""
        m = torch.zeros(1, self.n_params)
        for c in self.convs:
            m[:, c.w0:c.b0] = 1
        for i, l in enumerate(self.lins):
            m[:, self.lin_off[i]:self.lin_off[i] + l.out_features * l.in_features] = 1
        return [m]

    # -- im2col / col2im -------------------------------------------------------------------------------
    def _im2col(self, x: torch.Tensor) -> torch.Tensor:
        """First-layer columns ``[N, Q * T * Cin]`` of inputs ``x`` (``[N, Cin * P]`` rows, channel-major
        as the datasets store them)."""
        c = self.convs[0]
        h = x.reshape(len(x), c.cin, c.P).transpose(1, 2)  # channels-last [N, P, Cin]
        h = torch.cat([h, h.new_zeros(len(x), 1, c.cin)], 1)  # the padding slot
        cols = h[:, c.fwd_d].reshape(len(x), c.Q, c.rows)
        if c.fold:  # each window's row ends in a one (the bias)
            cols = torch.cat([cols, cols.new_ones(len(x), c.Q, 1)], 2)
        return cols.reshape(len(x), -1).contiguous()

    def _gather(self, i: int, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Layer ``i``'s columns ``[n, B * Q, T * Cin]`` from the previous layer's output ``h [n, B * P, Cin]``."""
        c, n = self.convs[i], h.shape[0]
        if c.identity:
            return h.view(n, -1, c.rows)
        src, o = h.view(n * self.B, c.P, c.cin), out.view(n * self.B, c.Q, c.width)
        if self.cpu_lib is not None:
            cpu_kernels.gather_rows(self.cpu_lib, src, c.fwd_d, o)
        else:
            cpu_kernels.gather_rows_torch(src, c.fwd_d, o)
        return out

    def _scatter(self, i: int, dcols: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """col2im: the gradient ``[n, B * P, Cin]`` of layer ``i``'s input from that of its columns
        ``[n, B * Q, T * Cin]``: per input position, the windows that read it summed in increasing order."""
        c, n = self.convs[i], dcols.shape[0]
        if c.identity:
            return dcols.view(n, -1, c.cin)
        src, o = dcols.view(n * self.B, c.Q * c.T, c.cin), out.view(n * self.B, c.P, c.cin)
        if self.cpu_lib is not None:
            cpu_kernels.gather_sum(self.cpu_lib, src, c.bwd_d, o)
        else:
            cpu_kernels.gather_sum_torch(src, c.bwd_d, o)
        return out

    # -- training ----------------------------------------------------------------------------------------
    def step(self, fidx: torch.Tensor, yb: torch.Tensor, opt) -> None:
        """One optimizer step of every model, chunk by chunk (forward, backward, update)."""
        for a in range(0, self.K, self.C):
            b = min(a + self.C, self.K)
            opt.step(self._grads(a, b, fidx[a:b], yb[a:b]), a, b)

    def _views(self, a: int, b: int) -> SimpleNamespace:
        """Views of chunk ``a:b`` into the parameters and the chunk buffers (built once per chunk)."""
        n, th, g = b - a, self.theta[a:b], self.gflat[:b - a]
        d0 = min(max(self.s0 - a, 0), n)  # first dropout row of the chunk
        conv = range(len(self.convs))
        v = SimpleNamespace(
            n=n, d0=d0, keep=self.keep[a + d0:b], x1=self.cols[0][:n].view(n * self.B, -1),
            cols=[self.cols[i][:n] for i in conv], z=[self.z[i][:n] for i in conv], y=[self.y[i][:n] for i in conv],
            dcols=[self.dcols[i][:n] for i in conv], dh=[self.dh[i][:n] for i in conv],
            w=[self._w(th, c) for c in self.convs], wb=[self._wb(th, c) if c.fold else None for c in self.convs],
            lin=[self._lin(th, i) for i in range(len(self.lins))], gflat=g, neg=self.neg[:n])
        # the gradients' places in the flat gradient block: a folded layer's weights and bias are one matrix
        v.gconv = [self._wb(g, c) if c.fold else (self._w(g, c)[0], g[:, c.b0:c.end]) for c in self.convs]
        v.glin = [(w, bias.view(n, -1)) for w, bias in (self._lin(g, i) for i in range(len(self.lins)))]
        return v

    def _grads(self, a: int, b: int, fidx: torch.Tensor, yb: torch.Tensor) -> list[torch.Tensor]:
        """Gradients ``[[n, P]]`` of models ``a:b`` (the sum over models of each model's mean cross-entropy)."""
        from .trainer import _ACT_BACKWARD, _FROM_OUTPUT, _act_into, _dropout_rows
        v = self.views.get(a)
        if v is None:
            v = self.views[a] = self._views(a, b)
        n, B, d0, lib = v.n, self.B, v.d0, self.cpu_lib
        cols = v.cols[0]
        torch.index_select(self.x1, 0, fidx.reshape(-1), out=v.x1)
        saved = []
        h = None
        for i, c in enumerate(self.convs):
            if i:
                cols = self._gather(i, h, v.cols[i])
            if c.fold:
                z = torch.bmm(cols, v.wb[i], out=v.z[i])
            else:
                w, bias = v.w[i]
                z = torch.baddbmm(bias, cols, w, out=v.z[i])
            fn = c.act.fn
            y = _act_into(fn, z, v.y[i] if fn not in _FROM_OUTPUT else z, c.act.slope)
            h, scale = y, None
            if d0 < n:  # dropout rows: h = y * mask / keep (y kept for the backward)
                h = v.y[i] if y is z else torch.empty_like(y)
                if d0:
                    h[:d0].copy_(y[:d0])
                    scale = _dropout_rows(self, (a, i), v.keep, y[d0:], h[d0:], (n - d0, B * c.Q, c.cout))
                else:  # every model of the chunk (no slices: they cost as much as a small kernel)
                    scale = _dropout_rows(self, (a, i), v.keep, y, h, (n, B * c.Q, c.cout))
            saved.append((cols, z, y, scale))
        last = self.convs[-1]
        g = h.view(n, B, last.Q, last.cout)
        g = g[:, :, 0] if last.Q == 1 else g.mean(2)  # [n, B, C] global average pooling
        hT = g.transpose(1, 2)  # [n, F, B]
        lin_saved = []
        for i, l in enumerate(self.lins):
            w, bias = v.lin[i]
            z = torch.baddbmm(bias, w, hT)  # [n, out, B]
            lin_saved.append(hT)
            if i < len(self.lin_acts):
                act = self.lin_acts[i]
                y = _act_into(act.fn, z, z if act.fn in _FROM_OUTPUT else None, act.slope)
                lin_saved[-1] = (hT, z, y)
                hT = y
            else:
                logits = z
        dz = torch.softmax(logits, 1) if not self.softmax_in_place else torch.ops.aten._softmax.out(logits, 1, False, out=logits)
        dz = dz.mul_(self.inv_b).scatter_add_(1, yb[:, None], v.neg)  # (softmax - onehot) / B
        for i in range(len(self.lins) - 1, -1, -1):
            hin = lin_saved[i] if i == len(self.lins) - 1 else lin_saved[i][0]
            w, _ = v.lin[i]
            gw, gb = v.glin[i]
            torch.bmm(dz, hin.transpose(1, 2), out=gw)
            torch.sum(dz, 2, out=gb)
            if i:
                da = torch.bmm(w.transpose(1, 2), dz)
                _, z, y = lin_saved[i - 1]
                act = self.lin_acts[i - 1]
                dz = _ACT_BACKWARD[act.fn](da, z, y, act.slope)
            else:
                dg = torch.bmm(dz.transpose(1, 2), w)  # [n, B, F]
        dh = dg if last.Q == 1 else (dg / last.Q)[:, :, None].expand(n, B, last.Q, last.cout)
        dh = dh.reshape(n, B * last.Q, last.cout)
        for i in range(len(self.convs) - 1, -1, -1):
            c = self.convs[i]
            cols, z, y, scale = saved[i]
            dh = dh.contiguous()
            fn = c.act.fn
            if lib is not None and fn in ("tanh", "relu"):  # the dropout factors and the backward in one pass
                if d0 == 0 or d0 == n:
                    cpu_kernels.act_backward(lib, dh, scale, y, fn)
                else:
                    cpu_kernels.act_backward(lib, dh[:d0], None, y[:d0], fn)
                    cpu_kernels.act_backward(lib, dh[d0:], scale, y[d0:], fn)
                dz = dh
            else:
                if scale is not None:
                    dh[d0:].mul_(scale)
                dz = _ACT_BACKWARD[fn](dh, z, y, c.act.slope)
            if c.fold:  # weights and bias: one product with the columns (their last column is ones)
                torch.bmm(cols.transpose(1, 2), dz, out=v.gconv[i])
            else:
                torch.bmm(cols.transpose(1, 2), dz, out=v.gconv[i][0])
                torch.sum(dz, 1, out=v.gconv[i][1])
            if i:
                dc = torch.bmm(dz, v.w[i][0].transpose(1, 2), out=v.dcols[i])
                dh = self._scatter(i, dc, v.dh[i])
        return [v.gflat]

    # -- evaluation ----------------------------------------------------------------------------------------
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluation logits ``[K, C, N]`` of inputs ``x`` ``[N, ...]`` (shared) or ``[K, N, ...]``, chunk by
        chunk of models (no dropout), in buffers kept between calls (:meth:`_eval_buffers`)."""
        shared = x.dim() == len(self.arch.input_shape) + 1
        N = x.shape[-len(self.arch.input_shape) - 1]
        x = x.reshape(-1 if shared else self.K, *([] if shared else [N]), math.prod(self.arch.input_shape)).float()
        c0 = self.convs[0]
        if shared:  # every model reads the same columns
            x1 = self._im2col(x)
            return self._logits(N, lambda a, b, cols: cols.view(b - a, N, -1).copy_(x1.expand(b - a, N, x1.shape[-1])))
        if c0.cin == 1:  # one channel: the inputs are already channels-last
            return self._logits(N, lambda a, b, cols: self._gather_into(c0, x[a:b].reshape(-1, c0.P, 1), cols))
        return self._logits(N, lambda a, b, cols: cols.view((b - a) * N, -1).copy_(self._im2col(x[a:b].reshape(-1, x.shape[-1]))))

    def row_logits(self, rows: torch.Tensor) -> torch.Tensor:
        """:meth:`logits` of training samples given by their rows ``[K, N]`` of the flattened bank (dataset
        offset included, as :meth:`step`'s ``fidx``): the first layer's columns come from the table the
        training gathers from."""
        N = rows.shape[1]
        return self._logits(N, lambda a, b, cols: torch.index_select(self.x1, 0, rows[a:b].reshape(-1),
                                                                     out=cols.view((b - a) * N, -1)))

    def _logits(self, N: int, first) -> torch.Tensor:
        """Logits ``[K, C, N]``; ``first(a, b, cols)`` writes the first layer's columns of models ``a:b``."""
        per_model = N * sum(c.Q * (c.width + c.cout) for c in self.convs)
        step = max(1, min(self.K, (1 << 22) // max(per_model, 1)))
        out = []
        for a in range(0, self.K, step):
            b = min(a + step, self.K)
            th, n = self.theta[a:b], b - a
            cols, zs = self._eval_buffers(n, N)
            for i, c in enumerate(self.convs):
                if i == 0:
                    first(a, b, cols[0])
                elif c.identity:
                    cols[i] = h.view(n, N, c.rows)
                else:
                    self._gather_into(c, h.view(n * N, c.P, c.cin), cols[i])
                h = self._act(c.act, self._conv(th, c, cols[i], out=zs[i]))
            g = h.view(n, N, self.convs[-1].Q, -1).mean(2).transpose(1, 2)
            for i, l in enumerate(self.lins):
                w, bias = self._lin(th, i)
                g = torch.baddbmm(bias, w, g)
                if i < len(self.lin_acts):
                    g = self._act(self.lin_acts[i], g)
            out.append(g)
        return torch.cat(out) if len(out) > 1 else out[0]

    def _eval_buffers(self, n: int, N: int) -> tuple[list, list]:
        """Views ``[n, N * Q, width]`` (columns; a folded layer's last column is ones) and ``[n, N * Q, Cout]``
        (pre-activations) of per-layer buffers that grow to the largest ``n * N`` asked for: evaluation
        allocates nothing per chunk (large fresh allocations cost a page fault per 4 KiB)."""
        bufs = getattr(self, "_eval_bufs", None)
        if bufs is None or bufs[0] < n * N:
            dev = self.theta.device
            cols = []
            for i, c in enumerate(self.convs):
                t = None
                if i == 0 or not c.identity:
                    t = torch.empty(n * N * c.Q, c.width, device=dev)
                    t[:, c.rows:] = 1.0  # the folded bias's column (the gathers never write it; none if not folded)
                cols.append(t)
            bufs = self._eval_bufs = (n * N, cols, [torch.empty(n * N * c.Q * c.cout, device=dev) for c in self.convs])
        m, cols, zs = bufs
        return ([None if t is None else t[:n * N * c.Q].view(n, N * c.Q, c.width) for t, c in zip(cols, self.convs)],
                [t[:n * N * c.Q * c.cout].view(n, N * c.Q, c.cout) for t, c in zip(zs, self.convs)])

    @staticmethod
    def _act(act: Layer, z: torch.Tensor) -> torch.Tensor:
        from .trainer import _act_into
        return _act_into(act.fn, z, z, act.slope)  # in place: z is a temporary

    def _gather_into(self, c: _Conv, src: torch.Tensor, out: torch.Tensor) -> None:
        """im2col of ``src [m, P, Cin]`` (contiguous) into the columns ``out [.., width]`` (``m * Q`` rows)."""
        o = out.view(src.shape[0], c.Q, c.width)
        if self.cpu_lib is not None:
            cpu_kernels.gather_rows(self.cpu_lib, src, c.fwd_d, o)
        else:
            cpu_kernels.gather_rows_torch(src, c.fwd_d, o)
