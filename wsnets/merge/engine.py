"""Running a merge method over a tensor in slices, with exact whole-tensor statistics.

A method kernel sees one slice of a tensor at a time (:class:`Inputs`: the models' values, ``[K, n]``)
and asks for what depends on the whole tensor through requests: :meth:`Inputs.total` (sums),
:meth:`Inputs.gram` (inner products), :meth:`Inputs.top`/:meth:`Inputs.bottom` (the ``c`` largest or
smallest entries per model, exactly ``c``). :func:`run_group` runs the kernel over all slices once per
unresolved request, accumulating it (a sum, or one 16-bit level of a radix histogram of the values'
bit patterns), then once more to produce the output; memory is bounded by the slice size, not by the
tensor or the model. A tensor that fits in one slice is read once and its requests resolve on the spot
(one pass). Kernels own their slice: :attr:`Inputs.delta` is computed in the models' buffer.

Selections are exact and deterministic: the ``c`` largest entries are those above the ``c``-th largest
value ``v`` plus, among entries equal to ``v``, the first ones in row-major order, which is what a
stable sort would give. Random draws (:meth:`Inputs.bernoulli`) come from one generator per model
seeded from (seed, tensor name, model index), so a seeded merge gives the same numbers whatever the
slice size, order of tensors or device.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from .registry import Method

_INT_OF = {8: torch.int64, 4: torch.int32, 2: torch.int16}


class _Pending(Exception):
    """Raised inside a kernel when it reaches a request not yet resolved (the pass accumulates it)."""


def seed_for(seed: int, name: str, index: int) -> int:
    """The generator seed of model ``index`` on tensor ``name`` (63-bit, from BLAKE2b)."""
    h = hashlib.blake2b(f"{seed}\0{name}\0{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


@dataclass
class Chunk:
    """One slice of a group: the models' values ``[K, n]``, the base ``[n]`` (or None), the tensor it
    belongs to and the slice's flat offset in that tensor and in the group."""

    models: torch.Tensor
    base: torch.Tensor | None
    tensor: str
    offset: int          # in the tensor
    group_offset: int    # in the group
    row_len: int         # elements per row of the tensor (filter-wise statistics)
    out: torch.Tensor | None = None    # a reusable ``[n]`` buffer of the compute dtype for the result


class _Sum:
    """A whole-tensor sum, accumulated over one pass."""

    done = False

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def feed(self, v: torch.Tensor) -> None:
        self.value = v if self.value is None else self.value + v

    def advance(self) -> bool:
        self.done = True
        return True


