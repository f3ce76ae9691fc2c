"""Fixed Triton kernels of the zoo trainer (imported only where Triton is installed; see
:mod:`wsnets.zoo.fused` for the generated step kernel)."""

import triton
import triton.language as tl


@triton.jit
def order_keys(MEMB, ROWM, ROWPASS, KEYSEED, NSUB, OUT, Smax, Nmax, b, BLOCK: tl.constexpr):
    """Row ``r`` = (model ``ROWM[r]``, pass ``ROWPASS[r]``): ``OUT[r, j] = hash << b | position`` for the
    model's ``j``-th member position, ``2**62`` past its ``NSUB`` members; the hash is
    :func:`wsnets.zoo.trainer._mix` of ``KEYSEED[model] + (pass * Nmax + position) * 0x9E3779B1`` in
    32-bit arithmetic (the sample-order keys of :func:`wsnets.zoo.trainer._epoch_order`)."""
    r = tl.program_id(0).to(tl.int64)
    m = tl.load(ROWM + r)
    ps = tl.load(ROWPASS + r)
    kk = tl.load(KEYSEED + m).to(tl.uint32)
    n = tl.load(NSUB + m)
    col = tl.arange(0, BLOCK)
    valid = col < Smax
    pos = tl.load(MEMB + m * Smax + col, mask=valid, other=0)
    c = ((ps * Nmax + pos) & 0xFFFFFFFF).to(tl.uint32)
    x = kk + c * 0x9E3779B1
    x = (x ^ (x >> 16)) * 0x21F0AAAD
    x = (x ^ (x >> 15)) * 0x735A2D97
    x = x ^ (x >> 15)
    key = (x.to(tl.int64) << b) | pos
    key = tl.where(col < n, key, 1 << 62)
    tl.store(OUT + r * Smax + col, key, mask=valid)
