"""The batched trainer: a population of ``K`` models of one architecture trains as ONE computation.

Weights are stacked ``[K, ...]`` and run through :func:`wsnets.functional.forward` (batched matrix
products, grouped convolutions); the loss is the sum over models of each model's mean cross-entropy,
so one backward pass gives every model its own gradient. Everything else is per model and vectorized
over ``K``:

* learning rate, momentum, weight decay, optimizer (SGD with momentum, or AdamW, selected per model
  inside the same update), gradient-norm clipping;
* initialization: PyTorch's default uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) times a per-model scale,
  or a shared pre-trained base (fine-tuning zoos);
* dropout rate (per-model masks), label noise (a fixed fraction of training labels replaced by random
  classes), training subset (a fraction of the training split) and data order;
* dataset: models of one group may train on different datasets of the same shape (fine-tuning zoos).

Randomness that defines a model (init, subset, label noise, data order) comes from a counter-based
hash of the model's own seed, so a model is identical whichever other models share its group;
dropout masks come from a generator seeded by the group (groups are fixed by the recipe).

Every model takes the same number of optimizer steps per epoch, ``ceil(n_train / batch_size)``,
cycling through reshuffled passes of its own training subset (a fixed compute budget per model).
A model whose weights become non-finite during an epoch is restored to the start of that epoch and
frozen (``diverged = 1``).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from ..arch import Architecture
from ..functional import forward
from . import datasets as zds
from .recipe import RunSpec

_MASK = 0xFFFFFFFF
_STREAM = {"subset": 1, "noise_flip": 2, "noise_label": 3, "order": 4, "init": 100}


# -- counter-based random numbers ------------------------------------------------------------------
def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32-style) on int64 tensors holding values in [0, 2^32)."""
    x = ((x ^ (x >> 16)) * 0x21F0AAAD) & _MASK
    x = ((x ^ (x >> 15)) * 0x735A2D97) & _MASK
    return x ^ (x >> 15)


