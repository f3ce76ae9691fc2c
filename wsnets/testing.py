"""Property checks shipped with the library (as e3nn ships ``assert_equivariant``).

Use them to test your own encoders and conversions:

>>> import wsnets, torch
>>> from wsnets.testing import assert_same_function
>>> ws = wsnets.WeightSpace.random(wsnets.mlp(8, [16], 3))
>>> assert_same_function(ws.to_module(), wsnets.random_permute(ws).to_module(), input_shape=(8,))
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

# relative tolerance per dtype for checks that should hold exactly up to float rounding
TOLERANCES = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-4, torch.float64: 1e-10}


def assert_same_function(a: nn.Module, b: nn.Module, x: torch.Tensor | None = None, *,
                         input_shape: tuple[int, ...] | None = None, n: int = 16, rtol: float | None = None,
                         seed: int = 0) -> None:
    """Assert two modules compute the same outputs (eval mode) on ``x`` or on random inputs (token ids
    for a network that starts with an embedding; the shape guessed from the first layer if not given)."""
    if x is None:
        from .trace import example_input
        try:
            x = example_input(a, input_shape, n, seed=seed)
        except Exception:
            raise ValueError("cannot guess an input shape; pass input_shape=") from None
    was = a.training, b.training
    a.eval(), b.eval()
    try:
        with torch.no_grad():
            ya, yb = a(x), b(x)
    finally:
        a.train(was[0]), b.train(was[1])
    _assert_close(ya, yb, rtol, "outputs differ")


def _assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float | None, what: str) -> None:
    rtol = rtol if rtol is not None else TOLERANCES.get(a.dtype, 1e-4)
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-12)
    err = (a - b).abs().max().item()
    if not err <= rtol * scale:
        raise AssertionError(f"{what}: max abs difference {err:.3g} > {rtol:g} x scale {scale:.3g}")


def assert_invariant(encoder: Callable[[Any], torch.Tensor], networks, represent: Callable[[Any], Any] | None = None,
                     *, n_perms: int = 3, rtol: float | None = None, seed: int = 0) -> None:
    """Assert ``encoder(represent(ws))`` is unchanged under random hidden-neuron permutations.

    ``networks`` is a WeightSpace (single or batched) or a list of single WeightSpaces;
    ``represent`` defaults to :func:`wsnets.to_batch` (neural graphs).
    """
    from .graph import to_batch
    from .symmetry import random_permute
    represent = represent or to_batch
    nets = list(networks) if isinstance(networks, (list, tuple)) else networks
    g = torch.Generator().manual_seed(seed)
    perm = (lambda n: [random_permute(w, generator=g) for w in n]) if isinstance(nets, list) else \
        (lambda n: random_permute(n, generator=g))
    with torch.no_grad():
        ref = encoder(represent(nets))
        for _ in range(n_perms):
            _assert_close(ref, encoder(represent(perm(nets))), rtol, "not invariant to hidden-neuron permutations")


def assert_sensitive_to_inputs(encoder: Callable[[Any], torch.Tensor], networks, represent=None, *,
                               atol: float = 1e-6, seed: int = 0) -> None:
    """Assert the output changes when the networks' *input* features are permuted (identity kept)."""
    from .graph import to_batch
    from .symmetry import permute
    represent = represent or to_batch
    g = torch.Generator().manual_seed(seed)

    def perm_inputs(ws):
        n = ws.arch.group_sizes[0]
        p = torch.randperm(n, generator=g)
        while n > 1 and bool((p == torch.arange(n)).all()):
            p = torch.randperm(n, generator=g)
        return permute(ws, {0: p}, allow_fixed=True)
    nets = list(networks) if isinstance(networks, (list, tuple)) else networks
    with torch.no_grad():
        ref = encoder(represent(nets))
        other = encoder(represent([perm_inputs(w) for w in nets] if isinstance(nets, list) else perm_inputs(nets)))
    diff = (ref - other).abs().max().item()
    if not diff > atol:
        raise AssertionError(f"output unchanged (max diff {diff:.3g}) when input neurons were permuted: "
                             "the encoder is too symmetric")


def assert_equivariant(layer: Callable[[Any], Any], inputs, permute_fn: Callable[[Any, Any], Any],
                       perms: Iterable[Any], *, rtol: float | None = None) -> None:
    """Assert ``layer(permute_fn(inputs, p)) == permute_fn(layer(inputs), p)`` for each ``p``.

    Generic over the representation: ``permute_fn`` applies a permutation to the layer's input and
    output objects (which must then be flattened by ``_flatten`` into tensors to compare).
    """
    with torch.no_grad():
        out = layer(inputs)
        for p in perms:
            a = _flatten(layer(permute_fn(inputs, p)))
            b = _flatten(permute_fn(out, p))
            _assert_close(a, b, rtol, "not equivariant")


def _flatten(obj: Any) -> torch.Tensor:
    if isinstance(obj, torch.Tensor):
        return obj.flatten()
    if hasattr(obj, "params"):
        return torch.cat([v.flatten() for v in obj.params.values()])
    if isinstance(obj, (list, tuple)):
        return torch.cat([_flatten(o) for o in obj])
    if hasattr(obj, "weights") and hasattr(obj, "biases"):
        return torch.cat([_flatten(obj.weights), _flatten(obj.biases)])
    raise TypeError(f"cannot flatten {type(obj).__name__}")


def assert_spec_exact(ws, x: torch.Tensor | None = None, *, seed: int = 0, rtol: float | None = None) -> None:
    """Assert that a network's derived permutation spec is exact, both ways.

    (a) a random permutation from the spec (every hidden group, head structure respected) leaves the
    function unchanged; (b) the spec couples nothing it need not: for every hidden group whose
    permutation acts on two or more tensor axes, permuting only one of them changes the function, and
    so does permuting the input axis (if the input has one).
    """
    from .symmetry import permutation_spec, permute, random_permutations
    spec = permutation_spec(ws.arch)
    g = torch.Generator().manual_seed(seed)
    if x is None:
        from .trace import example_input
        m = ws.to_module()
        x = example_input(m, ws.arch.input_shape, 8, seed=seed)
    ref = ws.to_module()
    assert_same_function(ref, permute(ws, random_permutations(ws.arch, generator=g)).to_module(), x, rtol=rtol)
    with torch.no_grad():
        y = ref(x)
    for grp, members in sorted(spec.slices().items()):
        if grp not in spec.hidden or len(members) < 2 or spec.group_sizes[grp] < 2:
            continue
        key, axis, off = members[0]
        n = spec.group_sizes[grp]
        p = torch.randperm(n, generator=g)
        while bool((p == torch.arange(n)).all()):
            p = torch.randperm(n, generator=g)
        params = dict(ws.params)
        t = params[key]
        idx = torch.arange(t.shape[axis])
        idx[off:off + n] = p + off
        params[key] = t.index_select(axis, idx)
        from .weights import WeightSpace
        with torch.no_grad():
            y2 = WeightSpace(ws.arch, params, check=False).to_module()(x)
        if not (y - y2).abs().max().item() > 1e-6 * max(1.0, y.abs().max().item()):
            raise AssertionError(f"permuting only axis {axis} of {key!r} (group {grp}) leaves the function "
                                 "unchanged: the spec couples axes that are independent")
