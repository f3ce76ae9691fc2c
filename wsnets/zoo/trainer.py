"""The batched trainer: a population of ``K`` models of one architecture trains as ONE computation.

Two engines compute the gradients of all ``K`` models at once; the loss is the sum over models of
each model's mean cross-entropy, so every model gets exactly its own gradient:

* ``mlp`` (Linear + activation stacks, the zoo's MLPs): a hand-written forward and backward with
  batched matrix products and no autograd graph. Activations are feature-major ``[K, features, B]``
  and every layer is one contiguous block ``[K, in+1, out]`` (weight and bias), so a layer costs one
  ``bmm`` forward and two backward, into preallocated buffers. On CPU the models are processed in
  chunks of ~100 (a chunk's forward, backward and update run back to back, so its tensors stay in
  cache). On CUDA with Triton, groups of at least 256 models run one fused kernel per step instead
  (:mod:`wsnets.zoo.fused`: one program per model, weights in registers);
* ``autograd`` (any architecture: convolutions, BatchNorm, ...): :func:`wsnets.functional.forward`
  (batched matrix products, grouped convolutions) on a flat leaf ``theta [K, P]``, then
  ``torch.autograd.grad``.

Everything else is per model and vectorized over ``K``:

* learning rate, momentum, weight decay, optimizer (SGD with momentum, or AdamW, selected per model
  inside the same update), gradient-norm clipping;
* initialization: PyTorch's default uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) times a per-model scale,
  or a shared pre-trained base (fine-tuning zoos);
* dropout rate (per-model masks), label noise (a fixed fraction of training labels replaced by random
  classes), training subset (a fraction of the training split) and data order;
* dataset: models of one group may train on different datasets of the same shape (fine-tuning zoos).

Randomness that defines a model (init, subset, label noise, data order) comes from a counter-based
hash of the model's own seed, so a model is identical whichever other models share its group (the
CPU computes these hashes and sorts with NumPy, other devices with torch: same numbers); dropout
masks come from a random stream seeded by the group (groups are fixed by the recipe).

Every model takes the same number of optimizer steps per epoch, ``ceil(n_train / batch_size)``,
cycling through reshuffled passes of its own training subset (a fixed compute budget per model).
A model whose weights become non-finite during an epoch is restored to the start of that epoch and
frozen (``diverged = 1``).
"""

from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from ..arch import Architecture
from ..errors import ConfigError
from ..functional import activation, forward
from . import cpu_kernels
from . import datasets as zds
from .recipe import INIT_KINDS, OPTIMIZERS, OPTIONAL_HYPER, RunSpec

#: Bumped whenever the same recipe and seed would train different numbers (the store records it and
#: refuses to extend a zoo trained by another version): 1 autograd trainer, 2 hand-written MLP engine,
#: 3 NumPy dropout masks and the 7-pass AdamW, 4 MLP weights stored as [in+1, out] (other matrix-product
#: kernels: the same accuracies up to rounding, other low-order bits), 5 CNN engine with the first layer's bias
#: folded into its matrix product (other low-order bits for CNN recipes; MLP recipes train the same numbers as 4),
#: 6 DAG engine: channels-last convolutions, patch embeddings as a matrix product, attention with the scores
#: transposed, its own evaluation pass (other low-order bits for DAG recipes; MLP and CNN recipes as 5).
TRAINER_VERSION = "6"


def trainer_tag(device: torch.device | str) -> str:
    """What a zoo records as its trainer: :data:`TRAINER_VERSION`, plus the device type and, on CUDA
    with Triton, the fused kernel's matrix-product precision (each gives other low-order bits, so a
    build resumed elsewhere would mix numbers): ``"5"`` on CPU, e.g. ``"5+cuda+fused-ieee"`` on a GPU."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return TRAINER_VERSION
    from . import fused
    return f"{TRAINER_VERSION}+{dev.type}" + (f"+fused-{fused.matmul_precision()}" if fused.available(dev) else "")


_MASK = 0xFFFFFFFF
_STREAM = {"subset": 1, "noise_flip": 2, "noise_label": 3, "order": 4, "init": 100}
_GOLD = 0x9E3779B1  # odd multiplier that spreads counters over 32 bits


# -- counter-based random numbers ------------------------------------------------------------------
def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32-style) on int64 tensors holding values in [0, 2^32)."""
    x = ((x ^ (x >> 16)) * 0x21F0AAAD) & _MASK
    x = ((x ^ (x >> 15)) * 0x735A2D97) & _MASK
    return x ^ (x >> 15)


