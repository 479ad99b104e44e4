"""Exhaustive checks of the exact-arithmetic shortcuts in moecomm.quant._kernels (CPU, about a minute).

Every claim below is checked over all fp32 operands it covers, with IEEE fp32 arithmetic (numpy, and a
correctly rounded fp32 fma from Triton's interpreter); exact quotients come from float64 division,
which is exact here: a quotient of two 24-bit numbers never lies within 2**-49 (relative) of an fp32
rounding boundary, far beyond float64's 2**-53.

1. Markstein, one correction: ``q = RN(a r); q += RN(a - b q) r`` with ``r = RN(1/b)`` gives RN(a/b)
   - for every e4m3 divisor mantissa (b = 1 + m/8) and every fp32 mantissa of a (two binades of a),
   - for b = 6 (the NVFP4 scale), every fp32 mantissa of a (three binades),
   - for a = e2m1 * e4m3 (the 14 mantissas of such products) and every fp32 mantissa of b (dequantize).
2. ``RN(1/s)`` for all 126 positive e4m3 values by three Newton steps from ``0x7EF311C3 - bits(s)``.
3. The e2m1 and e4m3 rounding chains (one fma for M, one fma and one add) for every fp32 value in
   [0, 6] and [0, 448], against the threshold rule and torch's float8_e4m3fn cast.

    python scripts/check_exact_arith.py
"""

from __future__ import annotations

import numpy as np
import torch
from triton._C.libtriton import interpreter as _interp

f32 = np.float32
fma = _interp.fma_fp32


def rn_div(a, b):
    return (a.astype(np.float64) / b.astype(np.float64)).astype(f32)


def markstein1(a, b, r):
    q = a * r
    return fma(fma(q, -b, a), r, q)


def mantissas(scale=1.0):
    """Every fp32 in [scale, 2 scale)."""
    return (np.arange(1 << 23, dtype=np.int64) | (127 << 23)).astype(np.int32).view(f32) * f32(scale)


def check(name, bad, n):
    print(f"{name}: {n} cases, {bad} wrong", flush=True)
    assert bad == 0, name


def main():
    for m in range(8):
        b = np.full(1 << 23, f32(1 + m / 8))
        r = rn_div(np.ones_like(b), b)
        for lo in (1.0, 2.0):
            a = mantissas(lo)
            check(f"a / (1 + {m}/8), a in [{lo}, {2 * lo})", int((markstein1(a, b, r) != rn_div(a, b)).sum()), a.size)
    six = np.full(1 << 23, f32(6))
    for lo in (1.0, 2.0, 4.0):
        a = mantissas(lo)
        check(f"a / 6, a in [{lo}, {2 * lo})", int((markstein1(a, six, np.full_like(a, f32(1 / 6))) != rn_div(a, six)).sum()), a.size)
    gs = mantissas()
    rg = rn_div(np.ones_like(gs), gs)
    for p in sorted({v * (1 + m / 8) for v in (1.0, 1.5) for m in range(8)}):
        a = np.full(gs.shape, f32(p))
        check(f"{p} / gs (dequantize)", int((markstein1(a, gs, rg) != rn_div(a, gs)).sum()), gs.size)

    s = torch.arange(1, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    r = (np.int32(0x7EF311C3) - s.view(np.int32)).view(f32)
    for _ in range(3):
        r = fma(r, fma(-s, r, np.ones_like(s)), r)
    check("RN(1/s), e4m3 s", int((r != rn_div(np.ones_like(s), s)).sum()), s.size)

    def e2m1_ref(q):
        c = np.zeros(q.shape, np.int32)
        for t, up in ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False)):
            c += (q >= t) if up else (q > t)
        return c

    def chain(q, mult, add, scale, shift):
        p = (q.view(np.int32) & 0x7F800000).view(f32)
        m = fma(p, np.full_like(q, f32(mult)), np.full_like(q, f32(add)))
        bits = (fma(q, np.full_like(q, f32(scale)), m) - m).view(np.int32)
        return bits >> shift, bits & ((1 << shift) - 1)

    for name, top, args, ref in (
        ("e2m1 chain, q in [0, 6]", 6.0, (0.75 * 2.0**-104, 2.0**-104, 2.0**-126, 22), e2m1_ref),
        ("e4m3 chain, v in [0, 448]", 448.0, ((1 - 2.0**-14) * 2.0**-100, 2.0**-106, 2.0**-120, 20),
         lambda v: torch.from_numpy(v).to(torch.float8_e4m3fn).view(torch.uint8).numpy().astype(np.int32)),
    ):  # fmt: skip
        bad = n = 0
        end = int(np.array(top, f32).view(np.int32))
        for start in range(0, end + 1, 1 << 24):
            q = np.arange(start, min(start + (1 << 24), end + 1), dtype=np.int64).astype(np.int32).view(f32)
            code, low = chain(q, *args)
            bad += int((code != ref(q)).sum()) + int((low != 0).sum())
            n += q.size
        check(name, bad, n)


if __name__ == "__main__":
    main()
