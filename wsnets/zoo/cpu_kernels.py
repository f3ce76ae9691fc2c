"""Fused CPU loops of the zoo trainer, compiled once per machine with the system C compiler.

The batched MLP trainer (:mod:`wsnets.zoo.trainer`) spends much of a CPU step in elementwise passes
over small, cache-resident blocks and in NumPy calls with per-call overhead. Plain C loops do the
same arithmetic in fewer passes (together ~1.2x faster training of the default recipe):

* ``adamw_moments`` (weight decay and both moments: one pass instead of four) and ``adamw_update``
  (``p -= m1 / ((sqrt(m2) + eps') / q)``: one pass instead of three); the square root between them
  stays ``torch.sqrt``, because PyTorch's (MKL's) float32 square root is not always the correctly
  rounded one that C gives;
* ``sgd``: momentum (one for the block, or per model with gradient clipping), L2 decay and the step
  in two passes instead of three or four;
* ``dropout_forward``: the inverted-dropout factors from 16-bit lanes of NumPy's PCG64 stream (the
  generator re-implemented, four independent multiply-adds per round: the same numbers as
  ``random_raw``) and the dropped activations, one pass instead of four NumPy/torch calls;
* ``epoch_order``: each model's sample order (a radix sort of each pass's hash keys) instead of ~20
  NumPy calls per epoch block;
* ``argmax_is`` (evaluation: is the first maximum the label?) and ``rows_nonfinite`` (which models
  diverged), one pass each;
* ``gather_rows`` and ``gather_sum``, the CNN engine's im2col and col2im (:mod:`wsnets.zoo.cnn_engine`):
  copies of channel vectors by an index map (zeros for padding), and sums of them in the index map's
  order, instead of a padded copy, a gather and three to eight adds; ``act_backward``: the dropout
  factors and the tanh/ReLU backward in one pass.

They are **bit-identical** to the operations they replace, so a zoo is the same number for number
with or without them: the optimizer loops use fused multiply-adds exactly where PyTorch's CPU kernels
do (``lerp``, ``addcmul``, ``add`` with ``alpha``), everything else is one IEEE operation at a time
(``-ffp-contract=off``). Because that depends on how this PyTorch build was compiled, :func:`load`
checks every loop against the torch/NumPy operations on random inputs (odd lengths, NaNs, ties)
before it returns the library, and returns ``None`` (the trainer keeps its torch path) if any result
differs, if there is no C compiler, or if ``WSNETS_CPU_KERNELS=0``.

The shared library is built with ``cc -O3 -march=native`` into ``$WSNETS_CACHE/kernels`` (see
:func:`wsnets.io.cache_dir`), named by a hash of the source, the compiler and the CPU's flags,
written atomically (parallel workers may build it at once); building takes ~0.5 s, the check ~40 ms.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

/* AdamW, first pass, on ``rows`` contiguous rows of ``cols`` float32 values: p *= 1 - lr[r] * wd[r]
   (if wd), m1 = lerp(m1, g, w1) (PyTorch: fma(w1, g - m1, m1) for w1 < 0.5), m2 = m2 * b2 + c2 * g * g
   (PyTorch's addcmul: fma(c2 * g, g, m2 * b2)). */
void adamw_moments(float *restrict p, const float *restrict g, float *restrict m1, float *restrict m2,
                   const float *restrict lr, const float *restrict wd, int64_t rows, int64_t cols, float w1,
                   float b2, float c2) {
    for (int64_t r = 0; r < rows; r++) {
        float *pr = p + r * cols, *ar = m1 + r * cols, *vr = m2 + r * cols;
        const float *gr = g + r * cols;
        if (wd) {
            const float f = 1.0f - lr[r] * wd[r];
            for (int64_t j = 0; j < cols; j++) pr[j] = pr[j] * f;
        }
        for (int64_t j = 0; j < cols; j++) {
            const float a = ar[j], x = gr[j];
            ar[j] = fmaf(w1, x - a, a);
            vr[j] = fmaf(c2 * x, x, vr[j] * b2);
        }
    }
}

/* AdamW, second pass: p += -m1 / ((s + e) / (lr[r] * qf)) with s = sqrt(m2) computed by the caller. */
void adamw_update(float *restrict p, const float *restrict m1, const float *restrict s,
                  const float *restrict lr, float qf, int64_t rows, int64_t cols, float e) {
    for (int64_t r = 0; r < rows; r++) {
        float *pr = p + r * cols;
        const float *ar = m1 + r * cols, *sr = s + r * cols;
        const float qr = lr[r] * qf;
        for (int64_t j = 0; j < cols; j++) pr[j] = pr[j] + (-ar[j]) / ((sr[j] + e) / qr);
    }
}

/* AdamW in one pass: adamw_moments and adamw_update over tiles of 1024 values, the square root of each
   tile by ``vsqrt`` (PyTorch's own: MKL's vmsSqrt, called as ATen calls it, with ``mode``). */
typedef void (*vsqrt_t)(int n, const float *a, float *y, int64_t mode);

void adamw_onepass(float *restrict p, const float *restrict g, float *restrict m1, float *restrict m2,
                   const float *restrict lr, const float *restrict wd, int64_t rows, int64_t cols, float w1,
                   float b2, float c2, float qf, float e, vsqrt_t vsqrt, int64_t mode) {
    float s[1024];
    for (int64_t r = 0; r < rows; r++) {
        const float f = wd ? 1.0f - lr[r] * wd[r] : 1.0f, qr = lr[r] * qf;
        for (int64_t j0 = 0; j0 < cols; j0 += 1024) {
            const int64_t n = cols - j0 < 1024 ? cols - j0 : 1024;
            float *pr = p + r * cols + j0, *ar = m1 + r * cols + j0, *vr = m2 + r * cols + j0;
            const float *gr = g + r * cols + j0;
            if (wd)
                for (int64_t j = 0; j < n; j++) pr[j] = pr[j] * f;
            for (int64_t j = 0; j < n; j++) {
                const float a = ar[j], x = gr[j];
                ar[j] = fmaf(w1, x - a, a);
                vr[j] = fmaf(c2 * x, x, vr[j] * b2);
            }
            vsqrt((int)n, vr, s, mode);
            for (int64_t j = 0; j < n; j++) pr[j] = pr[j] + (-ar[j]) / ((s[j] + e) / qr);
        }
    }
}

/* SGD with momentum. One momentum for the block (coef NULL): buf = g + mom * buf (PyTorch's add
   with alpha: fma(buf, mom, g)); else per row: buf = buf * moms[r] + g * coef[r] (mul_, then
   addcmul_: fma(g, coef, buf * mom)). Then buf += p * wd[r] if wd (addcmul: fma(p, wd, buf)) and
   p += -buf * lr[r] (addcmul: fma(-buf, lr, p)). */
void sgd(float *restrict p, const float *restrict g, float *restrict buf, const float *restrict lr,
         const float *restrict wd, int64_t rows, int64_t cols, float mom, const float *restrict moms,
         const float *restrict coef) {
    for (int64_t r = 0; r < rows; r++) {
        float *pr = p + r * cols, *br = buf + r * cols;
        const float *gr = g + r * cols;
        const float l = lr[r], w = wd ? wd[r] : 0.0f;
        if (coef) {
            const float m = moms[r], c = coef[r];
            for (int64_t j = 0; j < cols; j++) br[j] = fmaf(gr[j], c, br[j] * m);
        } else {
            for (int64_t j = 0; j < cols; j++) br[j] = fmaf(br[j], mom, gr[j]);
        }
        for (int64_t j = 0; j < cols; j++) {
            float b = br[j];
            if (wd) b = fmaf(pr[j], w, b);
            br[j] = b;
            pr[j] = fmaf(-b, l, pr[j]);
        }
    }
}

/* NumPy's PCG64 (128-bit LCG, XSL-RR output): ``st`` = state low, high, increment low, high (updated);
   n outputs, four independent multiply-adds per round (a jump of 1..4 steps from the same state). */
typedef unsigned __int128 u128;
#define PCG_MUL (((u128)2549297995355413924ULL << 64) | 4865540595714422341ULL)

static inline uint64_t pcg_out(u128 s) {
    const uint64_t x = (uint64_t)(s >> 64) ^ (uint64_t)s;
    const unsigned rot = (unsigned)(s >> 122);
    return (x >> rot) | (x << ((-rot) & 63));
}

void pcg64_fill(uint64_t *st, uint64_t *restrict out, int64_t n) {
    u128 s = ((u128)st[1] << 64) | st[0];
    const u128 c = ((u128)st[3] << 64) | st[2];
    const u128 a1 = PCG_MUL, a2 = a1 * PCG_MUL, a3 = a2 * PCG_MUL, a4 = a3 * PCG_MUL;
    const u128 c2 = c * PCG_MUL + c, c3 = c2 * PCG_MUL + c, c4 = c3 * PCG_MUL + c;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        const u128 x1 = s * a1 + c, x2 = s * a2 + c2, x3 = s * a3 + c3, x4 = s * a4 + c4;
        out[i] = pcg_out(x1);
        out[i + 1] = pcg_out(x2);
        out[i + 2] = pcg_out(x3);
        out[i + 3] = pcg_out(x4);
        s = x4;
    }
    for (; i < n; i++) {
        s = s * a1 + c;
        out[i] = pcg_out(s);
    }
    st[0] = (uint64_t)s;
    st[1] = (uint64_t)(s >> 64);
}

/* Inverted dropout of ``rows`` models x ``per_row`` activations: lane i of the 16-bit lanes of
   ceil(rows * per_row / 4) PCG64 outputs (state ``st``; low lanes first, as NumPy's
   random_raw(n).view(uint16)) keeps element i if it is below thr[row]; scale = inv[row] or 0,
   out = y * scale (out rows ``out_stride`` apart). */
void dropout_forward(uint64_t *st, const float *restrict y, float *restrict out,
                     int64_t out_stride, float *restrict scale, const uint16_t *restrict thr,
                     const float *restrict inv, int64_t rows, int64_t per_row) {
    uint16_t lanes[4096];
    uint64_t raw[1024];
    int64_t raws = (rows * per_row + 3) / 4, avail = 0, pos = 0;
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t t = thr[r];
        const float v = inv[r];
        const float *yr = y + r * per_row;
        float *sr = scale + r * per_row, *orow = out + r * out_stride;
        int64_t j = 0;
        while (j < per_row) {
            if (pos == avail) {
                int64_t n = raws < 1024 ? raws : 1024;
                pcg64_fill(st, raw, n);
                memcpy(lanes, raw, 8 * n);
                raws -= n;
                avail = 4 * n;
                pos = 0;
            }
            int64_t m = per_row - j < avail - pos ? per_row - j : avail - pos;
            const uint16_t *l = lanes + pos;
            for (int64_t k = 0; k < m; k++) {
                const float s = l[k] < t ? v : 0.0f;
                sr[j + k] = s;
                orow[j + k] = yr[j + k] * s;
            }
            j += m;
            pos += m;
        }
    }
}

/* Sample order (see wsnets.zoo.trainer._epoch_order): out[k, t] = sample g0 + t of model k's stream
   of passes over its n = n_sub[k] members memb[k, :n]; pass p orders them by the 32-bit hash
   mix(key[k] + (p * Nmax + position) * 0x9E3779B1). Hashes are distinct within a pass, so any
   correct sort gives the same order: an LSD radix sort of (hash, position) pairs, 4 x 8 bits.
   ``work``: 2 * Smax uint64. */
static inline uint32_t mix32(uint32_t x) {
    x = (x ^ (x >> 16)) * 0x21F0AAADu;
    x = (x ^ (x >> 15)) * 0x735A2D97u;
    return x ^ (x >> 15);
}

void epoch_order(const uint32_t *restrict key, const int64_t *restrict memb, int64_t Smax,
                 const int64_t *restrict n_sub, int64_t K, int64_t g0, int64_t total, int64_t Nmax,
                 int32_t *restrict out, uint64_t *restrict work) {
    uint64_t *a = work, *b = work + Smax;
    for (int64_t k = 0; k < K; k++) {
        const int64_t n = n_sub[k];
        const int64_t *mk = memb + k * Smax;
        int32_t *ok = out + k * total;
        int64_t g = g0, t = 0, have = -1;
        while (t < total) {
            const int64_t p = g / n, r = g % n;
            if (p != have) {
                for (int64_t i = 0; i < n; i++) {
                    const uint32_t c = (uint32_t)(p * Nmax + mk[i]);
                    a[i] = ((uint64_t)mix32(key[k] + c * 0x9E3779B1u) << 32) | (uint64_t)mk[i];
                }
                for (int shift = 32; shift < 64; shift += 8) {
                    int64_t cnt[257] = {0};
                    for (int64_t i = 0; i < n; i++) cnt[((a[i] >> shift) & 255) + 1]++;
                    for (int d = 0; d < 256; d++) cnt[d + 1] += cnt[d];
                    for (int64_t i = 0; i < n; i++) b[cnt[(a[i] >> shift) & 255]++] = a[i];
                    uint64_t *tmp = a; a = b; b = tmp;
                }
                have = p;
            }
            const int64_t m = n - r < total - t ? n - r : total - t;
            for (int64_t i = 0; i < m; i++) ok[t + i] = (int32_t)(a[r + i] & 0xFFFFFFFFu);
            t += m;
            g += m;
        }
    }
}

/* out[k, n] = 1 if the first index of the maximum of x[k, :, n] (a NaN counts as the maximum, the
   first NaN wins) is y[k, n], else 0. x [K, C, N] contiguous; y int64, rows ``ystride`` apart;
   work: N floats and N int64. */
void argmax_is(const float *restrict x, const int64_t *restrict y, int64_t ystride, int64_t K, int64_t C,
               int64_t N, uint8_t *restrict out, float *restrict best, int64_t *restrict arg) {
    for (int64_t k = 0; k < K; k++) {
        const float *xk = x + k * C * N;
        for (int64_t n = 0; n < N; n++) {
            best[n] = xk[n];
            arg[n] = 0;
        }
        for (int64_t c = 1; c < C; c++) {
            const float *xc = xk + c * N;
            for (int64_t n = 0; n < N; n++) {
                const float v = xc[n], b = best[n];
                const int take = (b == b) & ((v != v) | (v > b));
                best[n] = take ? v : b;
                arg[n] = take ? c : arg[n];
            }
        }
        for (int64_t n = 0; n < N; n++) out[k * N + n] = arg[n] == y[k * ystride + n];
    }
}

/* bad[r] |= 1 if row r (``cols`` contiguous float32 values, read as their bits) holds a NaN or an
   infinity (all exponent bits set). */
void rows_nonfinite(const uint32_t *restrict x, int64_t rows, int64_t cols, uint8_t *restrict bad) {
    for (int64_t r = 0; r < rows; r++) {
        const uint32_t *xr = x + r * cols;
        uint32_t any = 0;
        for (int64_t j = 0; j < cols; j++) any |= (xr[j] & 0x7F800000u) == 0x7F800000u;
        bad[r] |= any != 0;
    }
}

/* im2col: out[i, j / T, (j % T) * C : +C] = src[i, idx[j], :] (C floats) for samples i < n, entries
   j < L (= windows x T taps), or zeros where idx[j] == P (padding); src holds P vectors per sample,
   out one row of ``ws`` floats per window (``ws >= T * C``: the trailing floats, e.g. a column of ones
   that folds a bias into the layer's matrix product, are not written). */
void gather_rows(const float *restrict src, int64_t n, int64_t P, int64_t C, const int64_t *restrict idx,
                 int64_t L, int64_t T, int64_t ws, float *restrict out) {
    const int64_t Q = L / T;
    for (int64_t i = 0; i < n; i++) {
        const float *s = src + i * P * C;
        for (int64_t q = 0; q < Q; q++) {
            float *o = out + (i * Q + q) * ws;
            const int64_t *iq = idx + q * T;
            for (int64_t t = 0; t < T; t++) {
                if (iq[t] == P) memset(o + t * C, 0, C * sizeof(float));
                else memcpy(o + t * C, s + iq[t] * C, C * sizeof(float));
            }
        }
    }
}

/* The backward of dropout after an activation, in place on ``g`` (rows x per_row contiguous floats):
   g = g * scale (if ``scale``), then the activation's backward from its output y: kind 0, tanh:
   g * (1 - y * y) with 1 - y * y one fused multiply-add (PyTorch's tanh_backward); kind 1, relu:
   0 where y <= 0 (PyTorch's threshold_backward). One pass instead of two. */
void act_backward(float *restrict g, const float *restrict scale, const float *restrict y, int64_t count, int kind) {
    if (kind == 0) {
        if (scale) for (int64_t i = 0; i < count; i++) g[i] = (g[i] * scale[i]) * fmaf(-y[i], y[i], 1.0f);
        else for (int64_t i = 0; i < count; i++) g[i] = g[i] * fmaf(-y[i], y[i], 1.0f);
    } else {
        if (scale) for (int64_t i = 0; i < count; i++) g[i] = y[i] <= 0.0f ? 0.0f : g[i] * scale[i];
        else for (int64_t i = 0; i < count; i++) g[i] = y[i] <= 0.0f ? 0.0f : g[i];
    }
}

/* col2im: out[i, p, :] = src[i, idx[0, p], :] + src[i, idx[1, p], :], then + src[i, idx[r, p], :] for
   r = 2 .. R-1, one IEEE addition at a time (a slot idx == S reads zeros; R == 1: a copy); src holds S
   vectors of C floats per sample, idx is [R, P]. */
void gather_sum(const float *restrict src, int64_t n, int64_t S, int64_t C, const int64_t *restrict idx,
                int64_t R, int64_t P, float *restrict out) {
    for (int64_t i = 0; i < n; i++) {
        const float *s = src + i * S * C;
        float *o = out + i * P * C;
        for (int64_t p = 0; p < P; p++) {
            float *op = o + p * C;
            const float *a = idx[p] == S ? 0 : s + idx[p] * C;
            if (R == 1) {
                for (int64_t c = 0; c < C; c++) op[c] = a ? a[c] : 0.0f;
                continue;
            }
            const float *b = idx[P + p] == S ? 0 : s + idx[P + p] * C;
            for (int64_t c = 0; c < C; c++) op[c] = (a ? a[c] : 0.0f) + (b ? b[c] : 0.0f);
            for (int64_t r = 2; r < R; r++) {
                int64_t q = idx[r * P + p];
                if (q == S) {
                    for (int64_t c = 0; c < C; c++) op[c] = op[c] + 0.0f;
                } else {
                    const float *v = s + q * C;
                    for (int64_t c = 0; c < C; c++) op[c] = op[c] + v[c];
                }
            }
        }
    }
}
"""

FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-shared", "-fPIC"]
_P, _I64, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "adamw_moments": [_P, _P, _P, _P, _P, _P, _I64, _I64, _F, _F, _F],
    "adamw_update": [_P, _P, _P, _P, _F, _I64, _I64, _F],
    "adamw_onepass": [_P, _P, _P, _P, _P, _P, _I64, _I64, _F, _F, _F, _F, _F, _P, _I64],
    "sgd": [_P, _P, _P, _P, _P, _I64, _I64, _F, _P, _P],
    "pcg64_fill": [_P, _P, _I64],
    "dropout_forward": [_P, _P, _P, _I64, _P, _P, _P, _I64, _I64],
    "epoch_order": [_P, _P, _I64, _P, _I64, _I64, _I64, _I64, _P, _P],
    "argmax_is": [_P, _P, _I64, _I64, _I64, _I64, _P, _P, _P],
    "rows_nonfinite": [_P, _I64, _I64, _P],
    "gather_rows": [_P, _I64, _I64, _I64, _P, _I64, _I64, _I64, _P],
    "act_backward": [_P, _P, _P, _I64, ctypes.c_int],
    "gather_sum": [_P, _I64, _I64, _I64, _P, _I64, _I64, _P],
}
_STATE: dict[str, object] = {}


def load():
    """The checked library (a ``ctypes.CDLL``), or ``None`` where the torch path must be used (the
    reason is in :func:`status`). Built and checked once per process (forked workers inherit it)."""
    if "lib" not in _STATE:
        lib, reason = None, "ok"
        if os.environ.get("WSNETS_CPU_KERNELS", "1") == "0":
            reason = "disabled by WSNETS_CPU_KERNELS=0"
        else:
            try:
                lib = _build()
                lib.vsqrt = _torch_sqrt()
                bad = _self_check(lib)
                if bad:
                    lib, reason = None, f"differs from torch in {bad}"
            except Exception as err:  # noqa: BLE001 - no compiler, a failed build: the torch path
                lib, reason = None, f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        _STATE["lib"], _STATE["reason"] = lib, reason
    return _STATE["lib"]


