"""Per-layer eigenvalues, sliced and scaled exactly as WeightWatcher 0.7.7 does.

Scaling
-------
For a weight matrix ``W`` (any orientation) the eigenvalues are ``λ = σ(W)²``, the squared singular
values, i.e. the eigenvalues of ``XᵀX`` with ``X`` the matrix transposed so that it is ``N x M`` with
``N >= M``. There is **no** ``1/N`` normalization (WeightWatcher's default for PyTorch). A layer
contributes ``M`` eigenvalues per slice.

Convolutions
------------
A ``Conv2d`` kernel ``[out, in, kh, kw]`` is cut into ``kh * kw`` matrices ``W[:, :, i, j]`` of shape
``out x in`` (the receptive field ``rf = kh * kw``); their eigenvalues are pooled into one ESD of
``rf * M`` values. With ``conv2d_norm=True`` (WeightWatcher's default) every slice is multiplied by
``sqrt(1/2)`` first, so Conv2d eigenvalues are halved. ``Conv1d`` kernels ``[out, in, k]`` are sliced
the same way (``rf = k``) without the rescaling. (WeightWatcher itself hands the 3-D Conv1d tensor
to a batched SVD over output channels, which slices along the wrong axis; we slice as for Conv2d.)

Methods
-------
``method="gram"`` (default) forms the ``M x M`` Gram matrix ``XᵀX`` in float64 and calls
``torch.linalg.eigvalsh``; ``method="svd"`` calls ``torch.linalg.svdvals``. Both are batched: all
matrices of one shape go through one call. The Gram route is several times cheaper; its eigenvalues
carry an absolute error of about ``M * eps * λmax`` (``eps = 2.2e-16``), far below anything the
power-law fit or the norms can see, but numerically zero singular values come out near
``sqrt(eps) * σmax`` rather than ``eps * σmax``, so :func:`numerical_rank` uses a tolerance adapted
to the method (see there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError, ShapeMismatchError

CONV2D_NORM_FACTOR = 0.5  # WeightWatcher: W *= sqrt(conv2d_count / 2) with conv2d_count = 1 -> λ *= 1/2
FLOAT64_EPS = float(torch.finfo(torch.float64).eps)
METHODS = ("gram", "svd")


@dataclass(frozen=True)
class MatrixLayout:
    """How a weight tensor is cut into matrices.

    Attributes
    ----------
    kind : ``"dense"`` (2-D), ``"conv1d"`` (3-D) or ``"conv2d"`` (4-D).
    N, M : sizes of each slice after transposing so that ``N >= M``.
    rf : number of slices (receptive field size; 1 for dense).
    scale : factor applied to the eigenvalues (0.5 for Conv2d with ``conv2d_norm``).
    """

    kind: str
    N: int
    M: int
    rf: int
    scale: float

    @property
    def num_evals(self) -> int:
        return self.M * self.rf


def layout(shape: tuple[int, ...], *, conv2d_norm: bool = True, name: str = "") -> MatrixLayout:
    """The :class:`MatrixLayout` of a weight tensor of ``shape`` (without any batch dimension)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3, 4):
        where = f"{name!r} " if name else ""
        raise ShapeMismatchError(f"tensor {where}has shape {shape}: ESD needs a 2-D matrix or a 3-/4-D conv kernel")
    out, inp = shape[0], shape[1]
    rf = math.prod(shape[2:]) if len(shape) > 2 else 1
    kind = {2: "dense", 3: "conv1d", 4: "conv2d"}[len(shape)]
    scale = CONV2D_NORM_FACTOR if (kind == "conv2d" and conv2d_norm) else 1.0
    return MatrixLayout(kind, max(out, inp), min(out, inp), rf, scale)


def slices(w: torch.Tensor, ndim: int) -> torch.Tensor:
    """Cut weight tensors into per-kernel-position matrices with ``N >= M``.

    Parameters
    ----------
    w : ``[*lead, out, in, *k]`` where ``len(k) = ndim - 2``.
    ndim : dimensionality of one weight tensor (2, 3 or 4).

    Returns
    -------
    ``[*lead, rf, N, M]`` (a view where possible; transposed so that ``N >= M``).
    """
    lead = w.shape[: w.dim() - ndim]
    out, inp = w.shape[len(lead)], w.shape[len(lead) + 1]
    m = w.reshape(*lead, out, inp, -1)  # [*lead, out, in, rf]
    m = m.movedim(-1, -3)  # [*lead, rf, out, in]
    return m if out >= inp else m.transpose(-1, -2)