def hash_uniform(seeds: torch.Tensor, stream: int, counters: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) float32 numbers, ``[K, *counters.shape]``, a pure function of (seed, stream, counter).

    ``seeds`` ``[K]`` int64 (32-bit values); ``counters`` int64 (< 2^32) of any shape.
    """
    k = _mix((seeds.long() ^ _mix(torch.tensor(stream, dtype=torch.long, device=seeds.device))) & _MASK)
    view = (-1,) + (1,) * counters.dim()
    h = _mix((k.reshape(view) + (counters.long().unsqueeze(0) & _MASK) * 0x9E3779B1) & _MASK)  # one round per value
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
def init_params(arch: Architecture, seeds: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """PyTorch-default initialization of ``K`` models, weights and biases times ``scale [K]``.

    Linear/conv weights and biases ~ U(-b, b) with ``b = scale / sqrt(fan_in)``; norm layers start at
    weight 1, bias 0, running mean 0, running variance 1.
    """
    K, dev = len(seeds), seeds.device
    out: dict[str, torch.Tensor] = {}
    for j, (key, shape) in enumerate(arch.param_shapes.items()):
        layer = next(l for l in arch.layers if key.startswith(f"{l.name}.") and key[len(l.name) + 1:] in l.param_shapes())
        suffix = key[len(layer.name) + 1:]
        if layer.is_weight:
            bound = (scale.float() / math.sqrt(layer.in_features * layer.kernel_numel)).reshape((K,) + (1,) * len(shape))
            u = hash_uniform(seeds, _STREAM["init"] + j, torch.arange(math.prod(shape), device=dev)).reshape(K, *shape)
            out[key] = (2 * u - 1) * bound
        else:
            fill = 1.0 if suffix in ("weight", "running_var") else 0.0
            out[key] = torch.full((K, *shape), fill, device=dev)
    return out


# -- training ------------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """Weights and metrics of ``K`` models at one epoch (tensors on CPU; metrics ``[K]``)."""

    epoch: int
    params: dict[str, torch.Tensor]
    metrics: dict[str, torch.Tensor]


def _hp(runs: Sequence[RunSpec], name: str, device) -> torch.Tensor:
    return torch.tensor([float(r.hp[name]) for r in runs], device=device)


def train_group(arch: Architecture, runs: Sequence[RunSpec], *, epochs: int, checkpoints: Sequence[int],
                batch_size: int, bank: DataBank, device: torch.device | str = "cpu",
                init: dict[str, torch.Tensor] | None = None,
                on_step: Callable[[int], None] | None = None) -> Iterator[Checkpoint]:
    """Train ``K = len(runs)`` models of architecture ``arch`` together; yield a :class:`Checkpoint` at
    each epoch in ``checkpoints`` (0 = before training), models in the order of ``runs``.

    ``init`` (state-dict key -> ``[K, ...]``) replaces the random initialization (fine-tuning).
    ``on_step(n)`` is called after each optimizer step with ``n`` steps done (progress bars).

    All trainable parameters live in one flat leaf tensor ``theta [K, P]`` (layer tensors are views of
    it), so the optimizer is a handful of elementwise operations whatever the depth. Models are
    sorted internally by (dropout > 0, optimizer) so that each optimizer and the dropout masks act on
    contiguous row blocks.
    """
    dev = torch.device(device)
    order = sorted(range(len(runs)), key=lambda i: (runs[i].hp["dropout"] > 0, runs[i].hp["optimizer"], i))
    inv = torch.empty(len(order), dtype=torch.long)
    inv[torch.tensor(order)] = torch.arange(len(order))
    runs = [runs[i] for i in order]
    if init is not None:
        init = {k: v[torch.tensor(order)] for k, v in init.items()}
    bad_opt = sorted({r.hp["optimizer"] for r in runs} - {"sgd", "adam"})
    if bad_opt:
        from ..errors import ConfigError
        raise ConfigError(f"unknown optimizer(s) {bad_opt} (use sgd or adam)")
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
    # label noise: a fixed set of corrupted labels per model
    flip = hash_uniform(seeds, _STREAM["noise_flip"], ar) < _hp(runs, "label_noise", dev)[:, None]
    rnd = (hash_uniform(seeds, _STREAM["noise_label"], ar) * bank.num_classes).long().clamp_max(bank.num_classes - 1)
    y_train = torch.where(flip, rnd, bank.y[didx])
    shared = len(bank.names) == 1

    params = init_params(arch, seeds, _hp(runs, "init_scale", dev)) if init is None else \
        {k: v.detach().clone().to(dev) for k, v in init.items()}
    keys_t = [k for k in params if not k.endswith(("running_mean", "running_var"))]
    buffers = {k: v for k, v in params.items() if k not in keys_t}
    shapes = [params[k].shape[1:] for k in keys_t]
    sizes = [math.prod(s) for s in shapes]
    theta = torch.cat([params[k].reshape(K, -1) for k in keys_t], 1).requires_grad_(True)  # [K, P]

    def unflatten(th: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {k: t.reshape(K, *s) for k, t, s in zip(keys_t, th.split(sizes, 1), shapes)}
        out.update(buffers)
        return out

    m1, m2 = torch.zeros_like(theta, requires_grad=False), None
    lr, mom, wd = (_hp(runs, k, dev)[:, None] for k in ("lr", "momentum", "weight_decay"))
    clip = _hp(runs, "grad_clip", dev)
    drop = _hp(runs, "dropout", dev)
    use_drop = bool((drop > 0).any())
    segments = _segments([r.hp["optimizer"] for r in runs])
    if any(o == "adam" for o, _, _ in segments):
        m2 = torch.zeros_like(m1)
    gen = torch.Generator(device=dev).manual_seed(zlib.crc32(",".join(r.model_id for r in runs).encode()))
    frozen = torch.zeros(K, 1, dtype=torch.bool, device=dev)
    steps = math.ceil(int(bank.n.max()) / batch_size)
    t = 0
    for epoch in range(0, epochs + 1):
        if epoch > 0:
            snapshot = (theta.detach().clone(), {k: v.clone() for k, v in buffers.items()})
            stream = _epoch_order(seeds, member, n_sub, epoch - 1, steps * batch_size)  # [K, steps*B]
            for s in range(steps):
                idx = stream[:, s * batch_size:(s + 1) * batch_size]  # [K, B]
                xb = bank.x[didx[:, None], idx]
                yb = y_train.gather(1, idx)
                logits = forward(arch, unflatten(theta), xb, train=True, dropout=drop if use_drop else None,
                                 generator=gen)
                # class dim second ([K, C, B]): PyTorch's CPU kernel is ~5x faster than with [K*B, C]
                loss = F.cross_entropy(logits.transpose(1, 2), yb, reduction="sum") / batch_size
                (g,) = torch.autograd.grad(loss, [theta])
                t += 1
                with torch.no_grad():
                    g.mul_(torch.clamp(clip / (torch.linalg.vector_norm(g, dim=1) + 1e-6), max=1.0)[:, None])
                    step_lr = torch.where(frozen, 0.0, lr)
                    for opt, a, b in segments:
                        if opt == "sgd":
                            _sgd(theta[a:b], g[a:b], m1[a:b], step_lr[a:b], mom[a:b], wd[a:b])
                        else:
                            _adamw(theta[a:b], g[a:b], m1[a:b], m2[a:b], step_lr[a:b], wd[a:b], t)
                if on_step is not None:
                    on_step(1)
            with torch.no_grad():
                bad = ~torch.isfinite(theta).all(1, keepdim=True)
                for v in buffers.values():
                    bad |= ~torch.isfinite(v.flatten(1)).all(1, keepdim=True)
                if bool(bad.any()):
                    theta.copy_(torch.where(bad, snapshot[0], theta))
                    for k, v in buffers.items():
                        v.copy_(torch.where(bad.reshape((-1,) + (1,) * (v.dim() - 1)), snapshot[1][k], v))
                    frozen |= bad
        if epoch in checkpoints:
            with torch.no_grad():
                p = unflatten(theta.detach())
                metrics = evaluate(arch, p, bank, didx, y_train, member, shared)
            metrics["diverged"] = frozen[:, 0].double()
            yield Checkpoint(epoch, {k: v.detach().cpu()[inv].clone() for k, v in p.items()},
                             {k: v.cpu()[inv] for k, v in metrics.items()})


def _segments(opts: Sequence[str]) -> list[tuple[str, int, int]]:
    """Contiguous runs of equal optimizer: ``[(name, start, stop), ...]``."""
    out: list[tuple[str, int, int]] = []
    for i, o in enumerate(opts):
        if out and out[-1][0] == o:
            out[-1] = (o, out[-1][1], i + 1)
        else:
            out.append((o, i, i + 1))
    return out


def _sgd(p, g, buf, lr, mom, wd) -> None:
    """``torch.optim.SGD`` (momentum, L2 weight decay, no dampening) for a block of models, in place."""
    buf.mul_(mom).add_(g).addcmul_(p, wd)
    p.addcmul_(buf, lr, value=-1)


def _adamw(p, g, m1, m2, lr, wd, t: int, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> None:
    """``torch.optim.AdamW`` (decoupled weight decay) for a block of models, in place."""
    p.mul_(1 - lr * wd)
    m1.mul_(b1).add_(g, alpha=1 - b1)
    m2.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = m2.sqrt().div_(math.sqrt(1 - b2 ** t)).add_(eps)
    p.addcdiv_(m1 * (lr / (1 - b1 ** t)), denom, value=-1)


def _epoch_order(seeds: torch.Tensor, member: torch.Tensor, n_sub: torch.Tensor, epoch: int, total: int) -> torch.Tensor:
    """Sample indices ``[K, total]`` for one epoch: each model walks its own stream of reshuffled
    passes over its subset (pass ``p`` is a permutation drawn from hash(seed, p))."""
    K, Nmax = member.shape
    dev = member.device
    g = epoch * total + torch.arange(total, device=dev)  # global positions in each model's stream
    p = g[None] // n_sub[:, None]  # [K, total] pass number
    off = g[None] % n_sub[:, None]
    p0 = p[:, 0]
    J = int((p[:, -1] - p0).max()) + 1
    passes = p0[:, None] + torch.arange(J, device=dev)[None]  # [K, J]
    counters = passes[:, :, None] * Nmax + torch.arange(Nmax, device=dev)[None, None]  # [K, J, Nmax]
    k = _mix((seeds.long() ^ _STREAM["order"]) & _MASK)[:, None, None]
    h = _mix((k + counters * 0x9E3779B1) & _MASK)
    keys = torch.where(member[:, None, :], h.float(), torch.full((), 2.0 ** 33, device=dev))
    perms = keys.argsort(-1)  # [K, J, Nmax]: members first, in a random order
    return perms[torch.arange(K, device=dev)[:, None], p - p0[:, None], off]


def evaluate(arch: Architecture, params: dict[str, torch.Tensor], bank: DataBank, didx: torch.Tensor,
             y_train: torch.Tensor, member: torch.Tensor, shared: bool, chunk: int = 2048) -> dict[str, torch.Tensor]:
    """Per-model accuracy and mean cross-entropy ``[K]`` on the test split and on the model's own
    training subset (with the labels it trained on), in evaluation mode."""
    K = len(didx)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for split, x, y, n, mask in (("test", bank.xt, bank.yt[didx], bank.nt[didx], None),
                                     ("train", bank.x, y_train, None, member)):
            losses, correct = [], []
            for i in range(0, x.shape[1], chunk):
                xc = x[0, i:i + chunk] if shared else x[didx, i:i + chunk]
                logits = forward(arch, params, xc)
                yc = y[:, i:i + chunk]
                losses.append(F.cross_entropy(logits.transpose(1, 2), yc, reduction="none"))
                correct.append(logits.argmax(-1) == yc)
            loss, corr = torch.cat(losses, 1), torch.cat(correct, 1)
            if mask is None:
                mask = torch.arange(x.shape[1], device=x.device)[None] < n[:, None]
            cnt = mask.sum(1)
            out[f"{split}_correct"] = (corr & mask).sum(1).double()
            out[f"{split}_count"] = cnt.double()
            out[f"{split}_acc"] = out[f"{split}_correct"] / cnt
            out[f"{split}_loss"] = torch.where(mask, loss, 0.0).sum(1).double() / cnt
    return out