def _torch_sqrt() -> int | None:
    """The address of the float32 square root PyTorch's CPU kernel calls (MKL's ``vmsSqrt`` inside
    ``libtorch_cpu``), or None (another build: AdamW then runs in two loops around ``torch.sqrt``)."""
    import sys
    name = {"darwin": "libtorch_cpu.dylib", "win32": "torch_cpu.dll"}.get(sys.platform, "libtorch_cpu.so")
    try:
        fn = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / name)).vmsSqrt
    except (OSError, AttributeError):
        return None
    return ctypes.cast(fn, ctypes.c_void_p).value


_VML_MODE = 0x2 | 0x140000 | 0x100  # VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE, as ATen's vml.h


def status() -> str:
    """``"ok"`` when the fused loops are in use, else why not."""
    load()
    return str(_STATE["reason"])


def _build() -> ctypes.CDLL:
    from ..io import cache_dir
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc) found")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha1("\0".join([SOURCE, cc, version, " ".join(FLAGS), _cpu_flags()]).encode()).hexdigest()[:16]
    d = cache_dir("kernels")
    path = d / f"zoo_cpu_{key}.so"
    if not path.exists():
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=d, prefix=".build-") as tmp:
            src = Path(tmp) / "zoo_cpu.c"
            src.write_text(SOURCE)
            out = Path(tmp) / "zoo_cpu.so"
            r = subprocess.run([cc, *FLAGS, "-o", str(out), str(src)], capture_output=True, text=True, timeout=120)
            if r.returncode != 0:
                raise RuntimeError(f"{cc} failed: {r.stderr.strip()[-300:]}")
            os.replace(out, path)  # atomic: a parallel build replaces it with the same bytes
    lib = ctypes.CDLL(str(path))
    for name, args in _SIGNATURES.items():
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = None
    return lib


