"""One fused GPU kernel per optimizer step for the batched MLP engine (Triton).

The torch path of :class:`wsnets.zoo.trainer._MLPEngine` runs a step as ~25 kernels over
``[K, features, B]`` activations and ``[K, in+1, out]`` parameter blocks. That is memory-bound: for
64-32-32-10 at batch 64 it moves ~18 GB per step for ``K = 50,000`` models (counted from the tensors
each kernel reads and writes; measured 8.6 ms per step on an H100 before this kernel, 2.0 s of 10 epochs). Here one program trains one
model: it gathers the model's batch, runs the forward and backward pass with its weights in
registers (``tl.dot`` on tiles padded to powers of two, at least 16), clips the gradient by the model's
own norm and applies its SGD or AdamW update. Only small models fit (:data:`MAX_TILE`: 64-32-32-10 up to
batch 128); the others train on the torch path, and so does a group whose kernel fails to compile or
launch in automatic mode (``train_group(fused=None)``: a warning, then the torch path from that step on
the same weights and optimizer state). Device memory then sees each parameter and optimizer
state read once and written once per step (~2.8 GB for the model above; measured 1.8 ms per step with
TF32 and 4.8 ms in float32 on the H100, see ``benchmarks/results/zoo_speed_h100.md``).

The kernel source is generated per depth (Triton needs one variable per layer tile), written to
``~/.cache/wsnets/triton/`` and imported; widths, batch size, activation, dropout and optimizers are
compile-time constants. It computes the same function as the torch path (tested against it and
against ``torch.optim``). Matrix products run in full float32 (``input_precision="ieee"``) unless
TF32 is allowed (``torch.set_float32_matmul_precision("high")``: ``"tf32"``, ~2x faster on an H100);
see :func:`matmul_precision`. Dropout masks come from Triton's Philox stream (``tl.rand``) keyed by
the group's generator seed, the step and the model, so a fused run is reproducible but draws other
masks than the torch path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
from pathlib import Path

import torch

#: activation name -> code in the kernel (the activations the kernel implements)
ACTS = {"identity": 0, "relu": 1, "tanh": 2, "sigmoid": 3, "gelu": 4, "silu": 5, "elu": 6, "softplus": 7,
        "leaky_relu": 8}
#: the largest ``padded batch * sum of padded widths`` (input and output included) the kernel takes: a
#: program holds its batch's activations of every layer in registers. Measured on an H100: 64-32-32-10 at
#: batch 64 (9,216) and 128 (18,432) compile in seconds and run fast; 64-64-64-64-64-10 at batch 128
#: (43,008) did not finish compiling and training 300 models for 2 epochs in 155 s (register spills).
#: Larger groups use the torch path; a kernel that walks the batch in row blocks would lift this.
MAX_TILE = 20480
#: matrix-product precision of the kernel: "ieee" (float32 FMAs), "tf32" or "tf32x3" (tensor cores); None
#: follows PyTorch's setting: ``torch.set_float32_matmul_precision("highest")`` (its default) -> "ieee",
#: "high" or "medium" (TF32 allowed) -> "tf32"
PRECISION: str | None = None
#: warps per program (one model); None: 2 for "tf32", 4 otherwise (fastest on an H100 for 64-32-32-10:
#: 56.6k vs 49.2k models/s with TF32, 31.3k vs 14.2k (2) and 26.6k (8) in float32)
WARPS: int | None = None
#: ``train_group(fused=None)`` uses the kernel for groups of at least this many models: compiling a new
#: configuration takes seconds, more than the torch path needs for a small group
MIN_MODELS = 256


def matmul_precision() -> str:
    if PRECISION is not None:
        return PRECISION
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"

_HELPERS = '''
import triton
import triton.language as tl


@triton.jit
def _sig(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _act(z, ACT: tl.constexpr, SLOPE: tl.constexpr):
    if ACT == 0:
        y = z
    elif ACT == 1:
        y = tl.maximum(z, 0.0)
    elif ACT == 2:
        e = tl.exp(-2.0 * tl.abs(z))
        t = (1.0 - e) / (1.0 + e)
        y = tl.where(z < 0, -t, t)
    elif ACT == 3:
        y = _sig(z)
    elif ACT == 4:
        y = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == 5:
        y = z * _sig(z)
    elif ACT == 6:
        y = tl.where(z > 0, z, tl.exp(z) - 1.0)
    elif ACT == 7:
        y = tl.where(z > 20.0, z, tl.log(1.0 + tl.exp(tl.minimum(z, 20.0))))
    else:
        y = tl.where(z > 0, z, z * SLOPE)
    return y


@triton.jit
def _act_grad(g, z, ACT: tl.constexpr, SLOPE: tl.constexpr):
    """g * activation'(z)"""
    if ACT == 0:
        d = g
    elif ACT == 1:
        d = tl.where(z > 0, g, 0.0)
    elif ACT == 2:
        t = _act(z, 2, SLOPE)
        d = g * (1.0 - t * t)
    elif ACT == 3:
        s = _sig(z)
        d = g * s * (1.0 - s)
    elif ACT == 4:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        d = g * (cdf + z * pdf)
    elif ACT == 5:
        s = _sig(z)
        d = g * s * (1.0 + z * (1.0 - s))
    elif ACT == 6:
        d = tl.where(z > 0, g, g * tl.exp(z))
    elif ACT == 7:
        d = tl.where(z > 20.0, g, g * _sig(z))
    else:
        d = tl.where(z > 0, g, g * SLOPE)
    return d