class _Select:
    """Exact selection of the ``c`` largest (or smallest) non-negative values per row, for several
    counts at once, by a radix histogram of the values' bit patterns (16 bits per pass)."""

    def __init__(self, counts: Sequence[Sequence[int]], n: int, largest: bool, dtype: torch.dtype):
        self.largest = largest
        self.bits = 8 * dtype.itemsize - 1                    # sign bit is 0 for non-negative values
        top = (self.bits - 1) // 16
        self.widths = [16] * top + [self.bits - 16 * top]
        self.level = 0
        self.counts = [[int(c) for c in cs] for cs in counts]
        # per (target, row): rank still needed inside the current prefix bucket; prefix bits so far
        self.need = [list(cs) for cs in self.counts]
        self.prefix = [[0] * len(cs) for cs in self.counts]
        self.trivial = [[c <= 0 or c >= n for c in cs] for cs in self.counts]
        self.hist: dict[tuple[int, int], torch.Tensor] = {}
        self.done = all(all(t) for t in self.trivial)

    def feed(self, values: torch.Tensor) -> None:
        ib = values.view(_INT_OF[values.element_size()])
        width = self.widths[self.level]
        shift = self.bits - sum(self.widths[:self.level + 1])
        low = (1 << width) - 1
        for t, row_counts in enumerate(self.counts):
            for r in range(len(row_counts)):
                if self.trivial[t][r]:
                    continue
                b = ib[r]
                if self.level:
                    b = b[(b >> (shift + width)) == self.prefix[t][r]]
                    b = (b >> shift) & low if shift else b & low
                else:
                    b = b >> shift
                h = torch.bincount(b, minlength=1 << width).cpu()
                self.hist[t, r] = self.hist[t, r] + h if (t, r) in self.hist else h

    def advance(self) -> bool:
        width = self.widths[self.level]
        for (t, r), h in self.hist.items():
            h = h.numpy()
            cum = h[::-1].cumsum() if self.largest else h.cumsum()
            j = int((cum < self.need[t][r]).sum())           # first bin whose cumulative count reaches need
            self.need[t][r] -= int(cum[j - 1]) if j else 0
            self.prefix[t][r] = (self.prefix[t][r] << width) | ((1 << width) - 1 - j if self.largest else j)
        self.hist = {}
        self.level += 1
        self.done = self.level == len(self.widths)
        return self.done

    def masks(self, values: torch.Tensor, taken: list[list[int]]) -> list[torch.Tensor]:
        """One boolean mask ``[R, n]`` per target for a slice; ``taken`` counts ties used so far."""
        ib = values.view(_INT_OF[values.element_size()])
        out = []
        for t, row_counts in enumerate(self.counts):
            m = torch.empty(ib.shape, dtype=torch.bool, device=ib.device)
            for r, c in enumerate(row_counts):
                if self.trivial[t][r]:
                    m[r] = c > 0
                    continue
                v = self.prefix[t][r]
                torch.gt(ib[r], v, out=m[r]) if self.largest else torch.lt(ib[r], v, out=m[r])
                left = self.need[t][r] - taken[t][r]
                if left > 0:
                    eq = (ib[r] == v).nonzero().squeeze(1)[:left]
                    m[r, eq] = True
                    taken[t][r] += len(eq)
            out.append(m)
        return out


class _Pass:
    """State shared by the slices of one pass over a group."""

    def __init__(self, resolved: list[Any], pending: Any, whole: bool):
        self.resolved = resolved      # accumulators of the requests resolved so far, in call order
        self.pending = pending        # accumulator of the first unresolved request (None: not reached yet)
        self.whole = whole            # the group is one slice: resolve requests on the spot
        self.taken: dict[int, list[list[int]]] = {}
        self.generators: dict[tuple[int, int], torch.Generator] = {}