def _cpu_flags() -> str:
    """The CPU's feature flags (``-march=native`` code must not run on another CPU sharing the cache)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform
    return platform.processor() + platform.machine()


# -- the loops, and the torch/NumPy operations each replaces (the trainer's fallback path) -----------------
def adamw_torch(p, g, m1, m2, lr, wd, qf: float, e: float, out, b1: float = 0.9, b2: float = 0.999) -> None:
    """AdamW's passes in torch as the trainer runs them: ``lr``/``wd`` per row (``[rows, 1, ...]``; ``wd``
    None = no decay), ``qf`` the step's bias-correction factor (the step is ``lr * qf``), ``e`` the
    scaled epsilon; ``out`` a scratch tensor like ``p``."""
    if wd is not None:
        p.mul_(1 - lr * wd)
    m1.lerp_(g, 1 - b1)
    m2.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = torch.sqrt(m2, out=out).add_(e).div_(lr * qf)
    p.addcdiv_(m1, denom, value=-1)


def adamw_fused(lib, p, g, m1, m2, lr, wd, qf: float, e: float, out, b1: float = 0.9, b2: float = 0.999) -> None:
    """:func:`adamw_torch` with the fused loops (every tensor a contiguous float32 CPU block of ``rows``
    rows; ``lr`` and ``wd`` contiguous, one value per row): one pass where PyTorch's square root can be
    called from C (``lib.vsqrt``), else two around ``torch.sqrt``."""
    rows = p.shape[0]
    cols = p.numel() // max(rows, 1)
    if lib.vsqrt is not None:
        lib.adamw_onepass(p.data_ptr(), g.data_ptr(), m1.data_ptr(), m2.data_ptr(), lr.data_ptr(),
                          None if wd is None else wd.data_ptr(), rows, cols, 1 - b1, b2, 1 - b2, qf, e, lib.vsqrt,
                          _VML_MODE)
        return
    lib.adamw_moments(p.data_ptr(), g.data_ptr(), m1.data_ptr(), m2.data_ptr(), lr.data_ptr(),
                      None if wd is None else wd.data_ptr(), rows, cols, 1 - b1, b2, 1 - b2)
    torch.sqrt(m2, out=out)
    lib.adamw_update(p.data_ptr(), m1.data_ptr(), out.data_ptr(), lr.data_ptr(), qf, rows, cols, e)


def sgd_torch(p, g, buf, lr, wd, mom, coef=None) -> None:
    """SGD with momentum and L2 decay ``wd`` (per row, or None) as the trainer runs it: ``mom`` one
    float for the block (``coef`` None), or per-row momenta with per-row gradient factors ``coef``."""
    if coef is None:
        torch.add(g, buf, alpha=mom, out=buf)
    else:
        buf.mul_(mom).addcmul_(g, coef)
    sgd_rest(p, buf, lr, wd)


def sgd_rest(p, buf, lr, wd) -> None:
    """The rest of ``torch.optim.SGD`` (momentum, L2 weight decay, no dampening) for a block of models,
    in place, once ``buf = momentum * buf + clipped gradient``; ``wd`` None = no weight decay."""
    if wd is not None:
        buf.addcmul_(p, wd)
    p.addcmul_(buf, lr, value=-1)


def sgd_fused(lib, p, g, buf, lr, wd, mom, coef=None) -> None:
    """:func:`sgd_torch` in two passes (contiguous float32 CPU blocks; per-row values contiguous)."""
    rows = p.shape[0]
    one = coef is None
    lib.sgd(p.data_ptr(), g.data_ptr(), buf.data_ptr(), lr.data_ptr(), None if wd is None else wd.data_ptr(),
            rows, p.numel() // max(rows, 1), mom if one else 0.0, None if one else mom.data_ptr(),
            None if one else coef.data_ptr())


def pcg64_state(bit_generator):
    """The state of a NumPy ``PCG64`` as the uint64 array the loops advance: state low, high, increment
    low, high (a copy: the loops and the NumPy generator then go their own ways)."""
    import numpy as np
    st = bit_generator.state["state"]
    m = (1 << 64) - 1
    return np.array([st["state"] & m, st["state"] >> 64, st["inc"] & m, st["inc"] >> 64], dtype=np.uint64)


def dropout(lib, state, y: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, thr, inv: torch.Tensor) -> None:
    """``dropout_forward`` on ``y`` (contiguous ``[rows, ...]``), ``out`` (rows of the same size, each
    contiguous, ``out.stride(0)`` apart), ``scale`` (contiguous like ``y``); ``thr`` a contiguous uint16
    NumPy array and ``inv`` a float32 tensor, one value per row; draws from ``state`` (:func:`pcg64_state`)."""
    rows = y.shape[0]
    lib.dropout_forward(state.ctypes.data, y.data_ptr(), out.data_ptr(), out.stride(0), scale.data_ptr(),
                        thr.ctypes.data, inv.data_ptr(), rows, y.numel() // rows)


def epoch_order(lib, key, memb, n_sub, g0: int, total: int, Nmax: int) -> torch.Tensor:
    """``epoch_order``: samples ``g0 .. g0 + total - 1`` of each model's stream, ``[K, total]`` int32
    (``key`` uint32 per model, ``memb`` int64 ``[K, Smax]``, ``n_sub`` int64 ``[K]``: NumPy arrays)."""
    import numpy as np
    key, memb, n_sub = (np.ascontiguousarray(a, dtype=d) for a, d in ((key, np.uint32), (memb, np.int64),
                                                                       (n_sub, np.int64)))
    K, Smax = memb.shape
    out = np.empty((K, total), dtype=np.int32)
    work = np.empty(2 * Smax, dtype=np.uint64)
    lib.epoch_order(key.ctypes.data, memb.ctypes.data, Smax, n_sub.ctypes.data, K, g0, total, Nmax,
                    out.ctypes.data, work.ctypes.data)
    return torch.from_numpy(out)


def argmax_is(lib, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(1) == y`` (first maximum, NaN counts as the maximum) for contiguous float32
    ``[K, C, N]`` logits and int64 ``[K, N]`` labels with contiguous rows: a bool ``[K, N]``."""
    K, C, N = logits.shape
    out = torch.empty(K, N, dtype=torch.bool)
    best, arg = torch.empty(N), torch.empty(N, dtype=torch.long)
    lib.argmax_is(logits.data_ptr(), y.data_ptr(), y.stride(0), K, C, N, out.data_ptr(), best.data_ptr(),
                  arg.data_ptr())
    return out