@triton.jit
def _update(P, M, V, off, msk, g, coef, lr, mom, wd, is_adam, a_lr, a_eps, ADAM: tl.constexpr):
    """SGD (momentum, L2 decay into the buffer, as torch.optim.SGD) or AdamW on one tile, in place."""
    g = g * coef
    p = tl.load(P + off, mask=msk, other=0.0)
    m = tl.load(M + off, mask=msk, other=0.0)
    if ADAM:
        if is_adam != 0:
            v = tl.load(V + off, mask=msk, other=0.0)
            p = p * (1.0 - lr * wd)
            m = m + 0.1 * (g - m)
            v = v * 0.999 + 0.001 * g * g
            p = p - m / ((tl.sqrt(v) + a_eps) / (lr * a_lr))
            tl.store(V + off, v, mask=msk)
        else:
            m = m * mom + g
            m = m + p * wd
            p = p - m * lr
    else:
        m = m * mom + g
        m = m + p * wd
        p = p - m * lr
    tl.store(P + off, p, mask=msk)
    tl.store(M + off, m, mask=msk)
'''


def _source(L: int) -> str:
    """The step kernel for ``L`` linear layers (``L - 1`` hidden activations)."""
    ptrs = ", ".join(f"W{l}, M{l}, V{l}, SW{l}" for l in range(L))
    dims = ", ".join(f"D{l}: tl.constexpr, P{l}: tl.constexpr" for l in range(L + 1))
    o = [_HELPERS, "", "@triton.jit(do_not_specialize=['seed'])",  # a new seed each step: one compiled kernel
         f"def mlp_step(X, IDX, Y, LR, MOM, WD, CLIP, ISADAM, KEEP, {ptrs}, seed, a_lr, a_eps,",
         f"             B: tl.constexpr, BP: tl.constexpr, {dims}, ACT: tl.constexpr, SLOPE: tl.constexpr,",
         "             DROP: tl.constexpr, ADAM: tl.constexpr, PREC: tl.constexpr):",
         "    k = tl.program_id(0).to(tl.int64)",
         "    rb = tl.arange(0, BP)",
         "    rv = rb < B",
         "    idx = tl.load(IDX + k * B + rb, mask=rv, other=0).to(tl.int64)",
         "    yb = tl.load(Y + k * B + rb, mask=rv, other=0)"]
    o += [f"    c{l} = tl.arange(0, P{l})" for l in range(L + 1)]
    o += ["    h0 = tl.load(X + idx[:, None] * D0 + c0[None, :], mask=rv[:, None] & (c0[None, :] < D0), other=0.0)",
          "    keep = tl.load(KEEP + k)",
          "    sk = seed.to(tl.int64) * 4294967296 + k"]  # distinct per (step, model) for any K < 2**32
    for l in range(L):
        o += [f"    o{l} = c{l}[:, None] * D{l + 1} + c{l + 1}[None, :]",
              f"    m{l} = (c{l}[:, None] < D{l}) & (c{l + 1}[None, :] < D{l + 1})",
              f"    ob{l} = D{l} * D{l + 1} + c{l + 1}",
              f"    mb{l} = c{l + 1} < D{l + 1}",
              f"    w{l} = tl.load(W{l} + k * SW{l} + o{l}, mask=m{l}, other=0.0)",
              f"    b{l} = tl.load(W{l} + k * SW{l} + ob{l}, mask=mb{l}, other=0.0)",
              f"    z{l} = tl.dot(h{l}, w{l}, input_precision=PREC) + b{l}[None, :]"]
        if l < L - 1:
            o += [f"    h{l + 1} = tl.where(c{l + 1}[None, :] < D{l + 1}, _act(z{l}, ACT, SLOPE), 0.0)",
                  "    if DROP:",
                  f"        u{l + 1} = tl.rand(sk, ({l} * BP + rb[:, None]) * P{l + 1} + c{l + 1}[None, :])",
                  f"        q{l + 1} = tl.where(u{l + 1} < keep, 1.0 / keep, 0.0)",
                  f"        h{l + 1} = h{l + 1} * q{l + 1}"]
    last = L - 1
    o += [f"    zl = tl.where(c{L}[None, :] < D{L}, z{last}, float('-inf'))",
          "    e = tl.exp(zl - tl.max(zl, 1)[:, None])",
          "    pr = e / tl.sum(e, 1)[:, None]",
          f"    dz = (pr - (c{L}[None, :] == yb[:, None]).to(tl.float32)) * (1.0 / B)",
          "    dz = tl.where(rv[:, None], dz, 0.0)",
          "    sq = 0.0"]
    for l in range(L - 1, -1, -1):
        o += [f"    g{l} = tl.dot(tl.trans(h{l}), dz, input_precision=PREC)",
              f"    gb{l} = tl.sum(dz, 0)",
              f"    sq += tl.sum(tl.sum(g{l} * g{l}, 1), 0) + tl.sum(gb{l} * gb{l}, 0)"]
        if l > 0:
            o += [f"    da = tl.dot(dz, tl.trans(w{l}), input_precision=PREC)",
                  "    if DROP:",
                  f"        da = da * q{l}",
                  f"    dz = _act_grad(da, z{l - 1}, ACT, SLOPE)"]
    o += ["    lr = tl.load(LR + k)",
          "    mom = tl.load(MOM + k)",
          "    wd = tl.load(WD + k)",
          "    is_adam = tl.load(ISADAM + k)",
          "    coef = tl.minimum(tl.load(CLIP + k) / (tl.sqrt(sq) + 1e-6), 1.0)"]
    for l in range(L):
        o += [f"    _update(W{l} + k * SW{l}, M{l} + k * SW{l}, V{l} + k * SW{l}, o{l}, m{l}, g{l}, coef, lr, mom, wd, "
              "is_adam, a_lr, a_eps, ADAM)",
              f"    _update(W{l} + k * SW{l}, M{l} + k * SW{l}, V{l} + k * SW{l}, ob{l}, mb{l}, gb{l}, coef, lr, mom, wd, "
              "is_adam, a_lr, a_eps, ADAM)"]
    return "\n".join(o) + "\n"


_KERNELS: dict[int, object] = {}


def available(device: torch.device) -> bool:
    """Whether the fused kernel can run for tensors on ``device`` (CUDA with Triton, or Triton's CPU
    interpreter when ``TRITON_INTERPRET=1``)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False  # before importing Triton (~0.2 s): CPU zoo builds never need it
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def tile_size(widths: list[int], batch_size: int) -> int:
    """``padded batch * sum of padded widths``: what a program keeps in registers, compared with :data:`MAX_TILE`."""
    return _pad(batch_size) * sum(_pad(w) for w in widths)


def supports(widths: list[int], act: str, batch_size: int) -> bool:
    return act in ACTS and len(widths) >= 2 and tile_size(widths, batch_size) <= MAX_TILE


def kernel(L: int):
    """The compiled-on-demand step kernel for ``L`` linear layers (source cached on disk by content)."""
    if L not in _KERNELS:
        src = _source(L)
        d = Path(os.environ.get("WSNETS_CACHE", Path.home() / ".cache" / "wsnets")) / "triton"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"mlp_step_{L}_{hashlib.sha1(src.encode()).hexdigest()[:12]}.py"
        if not path.exists():  # written atomically: other processes may import it at the same time
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(src)
            os.replace(tmp, path)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _KERNELS[L] = mod.mlp_step
    return _KERNELS[L]


def _pad(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def step(x: torch.Tensor, fidx: torch.Tensor, yb: torch.Tensor, w: list[torch.Tensor], m1: list[torch.Tensor],
         m2: list[torch.Tensor] | None, hp: dict[str, torch.Tensor], widths: list[int], act: str, slope: float,
         t: int, seed: int, drop: bool, precision: str | None = None) -> None:
    """One optimizer step of every model, in place.

    ``x`` ``[rows, in]`` inputs; ``fidx`` ``[K, B]`` rows of each model's batch; ``yb`` ``[K, B]`` labels;
    ``w``/``m1``/``m2`` per layer ``[K, in+1, out]`` blocks (rows may be strided views of one flat
    tensor); ``hp`` per-model ``lr``, ``momentum``, ``weight_decay``, ``clip``, ``adam`` (1.0/0.0) and
    ``keep`` (1 - dropout), each ``K`` contiguous float32 values; ``t`` the AdamW step (from 1);
    ``seed`` < 2**31 keys the dropout stream of this step.
    """
    K, B = fidx.shape
    L = len(w)
    args = []
    for l in range(L):
        args += [w[l], m1[l], (m2[l] if m2 is not None else m1[l]), w[l].stride(0)]
    dims = []
    for d in widths:
        dims += [d, _pad(d)]
    r2 = math.sqrt(1 - 0.999 ** t)
    prec = precision or matmul_precision()
    kernel(L)[(K,)](x, fidx, yb, hp["lr"], hp["momentum"], hp["weight_decay"], hp["clip"], hp["adam"], hp["keep"],
                    *args, seed, r2 / (1 - 0.9 ** t), 1e-8 * r2, B, _pad(B), *dims, ACTS[act], float(slope),
                    drop, m2 is not None, prec, num_warps=WARPS or (2 if prec == "tf32" else 4))