def matrix_eigenvalues(mats: torch.Tensor, *, method: str = "gram", dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Eigenvalues ``σ²`` of a batch of ``N x M`` matrices (``N >= M``), ascending.

    Parameters
    ----------
    mats : ``[..., N, M]``
    method : ``"gram"`` (eigvalsh of ``XᵀX``) or ``"svd"`` (svdvals squared).
    dtype : computation dtype (float64 matches WeightWatcher, which casts to float64).

    Returns
    -------
    ``[..., M]`` ascending, in ``dtype``, on the input's device; negative round-off clamped to 0.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    x = mats.to(dtype)
    if x.numel() == 0:
        return x.new_zeros(*x.shape[:-2], x.shape[-1])
    if method == "gram":
        g = x.transpose(-1, -2) @ x
        ev = torch.linalg.eigvalsh(g)
    else:
        ev = torch.linalg.svdvals(x).square().flip(-1)
    return ev.clamp_min(0.0)


def numerical_rank(evals: torch.Tensor, N: int, *, method: str = "gram", M: int | None = None,
                   dim: int = -1) -> torch.Tensor:
    """Number of singular values above WeightWatcher's tolerance ``σmax * N * eps``.

    ``evals`` are squared singular values (``[..., M]``). With ``method="gram"`` the noise floor of the
    Gram eigenvalues (``~ M * eps * λmax``) exceeds that tolerance, so the threshold is raised to
    ``λmax * max((N eps)², 8 M eps)``: rank-deficient matrices are then counted correctly, full-rank
    ones are unaffected unless their condition number exceeds ``~ 1e7``.
    """
    lmax = evals.amax(dim, keepdim=True)
    M = evals.shape[dim] if M is None else M
    factor = (N * FLOAT64_EPS) ** 2
    if method == "gram":
        factor = max(factor, 8 * M * FLOAT64_EPS)
    return (evals > lmax * factor).sum(dim)


def check_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a ``torch.device``; :class:`ConfigError` if it is malformed or not available here."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"bad device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} requested but CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {str(device)!r} requested but MPS is not available on this machine")
    return dev


@dataclass
class LayerSpectrum:
    """Pooled ESD of one layer (or of ``B`` same-shape layers, one per row).

    Attributes
    ----------
    evals : ``[B, rf*M]`` float64, ascending (scaled as WeightWatcher does).
    layout : the :class:`MatrixLayout`.
    sv_max : ``[B]`` largest singular value over slices.
    sv_min : ``[B]`` WeightWatcher's ``sv_min``: the *largest* of the per-slice smallest singular values.
    rank_loss : ``[B]`` sum over slices of ``M - rank``.
    """

    evals: torch.Tensor
    layout: MatrixLayout
    sv_max: torch.Tensor
    sv_min: torch.Tensor
    rank_loss: torch.Tensor


def layer_spectrum(w: torch.Tensor, ndim: int | None = None, *, conv2d_norm: bool = True, method: str = "gram",
                   device: str | torch.device | None = None, name: str = "", pool: bool = True) -> LayerSpectrum:
    """Pooled eigenvalues of ``B`` weight tensors of one shape in one batched call.

    Parameters
    ----------
    w : ``[B, out, in, *k]`` (``ndim`` given, or ``ndim = w.dim() - 1``), or one tensor ``[out, in, *k]``
        with ``ndim = w.dim()``.
    device : where to compute (``"cuda"`` works); results come back on that device.
    pool : False gives one ESD per slice (WeightWatcher's ``pool=False``): rows ``[B * rf]`` in
        (tensor, slice) order, each of ``M`` eigenvalues; Conv2d slices are then scaled by ``rf / 2``
        (WeightWatcher's ``conv2d_norm`` with ``conv2d_count = rf``).

    Examples
    --------
    >>> s = layer_spectrum(torch.eye(3)[None], 2)
    >>> s.evals.tolist()
    [[1.0, 1.0, 1.0]]
    """
    if ndim is None:
        ndim = w.dim() - 1
    if w.dim() == ndim:
        w = w.unsqueeze(0)
    lay = layout(tuple(w.shape[1:]), conv2d_norm=conv2d_norm, name=name)
    if device is not None:
        w = w.to(device)
    ev = matrix_eigenvalues(slices(w, ndim), method=method)  # [B, rf, M]
    rank = numerical_rank(ev, lay.N, method=method)  # [B, rf] (scale-invariant)
    if not pool:
        scale = lay.rf / 2 if (lay.kind == "conv2d" and conv2d_norm) else 1.0
        ev = ev.flatten(0, 1) * scale  # [B * rf, M]
        return LayerSpectrum(ev, lay, ev[:, -1].sqrt(), ev[:, 0].sqrt(), (lay.M - rank).flatten())
    ev = ev * lay.scale
    sv_lo = ev[..., 0].sqrt()
    pooled = ev.flatten(1)
    if lay.rf > 1:
        pooled = pooled.sort(dim=1).values
    return LayerSpectrum(pooled, lay, pooled[:, -1].sqrt(), sv_lo.amax(1), (lay.M - rank).sum(1))