def rows_nonfinite(lib, block: torch.Tensor, bad: torch.Tensor) -> None:
    """``bad |= ~isfinite(block).all(row)`` for a contiguous float32 block ``[rows, ...]`` and a bool
    ``bad`` with one contiguous value per row."""
    rows = block.shape[0]
    lib.rows_nonfinite(block.data_ptr(), rows, block.numel() // max(rows, 1), bad.data_ptr())


def gather_rows(lib, src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``gather_rows`` (im2col): ``src [n, P, C]``, ``idx [L]`` int64 (``P`` = zeros), ``out [n, L, C]`` or
    ``[n, Q, ws]`` (``Q`` windows of ``T = L / Q`` taps in rows of ``ws >= T * C`` floats, the rest of each
    row untouched); all contiguous (float32, CPU)."""
    n, P, C = src.shape
    L, Q, ws = idx.numel(), out.shape[1], out.shape[2]
    lib.gather_rows(src.data_ptr(), n, P, C, idx.data_ptr(), L, L // Q, ws, out.data_ptr())
    return out


def gather_rows_torch(src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """:func:`gather_rows` in torch (a copy with one zero slot per sample, then ``index_select``)."""
    n, P, C = src.shape
    if bool((idx == P).any()):
        src = torch.cat([src, src.new_zeros(n, 1, C)], 1)
    if out.dim() == 3 and out.shape[1] == idx.numel() and out.shape[2] == C:
        return torch.index_select(src, 1, idx, out=out)
    Q = out.shape[1]
    out[:, :, :idx.numel() // Q * C].copy_(torch.index_select(src, 1, idx).view(n, Q, -1))
    return out


def act_backward(lib, g: torch.Tensor, scale: torch.Tensor | None, y: torch.Tensor, fn: str) -> torch.Tensor:
    """``act_backward``: ``g = act'(g * scale)`` in place (``fn`` tanh or relu; contiguous float32, same sizes)."""
    lib.act_backward(g.data_ptr(), None if scale is None else scale.data_ptr(), y.data_ptr(), g.numel(),
                     0 if fn == "tanh" else 1)
    return g


def act_backward_torch(g: torch.Tensor, scale: torch.Tensor | None, y: torch.Tensor, fn: str) -> torch.Tensor:
    """:func:`act_backward` in torch (``mul_``, then PyTorch's ``tanh_backward`` / ``threshold_backward``)."""
    if scale is not None:
        g.mul_(scale)
    if fn == "tanh":
        return torch.ops.aten.tanh_backward.grad_input(g, y, grad_input=g)
    return torch.ops.aten.threshold_backward.grad_input(g, y, 0, grad_input=g)


def gather_sum(lib, src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``gather_sum`` (col2im): ``src [n, S, C]``, ``idx [R, P]`` int64 (``S`` = zeros), ``out [n, P, C]``;
    all contiguous (float32, CPU)."""
    n, S, C = src.shape
    R, P = idx.shape
    lib.gather_sum(src.data_ptr(), n, S, C, idx.data_ptr(), R, P, out.data_ptr())
    return out


def gather_sum_torch(src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """:func:`gather_sum` in torch: the same additions in the same order."""
    n, S, C = src.shape
    src = torch.cat([src, src.new_zeros(n, 1, C)], 1)
    if len(idx) == 1:
        return out.copy_(src[:, idx[0]])
    torch.add(src[:, idx[0]], src[:, idx[1]], out=out)
    for r in range(2, len(idx)):
        out += src[:, idx[r]]
    return out


def _check_adamw(lib) -> bool:
    """Whether :func:`adamw_fused` differs from :func:`adamw_torch` anywhere on random blocks."""
    gen = torch.Generator().manual_seed(4321)
    for rows, cols in ((3, 1), (5, 33), (2, 4161), (7, 17), (4, 1000), (2, 2048)):
        for wd in (False, True):
            for t in (1, 9):
                p = torch.randn(rows, cols, generator=gen)
                g = torch.randn(rows, cols, generator=gen) * 0.1
                m1 = torch.randn(rows, cols, generator=gen) * 0.01
                m2 = torch.rand(rows, cols, generator=gen) * 1e-3
                m2[0, ::3] = 0.0
                lr = torch.rand(rows, 1, generator=gen) * 0.1
                wdv = torch.rand(rows, 1, generator=gen) * 0.01 if wd else None
                r2 = math.sqrt(1 - 0.999 ** t)
                ref = [x.clone() for x in (p, m1, m2)]
                adamw_torch(ref[0], g, ref[1], ref[2], lr, wdv, r2 / (1 - 0.9 ** t), 1e-8 * r2, torch.empty_like(p))
                adamw_fused(lib, p, g, m1, m2, lr, wdv, r2 / (1 - 0.9 ** t), 1e-8 * r2, torch.empty_like(p))
                if not all(torch.equal(a, b) for a, b in zip(ref, (p, m1, m2))):
                    return True
    return False


def _self_check(lib) -> str:
    """Names of the loops whose results differ from the operations they replace on random inputs (odd
    lengths included); "" if none. If one-pass AdamW differs, ``lib.vsqrt`` is cleared (two passes
    around ``torch.sqrt``) and AdamW is checked again."""
    import numpy as np
    gen = torch.Generator().manual_seed(1234)
    bad = set()

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    adamw_differs = _check_adamw(lib)
    if adamw_differs and lib.vsqrt is not None:  # not PyTorch's square root after all: two passes around it
        lib.vsqrt = None
        adamw_differs = _check_adamw(lib)
    if adamw_differs:
        bad.add("adamw")
    for rows, cols in ((3, 1), (5, 33), (2, 4161), (7, 17), (4, 1000)):
        for wd in (False, True):
            p, g, m1 = rand(rows, cols), rand(rows, cols, scale=0.1), rand(rows, cols, scale=0.01)
            lr = torch.rand(rows, 1, generator=gen) * 0.1
            wdv = torch.rand(rows, 1, generator=gen) * 0.01 if wd else None
            moms = torch.where(torch.rand(rows, 1, generator=gen) < 0.5, 0.9, 0.0)
            coef = torch.rand(rows, 1, generator=gen).clamp(min=0.5)
            for mom, c in ((0.9, None), (moms, coef), (moms, torch.ones(rows, 1)), (0.9, None)):
                ref = [x.clone() for x in (p, m1)]
                sgd_torch(ref[0], g, ref[1], lr, wdv, mom, c)
                sgd_fused(lib, p, g, m1, lr, wdv, mom, c)
                if not all(torch.equal(a, b) for a, b in zip(ref, (p, m1))):
                    bad.add("sgd")
    for rows, per_row, stride in ((3, 7, 9), (4, 1031, 1100), (2, 5000, 5000), (1, 9001, 9001)):
        keep = torch.rand(rows, 1, 1, generator=gen) * 0.9 + 0.05
        k16 = (keep.double() * 65536).round().clamp(1, 65535)
        inv = (65536 / k16).float()
        y = rand(rows, 1, per_row)
        bg = np.random.PCG64(7)
        state = pcg64_state(bg)
        count = rows * per_row
        raw = bg.random_raw((count + 3) // 4).view(np.uint16)[:count].reshape(rows, 1, per_row)
        scale_ref = torch.mul(torch.from_numpy(raw < k16.numpy().astype(np.uint16)).float(), inv)
        out = torch.full((rows, stride), float("nan"))
        scale = torch.empty(rows, 1, per_row)
        dropout(lib, state, y, out[:, :per_row], scale, k16.numpy().astype(np.uint16).reshape(-1),
                inv.reshape(-1).contiguous())
        same_state = [int(v) for v in state[:2]] == [bg.state["state"]["state"] & ((1 << 64) - 1),
                                                      bg.state["state"]["state"] >> 64]
        if not (same_state and torch.equal(scale, scale_ref) and torch.equal(out[:, :per_row], (y * scale_ref)[:, 0])
                and bool(out[:, per_row:].isnan().all())):
            bad.add("dropout")
    from .trainer import _argmax_is
    for K, C, N in ((3, 10, 257), (2, 4, 5), (1, 1, 3)):
        lg = torch.randint(0, 4, (K, C, N), generator=gen).float()  # many ties
        lg[0, min(1, C - 1), ::7] = float("nan")
        lg[-1, -1, ::5] = float("nan")
        lg[0, 0, 1::3] = float("inf")
        lg[-1, 0, ::4] = -0.0
        y = torch.randint(0, C, (K, N + 3), generator=gen)[:, :N]
        if not torch.equal(argmax_is(lib, lg, y), _argmax_is(lg, y, lib=False)):
            bad.add("argmax_is")
    for rows, cols in ((4, 1), (3, 1000), (5, 77)):
        x = rand(rows, cols)
        x[1, cols // 2] = float("nan")
        x[-1, -1] = float("-inf")
        if rows > 3:
            x[2, 0] = float("inf")
        got = torch.zeros(rows, dtype=torch.bool)
        got[0] = True  # or-ed in, never cleared
        rows_nonfinite(lib, x, got)
        want = ~torch.isfinite(x).all(1)
        want[0] = True
        if not torch.equal(got, want):
            bad.add("rows_nonfinite")
    for n, P, C, L, R in ((3, 49, 16, 81, 4), (2, 7, 1, 12, 2), (1, 5, 3, 9, 1), (4, 40, 5, 60, 3)):
        src = rand(n, P, C)
        src[0, 1, 0] = -0.0
        idx = torch.randint(0, P + 1, (L,), generator=gen)
        idx[0] = P  # a padding slot
        out, ref = torch.full((n, L, C), float("nan")), torch.empty(n, L, C)
        if not torch.equal(gather_rows(lib, src, idx, out), gather_rows_torch(src, idx, ref)):
            bad.add("gather_rows")
        for T in (t for t in (1, 3, 9) if L % t == 0):  # rows of T taps and one more float (left as it was)
            out, ref = torch.full((n, L // T, T * C + 1), 7.0), torch.full((n, L // T, T * C + 1), 7.0)
            if not torch.equal(gather_rows(lib, src, idx, out), gather_rows_torch(src, idx, ref)):
                bad.add("gather_rows")
        sidx = torch.randint(0, L + 1, (R, P), generator=gen)
        sidx[:, 0] = L  # a position no window reads
        cols = rand(n, L, C)
        cols[-1, 2, :] = -0.0
        out, ref = torch.full((n, P, C), float("nan")), torch.empty(n, P, C)
        got, want = gather_sum(lib, cols, sidx, out), gather_sum_torch(cols, sidx, ref)
        if not (torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())):
            bad.add("gather_sum")
    for count in (1, 17, 1000):
        for fn in ("tanh", "relu"):
            y = torch.tanh(rand(count, scale=2.0)) if fn == "tanh" else torch.relu(rand(count))
            y[::7] = -0.0 if fn == "relu" else y[::7]
            g = rand(count)
            for scale in (None, (torch.rand(count, generator=gen) < 0.6) / 0.6):
                got, want = act_backward(lib, g.clone(), scale, y, fn), act_backward_torch(g.clone(), scale, y, fn)
                if not (torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())):
                    bad.add("act_backward")
    from .trainer import _epoch_order, _members
    for K, N, fracs in ((3, 50, (0.1, 0.5, 1.0)), (2, 1500, (0.03, 0.9))):
        seeds = torch.randint(0, 1 << 32, (K,), generator=gen)
        n_sub = torch.tensor([max(1, int(f * N)) for f in fracs])
        member = torch.stack([torch.randperm(N, generator=gen) < n for n in n_sub])
        memb = _members(member)
        for epoch, total, epochs in ((0, 64, 1), (3, 200, 2), (7, 1000, 3)):
            ref = _epoch_order(seeds, memb, n_sub, epoch, total, N, use_numpy=True, epochs=epochs, fused=False)
            got = _epoch_order(seeds, memb, n_sub, epoch, total, N, use_numpy=True, epochs=epochs, fused=lib)
            if not torch.equal(ref, got):
                bad.add("epoch_order")
    return ", ".join(sorted(bad))