class Inputs:
    """What a merge kernel sees: one slice of one tensor (or of the whole model, with ``scope="model"``).

    Attributes
    ----------
    models : ``[K, n]`` the models' values in the compute dtype (for a method with a base, the
        fine-tuned models only).
    base : ``[n]`` the base model's values, or None.
    numel : elements of the whole tensor (or model) the statistics run over.
    name : the tensor's name (``"*"`` for a whole-model group).
    """

    def __init__(self, chunk: Chunk, state: _Pass, numel: int, name: str, rows: int | None):
        self.models, self.base = chunk.models, chunk.base
        self.numel, self.name, self._chunk, self._state, self._rows = numel, name, chunk, state, rows
        self._i = 0
        self._delta: torch.Tensor | None = None

    @property
    def K(self) -> int:
        return (self.models if self.models is not None else self._delta).shape[0]

    @property
    def n(self) -> int:
        """Elements in this slice."""
        return self._chunk.models.shape[1]

    def empty(self) -> torch.Tensor:
        """An ``[n]`` buffer of the compute dtype for the kernel's result (reused from slice to slice
        by a streamed merge, so a kernel writing its result there allocates nothing)."""
        out = self._chunk.out
        if out is None or out.numel() != self.n:
            ref = self.models if self.models is not None else self._delta
            out = torch.empty(self.n, dtype=ref.dtype, device=ref.device)
        return out

    @property
    def delta(self) -> torch.Tensor:
        """``models - base`` (task vectors), ``[K, n]``, computed in place in the models' buffer (a slice is
        read afresh for every kernel call, so kernels own it): afterwards ``x.models`` is None."""
        if self._delta is None:
            self._delta = self.models.sub_(self.base)
            self.models = None
        return self._delta

    def column(self, values: Sequence[float]) -> torch.Tensor:
        """Per-model values as a ``[K, 1]`` tensor in the compute dtype (to broadcast over a slice)."""
        ref = self._chunk.models
        return torch.tensor(values, dtype=ref.dtype, device=ref.device).unsqueeze(1)

    # -- requests ---------------------------------------------------------------------------------
    def _ask(self, make: Callable[[], Any], feed: Callable[[Any], None]) -> tuple[int, Any]:
        """The accumulator of this call's request once resolved; else feed it this slice and stop the
        kernel (:class:`_Pending`) until the pass ends. A one-slice group resolves on the spot."""
        i, self._i = self._i, self._i + 1
        st = self._state
        if i < len(st.resolved):
            return i, st.resolved[i]
        if st.pending is None:
            st.pending = make()
        acc = st.pending
        while not acc.done:
            feed(acc)
            if not st.whole:
                raise _Pending
            acc.advance()
        st.resolved.append(acc)
        st.pending = None
        return i, acc

    def total(self, *xs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Each ``x [..., n]`` summed over the whole tensor's elements (float64 ``[...]``); several
        arrays make one request (one pass when the tensor is streamed in slices)."""
        v = self._ask(_Sum, lambda acc: acc.feed(torch.stack([x.sum(-1, dtype=torch.float64) for x in xs])))[1].value
        return v[0] if len(xs) == 1 else tuple(v)

    def gram(self, x: torch.Tensor, *, rows: bool = False) -> torch.Tensor:
        """Inner products ``x x^T`` of ``x [R, n]`` over the whole tensor (float64 ``[R, R]``); with
        ``rows=True`` one per row of the tensor's first axis (filter-wise statistics): ``[rows, R, R]``."""
        if rows and self._rows is None:
            raise ValueError("row statistics need a tensor, not a whole-model group")
        return self._ask(_Sum, lambda acc: acc.feed(self._gram(x, rows)))[1].value

    def _gram(self, x: torch.Tensor, rows: bool) -> torch.Tensor:
        xd = x.double()
        if not rows:
            return xd @ xd.T
        first, n_rows, L = self._row_span()
        if n_rows == 1:
            g = (xd @ xd.T).unsqueeze(0)
        else:
            xr = xd.view(x.shape[0], n_rows, L)
            g = torch.einsum("arl,brl->rab", xr, xr)
        full = torch.zeros(self._rows, x.shape[0], x.shape[0], dtype=torch.float64, device=x.device)
        full[first:first + n_rows] = g
        return full

    def _row_span(self) -> tuple[int, int, int]:
        L, n = self._chunk.row_len, self.n
        return self._chunk.offset // L, max(1, n // L), L

    def expand_rows(self, v: torch.Tensor) -> torch.Tensor:
        """Per-row values ``v [rows, ...]`` of the tensor broadcast to this slice's elements: ``[..., n]``."""
        first, n_rows, L = self._row_span()
        n = self.n
        part = v[first:first + n_rows].movedim(0, -1)
        return part.repeat_interleave(L, dim=-1) if n_rows > 1 or n == L else part.expand(*part.shape[:-1], n)

    def _select(self, values: torch.Tensor, counts: Sequence[Sequence[int]], largest: bool) -> list[torch.Tensor]:
        i, sel = self._ask(lambda: _Select(counts, self.numel, largest, values.dtype), lambda acc: acc.feed(values))
        taken = self._state.taken.setdefault(i, [[0] * len(c) for c in counts])
        return sel.masks(values, taken)

    def top(self, values: torch.Tensor, *counts: Sequence[int]) -> list[torch.Tensor] | torch.Tensor:
        """Masks of the ``counts[r]`` largest of ``values [R, n]`` (non-negative) in each row, exact over the
        whole tensor; ties at the cutoff go to the earlier entries. One mask per counts argument."""
        m = self._select(values, counts, True)
        return m[0] if len(m) == 1 else m

    def bottom(self, values: torch.Tensor, *counts: Sequence[int]) -> list[torch.Tensor] | torch.Tensor:
        """As :meth:`top`, for the smallest values (ties go to the earlier entries)."""
        m = self._select(values, counts, False)
        return m[0] if len(m) == 1 else m

    def bernoulli(self, p: Sequence[float], seed: int) -> torch.Tensor:
        """A ``[K, n]`` float32 mask, row ``k`` drawn with probability ``p[k]`` from the generator of
        (``seed``, tensor, ``k``) continuing across slices: ``torch.bernoulli`` of a float32 tensor
        filled with ``p[k]``, on the CPU, so masks do not depend on the slice size or device."""
        n = self.n
        out = torch.empty(len(p), n, dtype=torch.float32)
        for k, pk in enumerate(p):
            g = self._state.generators.get((seed, k))
            if g is None:
                g = self._state.generators[seed, k] = torch.Generator().manual_seed(seed_for(seed, self.name, k))
            torch.bernoulli(torch.full((n,), float(pk), dtype=torch.float32), generator=g, out=out[k])
        return out.to(self._chunk.models.device)


def run_group(method: Method, options: dict[str, Any], chunks: Callable[[], Iterable[Chunk]], *, numel: int,
              name: str, rows: int | None, sink: Callable[[Chunk, torch.Tensor], None], whole: bool = False) -> int:
    """Run ``method`` over a group's slices until every request is resolved, then call ``sink`` with each
    slice's output. ``chunks()`` yields the slices afresh for every pass; ``whole`` says it yields one
    slice (requests then resolve within the pass). Returns the number of passes."""
    resolved: list[Any] = []
    pending: Any = None
    passes = 0
    while True:
        passes += 1
        state = _Pass(resolved, pending, whole)
        final = None
        for chunk in chunks():
            try:
                out = method.fn(Inputs(chunk, state, numel, name, rows), **options)
            except _Pending:
                if final is True:
                    raise RuntimeError(f"merge method {method.name} asked for a statistic in one slice only")
                final = False
                del chunk
                continue
            if final is False:
                raise RuntimeError(f"merge method {method.name} asked for a statistic in one slice only")
            final = True
            sink(chunk, out)
            del chunk, out       # free this slice before the next is read
        if final is not False:
            return passes
        pending = state.pending
        if pending.advance():
            resolved.append(pending)
            pending = None


def run_in_memory(method: Method | str, options: dict[str, Any], models: torch.Tensor, base: torch.Tensor | None = None,
                  *, name: str = "*") -> torch.Tensor:
    """``method`` on in-memory values ``models [K, *shape]`` (and ``base [*shape]``) as one slice: the
    whole array is one tensor for the statistics. Returns ``[*shape]``."""
    from .registry import get_method
    method = get_method(method)
    shape = models.shape[1:]
    flat = models.reshape(models.shape[0], -1).clone()      # kernels own their slice (delta is in place)
    b = None if base is None else base.reshape(-1).clone()
    numel = flat.shape[1]
    row_len = numel // shape[0] if len(shape) >= 2 else max(numel, 1)
    chunk = Chunk(flat, b, name, 0, 0, row_len)
    out: list[torch.Tensor] = []
    run_group(method, options, lambda: [chunk], numel=numel, name=name,
              rows=shape[0] if len(shape) >= 2 else 1, sink=lambda c, o: out.append(o), whole=True)
    return out[0].reshape(shape)


def iter_slices(numel: int, row_len: int, budget: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` flat ranges of at most ``budget`` elements: whole rows when a row fits, else
    pieces of one row (so a slice never straddles a row boundary)."""
    if numel == 0:
        yield 0, 0
        return
    if row_len <= budget:
        step = max(1, budget // row_len) * row_len
        for s in range(0, numel, step):
            yield s, min(numel, s + step)
        return
    for r0 in range(0, numel, row_len):
        for s in range(r0, r0 + row_len, budget):
            yield s, min(r0 + row_len, s + budget)


def select(values: torch.Tensor, counts: Sequence[int], *, largest: bool = True) -> torch.Tensor:
    """Mask of the ``counts[r]`` largest (or smallest) of the non-negative ``values [R, n]`` in each row,
    exact, ties at the cutoff to the earlier entries (in memory: the selection the kernels request)."""
    sel = _Select([counts], values.shape[1], largest, values.dtype)
    while not sel.done:
        sel.feed(values)
        sel.advance()
    return sel.masks(values, [[0] * len(counts)])[0]