def hash_uniform(seeds: torch.Tensor, stream: int, counters: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) float32 numbers, ``[K, *counters.shape]``, a pure function of (seed, stream, counter).

    ``seeds`` ``[K]`` int64 (32-bit values); ``counters`` int64 (< 2^32) of any shape. On CPU the
    hash runs in NumPy uint32 arithmetic (bit-identical, ~5x faster than torch's int64 ops).
    """
    view = (-1,) + (1,) * counters.dim()
    if seeds.device.type == "cpu":
        import numpy as np
        s = np.uint32(int(_mix(torch.tensor(stream))))
        k = _mix_np(seeds.numpy().astype(np.uint32) ^ s).reshape(view)
        h = _mix_np(k + counters.numpy().astype(np.uint32)[None] * np.uint32(_GOLD))
        return torch.from_numpy((h >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24)))
    k = _mix((seeds.long() ^ _mix(torch.tensor(stream, dtype=torch.long, device=seeds.device))) & _MASK)
    h = _mix((k.reshape(view) + (counters.long().unsqueeze(0) & _MASK) * _GOLD) & _MASK)  # one round per value
    return (h >> 8).float() * (1.0 / (1 << 24))


# -- data ------------------------------------------------------------------------------------------
@dataclass
class DataBank:
    """The datasets of one group stacked: ``x [D, Nmax, *shape]``, ``y [D, Nmax]``, sizes ``n [D]``."""

    names: list[str]
    x: torch.Tensor
    y: torch.Tensor
    n: torch.Tensor
    xt: torch.Tensor
    yt: torch.Tensor
    nt: torch.Tensor
    num_classes: int

    @classmethod
    def build(cls, names: Sequence[str], device: torch.device | str = "cpu") -> "DataBank":
        names = list(dict.fromkeys(names))
        splits = [zds.load(n) for n in names]
        classes = max(zds.info(n)["num_classes"] for n in names)

        def pad(ts: list[torch.Tensor]) -> torch.Tensor:
            m = max(len(t) for t in ts)
            return torch.stack([torch.cat([t, t.new_zeros((m - len(t), *t.shape[1:]))]) for t in ts]).to(device)
        return cls(names, pad([s[0] for s in splits]), pad([s[1] for s in splits]),
                   torch.tensor([len(s[1]) for s in splits], device=device), pad([s[2] for s in splits]),
                   pad([s[3] for s in splits]), torch.tensor([len(s[3]) for s in splits], device=device), classes)


# -- initialization ----------------------------------------------------------------------------------
_TRUNC = 0.87962566103423978  # std of N(0, 1) truncated to [-2, 2]: Keras' variance-scaling correction


def init_params(arch: Architecture, seeds: torch.Tensor, scale: torch.Tensor, kinds: Sequence[str] | None = None,
                stds: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Initialization of ``K`` models, weights and biases times ``scale [K]``.

    By default (``kinds`` None, or ``"uniform"``) PyTorch's: linear/conv weights and biases ~ U(-b, b)
    with ``b = scale / sqrt(fan_in)``. Otherwise ``kinds[k]`` names model ``k``'s initializer of the
    weights (Keras' names; the biases start at 0, Keras' ``zeros``): ``normal`` N(0, std²) and
    ``truncated_normal`` (N(0, std²) redrawn outside two std) with ``std = stds[k]``; ``he_normal``
    and ``glorot_normal``, truncated normals with ``std = sqrt(2 / fan_in) / 0.8796`` and ``sqrt(2 / (fan_in
    + fan_out)) / 0.8796`` (Keras' variance scaling); ``orthogonal``: a Haar-random matrix with
    orthonormal rows or columns of ``[out, in * kernel]`` (Keras' ``Orthogonal``, gain 1). The normals
    come from the same counter-based hash as the uniform draws (inverse CDF, float64, on the CPU), so a
    model's weights do not depend on its group or device. Norm layers start at weight 1, bias 0,
    running mean 0, running variance 1.

    The other parameters of DAG architectures follow their modules' own defaults, times ``scale``:
    ``nn.MultiheadAttention``'s ``in_proj_weight`` Xavier-uniform (``b = sqrt(6 / (D + 3D))``), its
    ``out_proj.weight`` ``nn.Linear``'s U(-1/sqrt(D), 1/sqrt(D)), both biases 0; an ``nn.Embedding`` N(0, 1);
    a free ``param`` (class token, positional table) N(0, 0.02²), the ViT convention.
    """
    K, dev = len(seeds), seeds.device
    out: dict[str, torch.Tensor] = {}
    owners = {l.key(s): (l, s) for l in arch.layers for s in l.param_shapes()}
    for j, (key, shape) in enumerate(arch.param_shapes.items()):
        layer, suffix = owners[key]
        if layer.is_weight:
            bound = (scale.float() / math.sqrt(layer.in_features * layer.kernel_numel)).reshape((K,) + (1,) * len(shape))
            u = hash_uniform(seeds, _STREAM["init"] + j, torch.arange(math.prod(shape), device=dev)).reshape(K, *shape)
            out[key] = (2 * u - 1) * bound
        elif layer.kind in ("mha", "embedding", "param"):
            out[key] = _dag_init(layer, suffix, shape, seeds, _STREAM["init"] + j, scale)
        else:
            fill = 1.0 if suffix in ("weight", "running_var") else 0.0
            out[key] = torch.full((K, *shape), fill, device=dev)
    if kinds is None or all(k == "uniform" for k in kinds):
        return out
    bad = sorted(set(kinds) - set(INIT_KINDS))
    if bad:
        raise ConfigError(f"unknown init {bad} (use {', '.join(INIT_KINDS)})")
    rows = {k: torch.tensor([i for i, x in enumerate(kinds) if x == k], dtype=torch.long) for k in set(kinds) - {"uniform"}}
    std = (torch.full((K,), 0.05) if stds is None else stds.detach().cpu()).double()
    for j, (key, shape) in enumerate(arch.param_shapes.items()):
        layer = owners[key][0]
        if not layer.is_weight:
            continue
        for kind, r in rows.items():
            if key.endswith(".bias"):
                out[key][r.to(dev)] = 0.0
                continue
            fan_in, fan_out = layer.in_features * layer.kernel_numel, layer.out_features * layer.kernel_numel
            w = _keras_init(kind, seeds[r].cpu(), _STREAM["init"] + j, shape, fan_in, fan_out, std[r])
            out[key][r.to(dev)] = (w * scale[r.to(scale.device)].cpu().double().reshape((-1,) + (1,) * len(shape))).float().to(dev)
    return out


def _dag_init(layer, suffix: str, shape: Sequence[int], seeds: torch.Tensor, stream: int,
              scale: torch.Tensor) -> torch.Tensor:
    """``[K, *shape]`` initial values of one tensor of an ``mha``, ``embedding`` or ``param`` layer (see
    :func:`init_params`), from the counter-based hash (normals by the inverse CDF, as :func:`_keras_init`)."""
    K, dev = len(seeds), seeds.device
    view = (K,) + (1,) * len(shape)
    if layer.kind == "mha" and suffix.endswith("bias"):
        return torch.zeros((K, *shape), device=dev)
    u = hash_uniform(seeds, stream, torch.arange(math.prod(shape), device=dev)).reshape(K, *shape)
    if layer.kind == "mha":
        d = layer.out_features
        bound = math.sqrt(6.0 / (4 * d)) if suffix == "in_proj_weight" else 1.0 / math.sqrt(d)
        return (2 * u - 1) * (scale.float() * bound).reshape(view)
    z = torch.special.ndtri(u.double() + 2.0 ** -25).float()  # N(0, 1), u in (0, 1)
    return z * (scale.float() * (1.0 if layer.kind == "embedding" else 0.02)).reshape(view)


def _keras_init(kind: str, seeds: torch.Tensor, stream: int, shape: Sequence[int], fan_in: int, fan_out: int,
                std: torch.Tensor) -> torch.Tensor:
    """Weights ``[n, *shape]`` (float64) of one Keras initializer for the models of ``seeds``."""
    n = len(seeds)
    u = hash_uniform(seeds, stream, torch.arange(math.prod(shape))).double() + 2.0 ** -25  # in (0, 1)
    if kind in ("normal", "orthogonal"):
        z = torch.special.ndtri(u)
    else:  # N(0, 1) restricted to [-2, 2] by the inverse CDF (the distribution of redrawing outside)
        lo = torch.special.ndtr(torch.tensor(-2.0, dtype=torch.float64))
        z = torch.special.ndtri(lo + u * (1 - 2 * lo))
    z = z.reshape(n, *shape)
    if kind in ("normal", "truncated_normal"):
        return z * std.reshape((-1,) + (1,) * len(shape))
    if kind == "he_normal":
        return z * (math.sqrt(2.0 / fan_in) / _TRUNC)
    if kind == "glorot_normal":
        return z * (math.sqrt(2.0 / (fan_in + fan_out)) / _TRUNC)
    m = z.reshape(n, shape[0], -1)  # orthogonal: [n, out, in * kernel]
    tall = m.shape[1] >= m.shape[2]  # more rows than columns: orthonormal columns, else rows
    q, r = torch.linalg.qr(m if tall else m.transpose(1, 2))
    q = q * torch.sign(torch.diagonal(r, dim1=1, dim2=2))[:, None, :]  # Haar-distributed (Keras does the same)
    return (q if tall else q.transpose(1, 2)).reshape(n, *shape)


# -- training ------------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """Weights and metrics of ``K`` models at one epoch (tensors on CPU; metrics ``[K]``)."""

    epoch: int
    params: dict[str, torch.Tensor]
    metrics: dict[str, torch.Tensor]


def _hp(runs: Sequence[RunSpec], name: str, device) -> torch.Tensor:
    """Hyperparameter ``name`` of every run, float32 ``[K]`` (NumPy's fromiter: ~4x faster than a list
    of floats at 50,000 runs); an optional one (:data:`~wsnets.zoo.recipe.OPTIONAL_HYPER`) has its
    default where a run lacks it."""
    import numpy as np
    from operator import itemgetter
    get = itemgetter(name) if name not in OPTIONAL_HYPER else (lambda hp: hp.get(name, OPTIONAL_HYPER[name]))
    v = np.fromiter(map(get, (r.hp for r in runs)), dtype=np.float64, count=len(runs))
    return torch.from_numpy(v.astype(np.float32)).to(device)


def _uses(runs: Sequence[RunSpec], name: str) -> bool:
    """Whether any run sets optional hyperparameter ``name`` to other than its default."""
    return any(r.hp.get(name, OPTIONAL_HYPER[name]) != OPTIONAL_HYPER[name] for r in runs)


def _init_kinds(runs: Sequence[RunSpec], dev) -> tuple:
    """``init_params``' ``(kinds, stds)`` arguments: none where every run has PyTorch's default init."""
    if not _uses(runs, "init"):
        return ()
    return [r.hp.get("init", "uniform") for r in runs], _hp(runs, "init_std", "cpu")


def train_group(arch: Architecture, runs: Sequence[RunSpec], *, epochs: int, checkpoints: Sequence[int],
                batch_size: int, bank: DataBank, device: torch.device | str = "cpu",
                init: dict[str, torch.Tensor] | None = None,
                on_step: Callable[[int], None] | None = None, engine: str = "auto",
                fused: bool | None = None, steps_per_epoch: int | None = None) -> Iterator[Checkpoint]:
    """Train ``K = len(runs)`` models of architecture ``arch`` together; yield a :class:`Checkpoint` at
    each epoch in ``checkpoints`` (0 = before training), models in the order of ``runs``.

    ``init`` (state-dict key -> ``[K, ...]``) replaces the random initialization (fine-tuning).
    ``on_step(n)`` is called after each optimizer step with ``n`` steps done (progress bars).
    ``engine``: ``"mlp"`` (hand-written forward/backward, Linear + activation stacks only),
    ``"cnn"`` (hand-written, conv stacks -> global average pooling -> linear layers:
    :class:`wsnets.zoo.cnn_engine.CNNEngine`), ``"dag"`` (any architecture, convolution feature maps
    in the grouped layout ``[B, K*C, ...]``: :class:`wsnets.zoo.dag_engine.DAGEngine`), ``"autograd"``
    (any architecture, through :func:`wsnets.functional.forward`) or ``"auto"`` (``"mlp"`` where it
    applies, ``"dag"`` for DAG architectures, else ``"autograd"``).
    ``steps_per_epoch``: optimizer steps per epoch (default ``ceil(largest training split / batch_size)``).
    ``fused``: train MLP groups with one Triton kernel per step (:mod:`wsnets.zoo.fused`); ``None`` =
    wherever it applies (CUDA with Triton installed, supported widths and activation, groups of at
    least ``fused.MIN_MODELS`` models).

    Models are sorted internally by (dropout > 0, optimizer) so that each optimizer and the dropout
    masks act on contiguous row blocks. The optimizer is a handful of elementwise operations per
    parameter block (one block ``[K, P]`` with autograd, one ``[K, in+1, out]`` per layer for MLPs).
    """
    dev = torch.device(device)
    order = sorted(range(len(runs)), key=lambda i: (runs[i].hp["dropout"] > 0, runs[i].hp["optimizer"], i))
    inv = torch.empty(len(order), dtype=torch.long)
    inv[torch.tensor(order)] = torch.arange(len(order))
    runs = [runs[i] for i in order]
    if init is not None:
        init = {k: v[torch.tensor(order)] for k, v in init.items()}
    bad_opt = sorted({r.hp["optimizer"] for r in runs} - set(OPTIMIZERS))
    if bad_opt:
        raise ConfigError(f"unknown optimizer(s) {bad_opt} (use {', '.join(OPTIMIZERS)})")
    K = len(runs)
    seeds = torch.tensor([r.seed for r in runs], dtype=torch.long, device=dev)
    didx = torch.tensor([bank.names.index(r.dataset) for r in runs], device=dev)
    n_data = bank.n[didx]  # [K]
    Nmax = bank.x.shape[1]
    ar = torch.arange(Nmax, device=dev)
    valid = ar[None] < n_data[:, None]  # [K, Nmax]
    # training subset: the n_k positions with the smallest hash keys
    n_sub = torch.minimum(torch.clamp((_hp(runs, "train_fraction", dev) * n_data).round().long(), min=1), n_data)
    keys = torch.where(valid, hash_uniform(seeds, _STREAM["subset"], ar), torch.full((), 2.0, device=dev))
    rank = torch.empty_like(ar).repeat(K, 1).scatter_(1, keys.argsort(1), ar.repeat(K, 1))
    member = rank < n_sub[:, None]  # [K, Nmax]
    memb = _members(member)
    # label noise: a fixed set of corrupted labels per model
    flip = hash_uniform(seeds, _STREAM["noise_flip"], ar) < _hp(runs, "label_noise", dev)[:, None]
    rnd = (hash_uniform(seeds, _STREAM["noise_label"], ar) * bank.num_classes).long().clamp_max(bank.num_classes - 1)
    y_train = torch.where(flip, rnd, bank.y[didx])
    shared = len(bank.names) == 1

    params = init_params(arch, seeds, _hp(runs, "init_scale", dev), *_init_kinds(runs, dev)) if init is None else \
        {k: v.detach().clone().to(dev) for k, v in init.items()}
    drop = _hp(runs, "dropout", dev)
    n_drop = int((drop > 0).sum())
    gen = torch.Generator(device=dev).manual_seed(zlib.crc32(",".join(r.model_id for r in runs).encode()))
    if engine == "auto":
        engine = "mlp" if _MLPEngine.supports(arch) else "autograd" if arch.is_chain else "dag"
    if _uses(runs, "l2") or any(o == "rmsprop" for o in (r.hp["optimizer"] for r in runs)) \
            or any(r.hp["grad_clip"] <= 0 for r in runs):  # the fused Triton kernel has none of these
        if fused:
            raise ConfigError("fused=True: the fused kernel has no RMSprop, l2 penalty or unclipped models")
        fused = False
    if engine == "mlp":
        eng = _MLPEngine(arch, params, bank, batch_size, drop, n_drop, gen, fused=fused)
    elif engine == "cnn":
        if fused:
            raise ConfigError("fused=True needs the MLP engine (Linear + activation stacks)")
        from .cnn_engine import CNNEngine
        eng = CNNEngine(arch, params, bank, batch_size, drop, n_drop, gen)
    else:
        if fused:
            raise ConfigError("fused=True needs the MLP engine (Linear + activation stacks)")
        if engine == "dag":
            from .dag_engine import DAGEngine
            eng = DAGEngine(arch, params, bank, batch_size, drop, n_drop, gen)
        elif engine == "autograd":
            eng = _AutogradEngine(arch, params, bank, batch_size, drop, n_drop, gen)
        else:
            raise ConfigError(f"engine {engine!r} unknown (use auto, mlp, cnn, dag or autograd)")
    data_idx = didx[:, None] * Nmax  # offset of each model's dataset in the flattened bank
    row_off = (torch.arange(K, device=dev) * Nmax)[None, :, None]  # offset of each model's row of y_train
    opt = _Optimizer(eng.blocks, runs, dev, kernel_masks=eng.kernel_masks() if _uses(runs, "l2") else None)
    frozen = torch.zeros(K, 1, dtype=torch.bool, device=dev)
    steps = steps_per_epoch or math.ceil(int(bank.n.max()) / batch_size)
    per_block = max(1, (1 << 25) // (K * steps * batch_size))  # epochs of sample order computed at once (int32)
    for epoch in range(0, epochs + 1):
        if epoch > 0:
            snapshot = [b.detach().clone() for b in eng.blocks + eng.buffers]
            opt.set_frozen(frozen)
            e0 = (epoch - 1) % per_block
            if e0 == 0:  # [K, n * steps * B]: fewer, larger sorts (a pass spanning two epochs is sorted once)
                stream = _epoch_order(seeds, memb, n_sub, epoch - 1, steps * batch_size, Nmax,
                                      epochs=min(per_block, epochs - epoch + 1))
            ep = stream[:, e0 * steps * batch_size:(e0 + 1) * steps * batch_size].reshape(K, steps, batch_size)
            if dev.type == "cpu":  # this epoch's batches at once, step-major [steps, K, B]: rows of the
                # flattened bank and their labels (three small ops per epoch instead of per step; on a GPU
                # they are asynchronous anyway, and one epoch of int64 indices of a huge group is large)
                idx = ep.transpose(0, 1).long().contiguous()
                batches = zip(idx + data_idx[None], torch.take(y_train, idx + row_off))
            else:
                batches = ((i + data_idx, y_train.gather(1, i)) for i in (ep[:, s].long() for s in range(steps)))
            for fidx, yb in batches:  # [K, B] rows of the flattened bank, their labels
                opt.t += 1
                eng.step(fidx, yb, opt)
                if on_step is not None:
                    on_step(1)
            with torch.no_grad():
                bad = torch.zeros_like(frozen)
                for b in eng.blocks + eng.buffers:
                    if opt.lib is not None and b.is_contiguous() and b.dtype == torch.float32:
                        cpu_kernels.rows_nonfinite(opt.lib, b, bad)
                    else:
                        bad |= ~torch.isfinite(b.flatten(1)).all(1, keepdim=True)
                if bool(bad.any()):
                    for b, old in zip(eng.blocks + eng.buffers, snapshot):
                        b.copy_(torch.where(bad.reshape((-1,) + (1,) * (b.dim() - 1)), old, b))
                    frozen |= bad
        if epoch in checkpoints:
            with torch.no_grad(), _full_fp32():
                p = eng.params()
                metrics = evaluate(eng.logits, bank, didx, y_train, member, shared, chunk=getattr(eng, "eval_chunk", EVAL_CHUNK),
                                   members=(memb, n_sub, data_idx, eng.row_logits) if engine == "cnn" else None)
            metrics["diverged"] = frozen[:, 0].double()
            yield Checkpoint(epoch, _to_host(p, inv), _to_host(metrics, inv))


def _to_host(ts: dict[str, torch.Tensor], inv: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows ``inv`` of each tensor, as new CPU tensors. From a GPU: reordered there, then copied into
    page-locked memory with one synchronization (a pageable copy ran at ~1.3 GB/s on an H100 host)."""
    if all(t.device.type == "cpu" for t in ts.values()):
        return {k: t.detach()[inv].clone() for k, t in ts.items()}
    if not all(t.device.type == "cuda" for t in ts.values()):
        return {k: t.detach()[inv.to(t.device)].cpu() for k, t in ts.items()}
    out = {}
    inv = inv.to(next(iter(ts.values())).device)
    for k, t in ts.items():
        src = t.detach()[inv]
        out[k] = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
        out[k].copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return out


@contextlib.contextmanager
def _full_fp32():
    """No TF32 inside (CUDA matrix products and cuDNN convolutions): recorded metrics are float32
    numbers that a plain ``nn.Module`` reproduces, whatever the process's TF32 settings."""
    mm = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        c = torch.backends.cudnn
        with c.flags(enabled=c.enabled, benchmark=c.benchmark, deterministic=c.deterministic, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = mm


def _flat_inputs(bank: DataBank, extra_ones: bool) -> torch.Tensor:
    """The bank's training inputs as one ``[D * Nmax, features]`` float32 matrix (rows = dataset-major
    positions), with a trailing column of ones if ``extra_ones`` (a bias folded into the weights)."""
    x = bank.x.reshape(bank.x.shape[0] * bank.x.shape[1], -1).float()
    return torch.cat([x, x.new_ones(len(x), 1)], 1).contiguous() if extra_ones else x.contiguous()


class _AutogradEngine:
    """Any architecture: all trainable parameters in one leaf ``theta [K, P]`` (state-dict layout, the
    layer tensors are views of it), run through :func:`wsnets.functional.forward`; the loss is the sum
    over models of each model's mean cross-entropy, so one backward pass gives every model its gradient."""

    def __init__(self, arch, params, bank, batch_size, drop, n_drop, gen):
        self.arch, self.batch_size, self.gen = arch, batch_size, gen
        self.drop = drop if n_drop else None
        self.K = K = len(drop)
        self.keys = [k for k in params if not k.endswith(("running_mean", "running_var"))]
        self.bufs = {k: v for k, v in params.items() if k not in self.keys}
        self.shapes = [params[k].shape[1:] for k in self.keys]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.theta = torch.cat([params[k].reshape(K, -1) for k in self.keys], 1).requires_grad_(True)  # [K, P]
        self.blocks, self.buffers = [self.theta], list(self.bufs.values())
        self.x = _flat_inputs(bank, False)
        self.shape = tuple(bank.x.shape[2:])

    def kernel_masks(self) -> list[torch.Tensor]:
        """1 where ``theta`` holds a weight of a linear or conv layer (the entries an ``l2`` penalty acts on)."""
        weights = {f"{l.name}.weight" for l in self.arch.layers if l.is_weight}
        return [torch.cat([torch.full((n,), float(k in weights)) for k, n in zip(self.keys, self.sizes)])[None]]

    def params(self, theta: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        th = self.theta.detach() if theta is None else theta
        out = {k: t.reshape(self.K, *s) for k, t, s in zip(self.keys, th.split(self.sizes, 1), self.shapes)}
        out.update(self.bufs)
        return out

    def grads(self, fidx: torch.Tensor, yb: torch.Tensor) -> list[torch.Tensor]:
        xb = self.x.index_select(0, fidx.reshape(-1)).reshape(*fidx.shape, *self.shape)
        logits = forward(self.arch, self.params(self.theta), xb, train=True, dropout=self.drop, generator=self.gen)
        # class dim second ([K, C, B]): PyTorch's CPU kernel is ~5x faster than with [K*B, C]
        loss = F.cross_entropy(logits.transpose(1, 2), yb, reduction="sum") / self.batch_size
        return list(torch.autograd.grad(loss, [self.theta]))

    def step(self, fidx: torch.Tensor, yb: torch.Tensor, opt: "_Optimizer") -> None:
        grads = self.grads(fidx, yb)
        with torch.no_grad():
            opt.step(grads)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluation logits ``[K, C, N]``."""
        return forward(self.arch, self.params(), x).transpose(1, 2)


# activation -> backward(grad of output, pre-activation z, output y, slope): exact derivatives (aten kernels)
_ACT_BACKWARD: dict[str, Callable] = {
    "identity": lambda g, z, y, s: g,
    "relu": lambda g, z, y, s: torch.ops.aten.threshold_backward.grad_input(g, y, 0, grad_input=g),
    "tanh": lambda g, z, y, s: torch.ops.aten.tanh_backward.grad_input(g, y, grad_input=g),
    "sigmoid": lambda g, z, y, s: torch.ops.aten.sigmoid_backward.grad_input(g, y, grad_input=g),
    "gelu": lambda g, z, y, s: torch.ops.aten.gelu_backward.grad_input(g, z, grad_input=g),
    "silu": lambda g, z, y, s: torch.ops.aten.silu_backward.grad_input(g, z, grad_input=g),
    "elu": lambda g, z, y, s: torch.ops.aten.elu_backward.grad_input(g, 1.0, 1, 1, False, z, grad_input=g),
    "softplus": lambda g, z, y, s: torch.ops.aten.softplus_backward.grad_input(g, z, 1, 20, grad_input=g),
    "leaky_relu": lambda g, z, y, s: torch.ops.aten.leaky_relu_backward.grad_input(g, z, s, False, grad_input=g),
}  # in place: ``g`` (a contiguous buffer of the engine) is not needed afterwards
_FROM_OUTPUT = ("identity", "relu", "tanh", "sigmoid")  # backward needs only the output


class _MLPEngine:
    """Linear + activation stacks with a hand-written forward and backward (no autograd graph).

    Activations are feature-major, ``[K, features, B]``; layer ``l`` is one block ``[K, in+1, out]``
    (``nn.Linear``'s weight transposed, the bias as an extra row) and its input carries an extra row of
    ones, so the forward is one ``bmm`` per layer and the gradient of a whole block (bias included) is
    one ``bmm`` into a contiguous buffer. This layout (``input @ dz^T`` for the gradient) makes the
    three matrix products of a layer 12-20% faster than ``nn.Linear``'s ``[out, in+1]`` on the recipe's
    shapes with MKL, and MKL's batched path needs contiguous outputs (a strided one is ~2x slower at
    width 32). Each model's slice of an activation
    buffer is contiguous (fast elementwise kernels), and the softmax runs over dim 1 of ``[K, C, B]``
    (PyTorch's CPU softmax is ~30x faster there than over a last dim of size 10). Dropout (rows
    ``K - n_drop:``) uses inverted masks (:meth:`_dropout`).
    """

    @staticmethod
    def supports(arch: Architecture) -> bool:
        ls = [l for l in arch.layers if not (l.kind == "flatten" and l is arch.layers[0])]
        kinds = [l.kind for l in ls]
        return (len(ls) % 2 == 1 and kinds[::2] == ["linear"] * len(kinds[::2]) and all(l.bias for l in ls[::2])
                and kinds[1::2] == ["act"] * len(kinds[1::2]) and all(l.fn in _ACT_BACKWARD for l in ls[1::2]))

    def __init__(self, arch, params, bank, batch_size, drop, n_drop, gen, chunk: int | None = None,
                 flat: bool | None = None, fused: bool | None = None):
        self.arch = arch
        _dropout_state(self, gen, drop.device)
        self.lin = [l for l in arch.layers if l.kind == "linear"]
        self.acts = [l for l in arch.layers if l.kind == "act"]
        self.K = K = len(drop)
        self.B = B = batch_size
        dev = drop.device
        self.buffers: list[torch.Tensor] = []
        self.twin_args = (bank, B, drop, n_drop)
        self.fused = self._fused_plan(fused, bank, B, dev)
        if self.fused:  # one kernel per step keeps everything in registers: no chunk buffers
            chunk, flat = K, False
        x = _flat_inputs(bank, True)
        # models per chunk (CPU): a chunk's forward, backward and update run back to back on ~16 MB of
        # tensors; ~100-150 models of 64-32-32-10 per chunk measured fastest (vs whole-K kernels at K=512)
        per_model = B * (x.shape[1] + sum(2 * l.out_features + 1 for l in self.lin)) + 4 * arch.num_params
        C = self.C = min(K, chunk or (max(32, (1 << 22) // per_model) if dev.type == "cpu" else K))
        self.xT = x.T.contiguous()  # [in+1, rows]: batches are gathered feature-major (see _views)
        self.xbufs: dict[int, torch.Tensor] = {}  # chunk size -> gather buffer
        if self.fused:
            C = 0
        self.h = [torch.ones(C, l.out_features + 1, B, device=dev) for l in self.lin[:-1]]  # inputs of layers 1..
        self.z = [torch.empty(C, l.out_features, B, device=dev) for l in self.lin]
        # [K, in+1, out]: nn.Linear's weight transposed, the bias as an extra row
        w = [torch.cat([params[f"{l.name}.weight"], params[f"{l.name}.bias"][..., None]], 2).transpose(1, 2)
             for l in self.lin]
        # small chunks (small groups: the recipe's): all parameters of a model in one row of theta [K, P], so
        # the optimizer is a few kernels per chunk whatever the depth (the layers' gradients are copied
        # into one [C, P] buffer by one cat); large chunks: one contiguous block per layer (~4% faster
        # per step at C=150 for 64-32-32-10, where the optimizer's kernels are large)
        self.flat = C <= 64 if flat is None else flat
        if self.flat:
            self.theta = torch.cat([t.reshape(K, -1) for t in w], 1)
            offs = [0] + [int(v) for v in torch.tensor([t[0].numel() for t in w]).cumsum(0)]
            self.w = [self.theta[:, o:o + t[0].numel()].view(t.shape) for o, t in zip(offs, w)]  # [K, in+1, out]
            self.blocks = [self.theta]
            self.gflat = torch.empty(C, self.theta.shape[1], device=dev)
        else:
            self.w = self.blocks = [t.contiguous() for t in w]
        self.g = [torch.empty(C, *t.shape[1:], device=dev) for t in w]
        self.da = [torch.empty(C, l.out_features, B, device=dev) for l in self.lin[:-1]]
        self.views: dict[int, tuple] = {}
        self.s0 = K - n_drop
        self.keep = (1 - drop).reshape(-1, 1, 1)
        self.neg = torch.full((C, 1, B), -1.0 / B, device=dev)
        self.inv_b = 1.0 / B
        self.softmax_in_place = dev.type == "cpu"  # the output buffer may be its input on CPU only

    def _fused_plan(self, fused: bool | None, bank: DataBank, B: int, dev: torch.device) -> bool:
        """Whether steps run as one Triton kernel (:mod:`wsnets.zoo.fused`); ``fused=True`` insists."""
        from . import fused as fz
        widths = [self.lin[0].in_features] + [l.out_features for l in self.lin]
        fns = {a.fn for a in self.acts}
        ok = fz.available(dev) and len(fns) == 1 and fz.supports(widths, next(iter(fns)), B)
        if fused and not ok:
            raise ConfigError(f"fused=True: needs CUDA with Triton (or TRITON_INTERPRET=1), one activation among "
                              f"{sorted(fz.ACTS)}, and padded batch x summed padded widths <= {fz.MAX_TILE}; got device "
                              f"{dev}, activations {sorted(fns)}, widths {widths}, batch {B} "
                              f"({fz.tile_size(widths, B)})")
        self.twin: _MLPEngine | None = None  # the torch path that takes over if the kernel fails
        if not (ok and dev.type == "cuda" and self.K >= fz.MIN_MODELS if fused is None else fused):  # auto: GPUs
            return False
        act = self.acts[0]
        self.fz = (fz, widths, act.fn, act.slope, _flat_inputs(bank, False), self.gen.initial_seed())
        self.fz_hp: dict[str, torch.Tensor] | None = None
        self.fz_insist = bool(fused)
        return True

    def _fall_back(self, err: Exception) -> None:
        """The kernel could not run (compilation or launch failed: another GPU, another Triton): this group
        goes on with the torch path on the same parameter blocks and optimizer state, from this step."""
        import warnings
        warnings.warn(f"wsnets zoo: the fused Triton kernel failed ({type(err).__name__}: {str(err)[:200]}); "
                      "training this group with the torch path instead", RuntimeWarning, stacklevel=3)
        bank, B, drop, n_drop = self.twin_args
        twin = _MLPEngine(self.arch, self.params(), bank, B, drop, n_drop, self.gen, flat=False, fused=False)
        twin.w = twin.blocks = self.w  # the blocks the optimizer updates
        self.fused, self.twin = False, twin

    def _fused_step(self, fidx: torch.Tensor, yb: torch.Tensor, opt: "_Optimizer") -> None:
        fz, widths, fn, slope, x, seed = self.fz
        if self.fz_hp is None:  # views of the optimizer's per-model tensors (updated in place by it)
            adam = torch.zeros(self.K, device=x.device)
            for o, s, e in opt.segments:
                if o == "adam":
                    adam[s:e] = 1.0
            self.fz_hp = {"lr": opt.step_lr.view(-1), "momentum": opt.mom.view(-1).contiguous(),
                          "weight_decay": opt.wd.view(-1).contiguous(), "clip": opt.clip.view(-1).contiguous(),
                          "adam": adam, "keep": self.keep.reshape(-1).contiguous()}
        m2 = opt.m2 if opt.m2[0] is not None else None
        fz.step(x, fidx.contiguous(), yb.contiguous(), self.w, opt.m1, m2, self.fz_hp, widths, fn, slope, opt.t,
                zlib.crc32(f"{seed}:{opt.t}".encode()) & 0x7FFFFFFF, self.s0 < self.K)

    def kernel_masks(self) -> list[torch.Tensor]:
        """1 on the weights, 0 on the bias rows of the blocks ``[K, in+1, out]`` (or of the one flat block)."""
        masks = [torch.cat([torch.ones(w.shape[1] - 1, w.shape[2]), torch.zeros(1, w.shape[2])])[None] for w in self.w]
        return [torch.cat([m.flatten(1) for m in masks], 1)] if self.flat else masks

    def params(self) -> dict[str, torch.Tensor]:
        out = {}
        for l, w in zip(self.lin, self.w):
            out[f"{l.name}.weight"] = w[:, :-1].transpose(1, 2).contiguous()
            out[f"{l.name}.bias"] = w[:, -1].contiguous()
        return out

    def step(self, fidx: torch.Tensor, yb: torch.Tensor, opt: "_Optimizer") -> None:
        """One optimizer step of every model, chunk by chunk (forward, backward, update)."""
        if self.fused:
            try:
                return self._fused_step(fidx, yb, opt)
            except Exception as err:  # noqa: BLE001 - any compile/launch failure; fused=True re-raises
                if self.fz_insist:
                    raise
                self._fall_back(err)
        if self.twin is not None:
            return self.twin.step(fidx, yb, opt)
        for a in range(0, self.K, self.C):
            b = min(a + self.C, self.K)
            opt.step(self._grads(a, b, fidx[a:b], yb[a:b]), a, b)

    def _views(self, a: int, b: int) -> tuple:
        """Views for the chunk of models ``a:b`` into the blocks and the chunk buffers (built once)."""
        n, B = b - a, self.B
        d0 = min(max(self.s0 - a, 0), n)  # first dropout row of the chunk
        # the input batch, gathered as [in+1, n * B] and seen as [n, in+1, B]: the first layer's bmm runs
        # ~2x faster than on a [n * B, in+1] gather (64-32-32-10 at n=150, B=64), the gather ~1.4x slower
        xb = self.xbufs.get(n)
        if xb is None:
            xb = self.xbufs[n] = torch.empty(self.xT.shape[0], n * B, device=self.xT.device)
        inputs = [xb.view(-1, n, B).permute(1, 0, 2)] + [h[:n] for h in self.h]  # [n, in+1, B]
        wT = [None] + [w[a:b, :-1] for w in self.w[1:]]  # [n, in, out]: back through layers 1..
        g = [t[:n] for t in self.g]
        return (n, d0, xb, inputs, [w[a:b].transpose(1, 2) for w in self.w], wT, self.keep[a + d0:b],
                [z[:n] for z in self.z + [torch.empty_like(self.z[-1])]], g, [t[:n] for t in self.da], self.neg[:n],
                [self.gflat[:n]] if self.flat else g)

    def _grads(self, a: int, b: int, fidx: torch.Tensor, yb: torch.Tensor) -> list[torch.Tensor]:
        """Gradients of models ``a:b`` (views of the chunk buffers)."""
        v = self.views.get(a)
        if v is None:
            v = self.views[a] = self._views(a, b)
        n, d0, xb, inputs, blocks, wT, keep, zs, g, das, neg, grads = v
        torch.index_select(self.xT, 1, fidx.reshape(-1), out=xb)
        saved = []
        for i, act in enumerate(self.acts):
            z = torch.bmm(blocks[i], inputs[i], out=zs[i])
            hv = inputs[i + 1][:, :-1]
            if d0 == n:  # no dropout: the activation goes straight into the next layer's input
                y = _act_into(act.fn, z, hv, act.slope)
                scale = None
            else:
                y = _act_into(act.fn, z, z if act.fn in _FROM_OUTPUT else None, act.slope)
                hv[:d0].copy_(y[:d0])
                scale = self._dropout(a, i, d0, n, keep, y[d0:], hv[d0:])
            saved.append((z, y, scale))
        logits = torch.bmm(blocks[-1], inputs[-1], out=zs[-1])  # [n, C, B]
        # d(sum over models of mean cross-entropy)/d logits = (softmax - onehot) / B
        dz = torch.ops.aten._softmax.out(logits, 1, False, out=zs[-1 if self.softmax_in_place else -2])
        dz = dz.mul_(self.inv_b).scatter_add_(1, yb[:, None], neg)
        for i in range(len(self.lin) - 1, 0, -1):
            torch.bmm(inputs[i], dz.transpose(1, 2), out=g[i])
            da = torch.bmm(wT[i], dz, out=das[i - 1])
            z, y, scale = saved[i - 1]
            if scale is not None:
                da[d0:].mul_(scale)
            act = self.acts[i - 1]
            dz = _ACT_BACKWARD[act.fn](da, z, y, act.slope)
        torch.bmm(inputs[0], dz.transpose(1, 2), out=g[0])
        if self.flat:
            torch.cat([t.flatten(1) for t in g], 1, out=grads[0])
        return grads

    def _dropout(self, a: int, layer: int, d0: int, n: int, keep: torch.Tensor, y: torch.Tensor,
                 out: torch.Tensor) -> torch.Tensor:
        """Inverted dropout of the rows ``d0:n`` of the chunk at ``a`` after hidden layer ``layer``:
        ``out = y * scale`` with ``scale`` (returned, ``[n - d0, out, B]``) ``1 / keep`` with probability
        ``keep`` (per model), else 0.

        On CPU the mask is a 16-bit random number below ``round(keep * 2**16)`` (keep rounded to a
        multiple of 2**-16, the factor is its exact inverse), from a NumPy PCG64 stream seeded like
        ``gen``: ~4x cheaper than ``torch.rand`` + compare + divide, which was a fifth of the recipe's
        training time; with the fused CPU loops (:mod:`wsnets.zoo.cpu_kernels`) draw, compare, factor
        and product are one pass over the same stream. Other devices draw ``torch.rand`` from ``gen``."""
        return _dropout_rows(self, (a, layer), keep, y, out, (n - d0, self.lin[layer].out_features, self.B))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluation logits ``[K, C, N]`` of inputs ``x`` ``[N, ...]`` (shared) or ``[K, N, ...]``,
        computed chunk by chunk of models (activations in place: small, cache-resident tensors)."""
        h0 = x.flatten(x.dim() - len(self.arch.input_shape or (x.shape[-1],))).transpose(-1, -2)  # [(K,) in, N]
        out = []
        for a in range(0, self.K, self.C):
            b = min(a + self.C, self.K)
            h = h0.expand(b - a, *h0.shape[-2:]) if h0.dim() == 2 else h0[a:b]
            for i, w in enumerate(self.w):
                h = torch.baddbmm(w[a:b, -1:].transpose(1, 2), w[a:b, :-1].transpose(1, 2), h)
                if i < len(self.acts):
                    h = _act_into(self.acts[i].fn, h, h if self.acts[i].fn in _FROM_OUTPUT else None, self.acts[i].slope)
            out.append(h)
        return torch.cat(out) if len(out) > 1 else out[0]


def _dropout_state(eng, gen: torch.Generator, dev: torch.device) -> None:
    """The random state of an engine's dropout (see :func:`_dropout_rows`): on CPU a NumPy PCG64 stream
    seeded like ``gen`` (and the fused C loops' copy of it), elsewhere ``gen`` itself."""
    eng.gen, eng.cpu_lib = gen, None
    if dev.type == "cpu":
        import numpy as np
        eng.np_rng = np.random.Generator(np.random.PCG64(gen.initial_seed()))
        eng.cpu_lib = cpu_kernels.load()
        if eng.cpu_lib is not None:  # the fused dropout loop advances its own copy of the stream
            eng.pcg = cpu_kernels.pcg64_state(eng.np_rng.bit_generator)
    else:
        eng.np_rng = None
    eng.drop_bufs = {}


def _dropout_rows(eng, key, keep: torch.Tensor, y: torch.Tensor, out: torch.Tensor, shape: tuple) -> torch.Tensor:
    """Inverted dropout ``out = y * scale`` of ``shape[0]`` models (rows, each ``y[r]`` contiguous) with
    per-row keep probabilities ``keep`` (``[rows, 1, 1]``); returns ``scale`` (``shape``: 0 or ``1 / keep``,
    see :meth:`_MLPEngine._dropout`). ``key`` names the call site: its buffers stay in ``eng.drop_bufs``,
    and every call draws from the engine's one stream (:func:`_dropout_state`)."""
    if eng.np_rng is None:
        scale = (torch.rand(shape, generator=eng.gen, device=keep.device) < keep) / keep
        torch.mul(y, scale, out=out)
        return scale
    import numpy as np
    bufs = eng.drop_bufs.get(key)
    if bufs is None:
        k16 = (keep.reshape(-1, 1, 1).cpu().double() * 65536).round().clamp(1, 65535)
        inv = (65536 / k16).float()
        if eng.cpu_lib is not None:
            bufs = (k16.reshape(-1).numpy().astype(np.uint16), inv.reshape(-1).contiguous(), torch.empty(shape))
        else:
            thr = np.ascontiguousarray(np.broadcast_to(k16.numpy().astype(np.uint16), shape))
            mask = np.empty(shape, bool)
            bufs = (thr, mask, torch.from_numpy(mask.view(np.uint8)), inv, torch.empty(shape))
        eng.drop_bufs[key] = bufs
    if eng.cpu_lib is not None:
        thr, inv, scale = bufs
        cpu_kernels.dropout(eng.cpu_lib, eng.pcg, y, out, scale, thr, inv)
        return scale
    thr, mask, mask_t, inv, scale = bufs
    count = thr.size
    raw = eng.np_rng.bit_generator.random_raw((count + 3) // 4).view(np.uint16)[:count].reshape(shape)
    np.less(raw, thr, out=mask)
    torch.mul(mask_t.float(), inv, out=scale)  # 0 or 1/keep exactly (torch casts ~3x faster than NumPy)
    torch.mul(y, scale, out=out)
    return scale


def _act_into(fn: str, z: torch.Tensor, out: torch.Tensor | None, slope: float) -> torch.Tensor:
    """``activation(fn, z)`` written into ``out`` (may be ``z`` itself, or a strided view); a new tensor if ``out`` is None."""
    if fn == "relu" and out is not None:
        return torch.clamp_min(z, 0, out=out)
    if fn in ("tanh", "sigmoid") and out is not None:
        return getattr(torch, fn)(z, out=out)
    y = activation(fn, z, slope)
    return y if out is None else out.copy_(y)


class _Optimizer:
    """Per-model SGD (momentum, L2 weight decay), AdamW or RMSprop on parameter blocks ``[K, ...]``,
    with per-model gradient-norm clipping over all blocks (``grad_clip <= 0``: none) and an optional
    per-model L2 penalty on the weight tensors (``l2``: ``2 * l2 * w`` added to the gradient of the
    entries where ``kernel_masks`` is 1); models of one optimizer are contiguous rows."""

    def __init__(self, blocks: list[torch.Tensor], runs: Sequence[RunSpec], dev,
                 kernel_masks: list[torch.Tensor] | None = None):
        self.blocks = blocks
        self.lr, self.mom, self.wd = (_hp(runs, k, dev)[:, None] for k in ("lr", "momentum", "weight_decay"))
        self.clip = _hp(runs, "grad_clip", dev)[:, None]
        self.noclip = (self.clip <= 0) if bool((self.clip <= 0).any()) else None  # rows without clipping
        self.segments = _segments([r.hp["optimizer"] for r in runs])
        self.m1 = [torch.zeros_like(b, requires_grad=False) for b in blocks]
        adam = any(o in ("adam", "rmsprop") for o, _, _ in self.segments)
        self.m2 = [torch.zeros_like(m) for m in self.m1] if adam else [None] * len(blocks)
        self.l2 = None  # per block: 2 * l2 (per row) * kernel mask, the L2 penalty's gradient factor
        if kernel_masks is not None:
            l2 = 2 * _hp(runs, "l2", dev)
            self.l2 = [(l2.view((-1,) + (1,) * (b.dim() - 1)) * m.to(dev)).expand_as(b).contiguous()
                       for b, m in zip(blocks, kernel_masks)]
        self.t = 0
        self.step_lr = self.lr.clone()
        # the fused AdamW loops: contiguous float32 blocks on the CPU (the trainer's are)
        self.lib = None
        if dev.type == "cpu" and all(b.is_contiguous() and b.dtype == torch.float32 for b in blocks):
            self.lib = cpu_kernels.load()
        self.plans: dict[tuple[int, int], list] = {}

    def set_frozen(self, frozen: torch.Tensor) -> None:
        """Frozen models (``[K, 1]`` bool) take steps of learning rate 0 from now on."""
        self.step_lr.copy_(torch.where(frozen, 0.0, self.lr))

    def _plan(self, a: int, b: int) -> tuple:
        """Views of the state of models ``a:b``, per block and optimizer segment (built once per chunk)."""
        segs = [(o, max(s, a) - a, min(e, b) - a) for o, s, e in self.segments if s < b and e > a]
        hp = [v[a:b] for v in (self.step_lr, self.mom, self.wd)]
        out = []
        for p, m1, m2 in zip(self.blocks, self.m1, self.m2):
            view = (-1,) + (1,) * (p.dim() - 1)
            out.append([(o, s, e, p[a:b][s:e], m1[a:b][s:e], None if m2 is None else m2[a:b][s:e],
                         *(v[s:e].view(view) for v in hp[:2]),
                         hp[2][s:e].view(view) if bool(hp[2][s:e].any()) else None,  # no decay: skip the term
                         float(hp[1][s]) if bool((hp[1][s:e] == hp[1][s]).all()) else None,  # one momentum
                         torch.empty_like(p[a:b][s:e], memory_format=torch.contiguous_format)
                         if o in ("adam", "rmsprop") else None)  # AdamW's / RMSprop's denominator
                        for o, s, e in segs])
        return self.clip[a:b], out, torch.ones_like(self.clip[a:b])

    def step(self, grads: list[torch.Tensor], a: int = 0, b: int | None = None) -> None:
        """Update models ``a:b`` from their gradients (``grads[i]`` = rows ``a:b`` of block ``i``; scaled
        in place by the clipping factor). The step counter ``t`` is advanced by the caller."""
        b = len(self.lr) if b is None else b
        plan = self.plans.get((a, b))
        if plan is None:
            plan = self.plans[(a, b)] = self._plan(a, b)
        clip, blocks, ones = plan
        if self.l2 is not None:  # the L2 penalty's gradient, before clipping (it is part of the loss)
            for g, f, p in zip(grads, self.l2, self.blocks):
                g.addcmul_(p[a:b], f[a:b])
        noclip = None if self.noclip is None else self.noclip[a:b]
        if noclip is not None and bool(noclip.all()):
            coef, unclipped = ones, True
        else:
            sq = torch.linalg.vector_norm(grads[0].flatten(1), dim=1, keepdim=True).square_()
            for g in grads[1:]:
                sq += torch.linalg.vector_norm(g.flatten(1), dim=1, keepdim=True).square_()
            coef = sq.sqrt_().add_(1e-6).reciprocal_().mul_(clip).clamp_(max=1.0)  # clip / (norm + 1e-6), at most 1
            if noclip is not None:
                coef = torch.where(noclip, 1.0, coef)
            unclipped = not bool((coef < 1).any())
        for g, segs in zip(grads, blocks):
            view = (-1,) + (1,) * (g.dim() - 1)
            for o, s, e, p, m1, m2, lr, mom, wd, mom1, buf in segs:
                if o == "adam":
                    _adamw(p, g[s:e] if unclipped else g[s:e].mul_(coef[s:e].view(view)), m1, m2, lr, wd, self.t,
                           out=buf, lib=self.lib if g.is_contiguous() else None)
                elif o == "rmsprop":
                    _rmsprop(p, g[s:e] if unclipped else g[s:e].mul_(coef[s:e].view(view)), m1, m2, lr, wd,
                             mom if mom1 is None or mom1 else None, out=buf)
                else:  # SGD; one momentum and no clipping: buf = mom * buf + g in one torch kernel
                    one = unclipped and mom1 is not None
                    args = (p, g[s:e], m1, lr, wd, mom1 if one else mom, None if one else coef[s:e].view(view))
                    if self.lib is not None and g.is_contiguous():
                        cpu_kernels.sgd_fused(self.lib, *args)
                    else:
                        cpu_kernels.sgd_torch(*args)


def _segments(opts: Sequence[str]) -> list[tuple[str, int, int]]:
    """Contiguous runs of equal optimizer: ``[(name, start, stop), ...]``."""
    out: list[tuple[str, int, int]] = []
    for i, o in enumerate(opts):
        if out and out[-1][0] == o:
            out[-1] = (o, out[-1][1], i + 1)
        else:
            out.append((o, i, i + 1))
    return out


def _rmsprop(p, g, m1, m2, lr, wd, mom, alpha: float = 0.9, eps: float = 1e-7,
             out: torch.Tensor | None = None) -> None:
    """``torch.optim.RMSprop`` (not centered) for a block of models, in place, with Keras' defaults
    ``alpha`` (Keras' ``rho``) 0.9 and ``eps`` 1e-7 (Keras adds eps to the root as torch does); ``lr``
    per row, ``mom`` per row or None (no momentum), ``wd`` per row or None (L2 decay added to the
    gradient, as torch's ``weight_decay``); ``out`` a scratch tensor like ``p``. The operations are
    torch's, in its order."""
    if wd is not None:
        g = g.addcmul(p, wd)
    m2.mul_(alpha).addcmul_(g, g, value=1 - alpha)
    avg = torch.sqrt(m2, out=out).add_(eps)
    if mom is not None:
        m1.mul_(mom).addcdiv_(g, avg)
        p.addcmul_(m1, lr, value=-1)
    else:
        p.addcmul_(torch.div(g, avg, out=avg), lr, value=-1)


def _adamw(p, g, m1, m2, lr, wd, t: int, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
           out: torch.Tensor | None = None, lib=None) -> None:
    """``torch.optim.AdamW`` (decoupled weight decay) for a block of models, in place; ``wd`` None = 0;
    ``out``: a scratch tensor shaped like ``p`` for the denominator (else a new one); ``lib``: the fused
    CPU loops (:func:`wsnets.zoo.cpu_kernels.load`, contiguous float32 CPU blocks and ``out`` only).

    ``p -= lr / c1 * m1 / (sqrt(m2 / c2) + eps)`` (``c = 1 - beta**t``) is computed as
    ``p -= m1 / ((sqrt(m2) + eps * sqrt(c2)) / (lr * sqrt(c2) / c1))``: the same update in 7 passes
    over the block instead of 10 (the per-model factors are ``[K, 1]``), or one with the fused loops (two
    around ``torch.sqrt`` where PyTorch's square root cannot be called from C)."""
    r2 = math.sqrt(1 - b2 ** t)
    args = (p, g, m1, m2, lr, wd, r2 / (1 - b1 ** t), eps * r2)
    if lib is not None:
        cpu_kernels.adamw_fused(lib, *args, out, b1, b2)
    else:
        cpu_kernels.adamw_torch(*args, out, b1, b2)


def _members(member: torch.Tensor) -> torch.Tensor:
    """``[K, Nmax]`` membership mask -> ``[K, Smax]`` member positions in increasing order (padded with 0)."""
    cnt = member.sum(1)
    out = torch.zeros(member.shape[0], max(int(cnt.max()), 1), dtype=torch.long, device=member.device)
    rows, pos = member.nonzero(as_tuple=True)  # row-major: positions ascend within each row
    out[rows, torch.arange(len(rows), device=member.device) - (cnt.cumsum(0) - cnt)[rows]] = pos
    return out


def _epoch_order(seeds: torch.Tensor, memb: torch.Tensor, n_sub: torch.Tensor, epoch: int, total: int,
                 Nmax: int, use_numpy: bool | None = None, epochs: int = 1, fused=None) -> torch.Tensor:
    """Sample indices ``[K, epochs * total]`` (int32) for epochs ``epoch, ..., epoch + epochs - 1`` (``total``
    samples each): each model walks its own stream of reshuffled passes over its subset. Pass ``p`` of model ``k`` orders its members (the first ``n_sub[k]`` entries of
    ``memb[k]``, see :func:`_members`) by the 32-bit key ``hash(seed_k, p * Nmax + position)``.

    Keys are distinct within a pass (the hash is a bijection of 32-bit integers), so the order does not
    depend on the sort algorithm. On CPU the work runs in NumPy (uint32 arithmetic, fancy indexing and
    its vectorized sort are ~5-10x faster than torch's int64 ops and row sorts), elsewhere in torch on
    the device (:func:`_epoch_order_torch`); both give the same stream (``use_numpy`` forces either).
    Only the members of the passes an epoch touches are sorted, in chunks of at most 4M elements
    (NumPy; the torch path's chunks hold up to 64M keys). On CPU the fused C loop
    (:mod:`wsnets.zoo.cpu_kernels`, a radix sort per pass: ~5x faster) replaces NumPy where it is
    available (``fused``: None = where available, False = NumPy, or the loaded library).
    """
    if use_numpy is None:
        use_numpy = memb.device.type == "cpu"
    b = max(1, (Nmax - 1).bit_length())  # bits of a position
    g0 = epoch * total
    total *= epochs
    if not use_numpy:
        return _epoch_order_torch(seeds, memb, n_sub, g0, total, Nmax, b)
    xp = _NumpyOps()
    seeds, memb, n_sub = xp.asarray(seeds), xp.asarray(memb), xp.asarray(n_sub)
    lib = cpu_kernels.load() if fused is None else (fused or None)
    if lib is not None:
        return cpu_kernels.epoch_order(lib, xp.key(seeds), memb, n_sub, g0, total, Nmax)
    K, Smax = memb.shape
    p0 = g0 // n_sub
    J = (g0 + total - 1) // n_sub - p0 + 1  # passes touched this epoch, per model
    k = xp.key(seeds)
    out = xp.empty((K, total))
    lo, cap = 0, min(1 << 22, 1 << (31 - b))  # elements per sort: (row, key, position) packs into 63 bits
    cost = (J * n_sub).cumsum(0)
    while lo < K:
        hi = max(lo + 1, int(xp.searchsorted(cost, int(cost[lo] - J[lo] * n_sub[lo]) + cap)))
        Jm, nm, p0m = J[lo:hi], n_sub[lo:hi], p0[lo:hi]
        row_m = xp.repeat(xp.arange(lo, hi), Jm)  # one row per (model, pass)
        row0 = Jm.cumsum(0) - Jm  # first row of each model (relative to lo)
        row_pass = p0[row_m] + xp.arange(len(row_m)) - xp.repeat(row0, Jm)
        ne = n_sub[row_m]
        e0 = ne.cumsum(0) - ne  # first element of each row
        n_el = int(e0[-1] + ne[-1])
        col = xp.arange(n_el) - xp.repeat(e0, ne)
        pos = memb.reshape(-1)[xp.repeat(row_m * Smax, ne) + col]
        srt = xp.sort_rows(xp.repeat(k[row_m], ne), xp.repeat(row_pass * Nmax, ne) + pos, len(row_m), ne, pos, b)
        # a model's rows are its passes p0..p0+J-1 back to back: its stream is one contiguous slice of srt
        out[lo:hi] = srt[(e0[row0] + g0 - p0m * nm)[:, None] + xp.arange(total)[None]]
        lo = hi
    return xp.to_torch(out)


class _NumpyOps:
    """The array operations :func:`_epoch_order` needs, in NumPy."""

    def __init__(self):
        import numpy as np
        self.np = np

    def asarray(self, t: torch.Tensor):
        return t.cpu().numpy().astype(self.np.int64)

    def arange(self, *a):
        return self.np.arange(*a, dtype=self.np.int64)

    def repeat(self, a, r):
        return self.np.repeat(a, r)

    def searchsorted(self, a, v):
        return self.np.searchsorted(a, v, side="right")

    def empty(self, shape):
        return self.np.empty(shape, dtype=self.np.int32)

    def to_torch(self, a) -> torch.Tensor:
        return torch.from_numpy(a)

    def key(self, seeds):
        return _mix_np(seeds.astype(self.np.uint32) ^ self.np.uint32(_STREAM["order"]))

    def sort_rows(self, k, counter, rows: int, ne, val, b: int):
        """Sort each row's elements (``ne`` per row, rows consecutive) by ``hash(k, counter)``; return
        their ``val`` (values < 2^b) in that order."""
        np, u32, u64 = self.np, self.np.uint32, self.np.uint64
        h = _mix_np(k + counter.astype(u32) * u32(_GOLD))
        key = np.repeat(np.arange(rows, dtype=u64) << u64(32 + b), ne)
        key |= h.astype(u64) << u64(b)
        key |= val.astype(u64)
        key.sort()
        return (key & u64((1 << b) - 1)).astype(np.int64)


def _epoch_order_torch(seeds: torch.Tensor, memb: torch.Tensor, n_sub: torch.Tensor, g0: int, total: int,
                       Nmax: int, b: int, cap: int = 1 << 26, kernel: bool | None = None) -> torch.Tensor:
    """:func:`_epoch_order` in torch on the tensors' device (samples ``g0 .. g0 + total - 1`` of each
    model's stream): one row per (model, pass) of width ``Smax``, keys ``hash << b | position`` (padding
    sorts last), one row-wise sort per chunk of at most ``cap`` keys (GPU sorts of rows of up to 4096
    keys run in shared memory), then each model's slice of its rows, read with one gather. The keys come
    from one Triton kernel (``kernel``; default: on CUDA where Triton is installed) or ~25 torch ops."""
    dev = memb.device
    if kernel is None:
        from . import fused
        kernel = dev.type == "cuda" and fused.available(dev)
    seeds, memb, n_sub = seeds.to(dev, torch.long), memb.to(dev, torch.long), n_sub.to(dev, torch.long)
    K, Smax = memb.shape
    p0 = g0 // n_sub
    J = (g0 + total - 1) // n_sub - p0 + 1  # passes touched, per model
    k = _mix((seeds ^ _STREAM["order"]) & _MASK)
    col = torch.arange(Smax, device=dev)
    t = torch.arange(total, device=dev)
    out = torch.empty(K, total, dtype=torch.int32, device=dev)
    import numpy as np
    cum = np.concatenate([[0], np.cumsum(J.cpu().numpy())])  # rows before each model
    lo = 0
    while lo < K:  # chunks of models with at most `cap` keys (at least one model)
        hi = max(lo + 1, int(np.searchsorted(cum, cum[lo] + cap // Smax, side="right")) - 1)
        rows = int(cum[hi] - cum[lo])
        Jm = J[lo:hi]
        row_m = torch.repeat_interleave(torch.arange(lo, hi, device=dev), Jm, output_size=rows)  # [R]
        row0 = Jm.cumsum(0) - Jm  # each model's first row (in the chunk)
        row_pass = p0[row_m] + torch.arange(rows, device=dev) - torch.repeat_interleave(row0, Jm, output_size=rows)
        if kernel:
            from ._kernels import order_keys
            key = torch.empty(rows, Smax, dtype=torch.long, device=dev)
            order_keys[(rows,)](memb, row_m, row_pass, k, n_sub, key, Smax, Nmax, b, max(16, 1 << (Smax - 1).bit_length()))
        else:
            pos = memb[row_m]  # [R, Smax]
            h = _mix((k[row_m, None] + ((row_pass[:, None] * Nmax + pos) & _MASK) * _GOLD) & _MASK)
            key = torch.where(col[None] < n_sub[row_m, None], (h << b) | pos, 1 << 62)
        srt = torch.sort(key, 1).values & ((1 << b) - 1)  # [R, Smax] positions, each pass in its order
        nm = n_sub[lo:hi, None]
        g = (g0 - p0[lo:hi, None] * nm) + t[None]  # index into the model's passes, from the first one touched
        out[lo:hi] = srt[row0[:, None] + torch.div(g, nm, rounding_mode="floor"), g % nm].int()
        lo = hi
    return out


def _mix_np(x):
    """:func:`_mix` on NumPy uint32 arrays (wrapping arithmetic), bit-identical."""
    import numpy as np
    x = (x ^ (x >> np.uint32(16))) * np.uint32(0x21F0AAAD)
    x = (x ^ (x >> np.uint32(15))) * np.uint32(0x735A2D97)
    return x ^ (x >> np.uint32(15))


#: images per chunk of a checkpoint evaluation, unless the engine sizes its own (``eval_chunk``)
EVAL_CHUNK = 256


def evaluate(logits: Callable[[torch.Tensor], torch.Tensor], bank: DataBank, didx: torch.Tensor,
             y_train: torch.Tensor, member: torch.Tensor, shared: bool, chunk: int = EVAL_CHUNK,
             members: tuple | None = None) -> dict[str, torch.Tensor]:
    """Per-model accuracy and mean cross-entropy ``[K]`` on the test split and on the model's own
    training subset (with the labels it trained on), in evaluation mode. ``logits(x)`` maps inputs
    ``[N, ...]`` (shared) or ``[K, N, ...]`` to class-dim-second logits ``[K, C, N]``.

    ``members``: ``(memb, n_sub, offset, row_logits)`` (:func:`_members`, the subset sizes, each model's
    offset ``[K, 1]`` in the flattened bank and a function from rows ``[K, n]`` of it to logits): the
    training split is then evaluated on each model's own members only (the same counts, the loss summed
    in another order) instead of on every training sample with the others masked out."""
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        train = ("train", bank.x, y_train, None, member, None)
        if members is not None:
            memb, n_sub, offset, row_logits = members
            train = ("train", bank.x, y_train.gather(1, memb), n_sub, None, memb + offset)
        for split, x, y, n, mask, rows in (("test", bank.xt, bank.yt[didx], bank.nt[didx], None, None), train):
            losses, correct = [], []
            for i in range(0, (x if rows is None else rows).shape[1], chunk):
                if rows is not None:  # each model's own rows of the flattened bank
                    lg = row_logits(rows[:, i:i + chunk].contiguous())
                else:
                    lg = logits(x[0, i:i + chunk] if shared else x[didx, i:i + chunk])
                yc = y[:, i:i + chunk]
                losses.append(F.cross_entropy(lg, yc, reduction="none"))
                correct.append(_argmax_is(lg, yc))
            loss, corr = torch.cat(losses, 1), torch.cat(correct, 1)
            if mask is None:
                mask = torch.arange(loss.shape[1], device=x.device)[None] < n[:, None]
            cnt = mask.sum(1)
            out[f"{split}_correct"] = (corr & mask).sum(1).double()
            out[f"{split}_count"] = cnt.double()
            out[f"{split}_acc"] = out[f"{split}_correct"] / cnt
            out[f"{split}_loss"] = torch.where(mask, loss, 0.0).sum(1).double() / cnt
    return out


def _argmax_is(logits: torch.Tensor, y: torch.Tensor, lib=None) -> torch.Tensor:
    """``logits.argmax(1) == y`` for ``[K, C, N]`` logits (first maximum wins, NaN counts as maximum),
    without torch's argmax over a non-innermost dim (~100x slower on CPU than ``amax``); on CPU with the
    fused loops (``lib``: None = where available, False = torch) one pass instead of six."""
    if lib is None and logits.device.type == "cpu":
        lib = cpu_kernels.load()
    if lib and logits.is_contiguous() and logits.dtype == torch.float32 and y.dtype == torch.long and y.stride(1) == 1:
        return cpu_kernels.argmax_is(lib, logits, y)
    is_max = (logits == logits.amax(1, keepdim=True)) | logits.isnan()
    before = torch.arange(logits.shape[1], device=logits.device)[None, :, None] < y[:, None]
    return is_max.gather(1, y[:, None])[:, 0] & ~(is_max & before).any(1)
