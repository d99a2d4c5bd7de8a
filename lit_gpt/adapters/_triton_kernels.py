"""The Triton kernels behind `gpu_kernel.py` (see there). A module of their own so that Triton is imported only
when they are first used, and so that `TRITON_INTERPRET=1`, which Triton reads when a kernel is defined, takes
effect if it is set before this module is imported.

Vectors come either as unit vectors (`NORMALIZE=False`: `w0`, `w1` point at rows of a `(J, nb, k)` tensor) or as the
raw parameters `u`, `v` (`NORMALIZE=True`: each program normalises its block's vectors in float32, `w / max(‖w‖,
eps)`, and multiplies them by the block's keep factor under block dropout), which saves the separate launches of
normalising and stacking the vectors on every step."""

import triton
import triton.language as tl


@triton.jit
def _vector(w_ptr, i, cols, cmask, keep_ptr, eps, K, NORMALIZE: tl.constexpr, HAS_KEEP: tl.constexpr):
    w = tl.load(w_ptr + i * K + cols, mask=cmask, other=0.0).to(tl.float32)
    if NORMALIZE:
        w = w / tl.maximum(tl.sqrt(tl.sum(w * w, axis=0)), eps)
    if HAS_KEEP:
        w = w * tl.load(keep_ptr + i)
    return w


@triton.jit
def _rows(z_ptr, sz, z2_ptr, sz2, wz, r64, rows, rmask, offs, mask, DT: tl.constexpr, ZFORM: tl.constexpr):
    """A (rows, block) tile of the transform's input z in float32, loaded, or made from its parts as PyTorch made it
    (`lit_gpt.recompute`'s forms: float32 products rounded to the activations' dtype `DT` where PyTorch rounds), so
    that it is bit for bit the tensor the parts stand for."""
    x = tl.load(z_ptr + r64 * sz + offs, mask=mask, other=0.0).to(tl.float32)
    if ZFORM == 1:
        r = tl.load(z2_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        x = _rounded(wz[None, :] * _rounded(x * r[:, None], DT), DT)
    elif ZFORM == 2:
        y = tl.load(z2_ptr + r64 * sz2 + offs, mask=mask, other=0.0).to(tl.float32)
        x = _rounded(x * y, DT)
    return x


@triton.jit
def _rounded(x, DT: tl.constexpr):
    """float32 `x` rounded to the nearest `DT` (ties to even, as PyTorch rounds), in float32. bfloat16 by hand on
    the bits: Triton's interpreter, where the tests run without a GPU, truncates instead."""
    if DT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(DT).to(tl.float32)


@triton.jit
def fwd(
    z_ptr, sz, w0_ptr, w1_ptr, keep_ptr, beta_ptr, out_ptr, so, c_ptr, T, NB, K, eps,
    S0: tl.constexpr, S1: tl.constexpr, J: tl.constexpr, NORMALIZE: tl.constexpr, HAS_KEEP: tl.constexpr,
    BETA: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
):
    # program (t, i): tokens t*BT .. t*BT + BT - 1 of block i. BETA: 0 no bias; 1 beta_ptr holds the (J, NB)
    # products ŵ_jᵀ b_i; 2 beta_ptr is the bias b itself (NB * K), its products with the vectors formed here
    i = tl.program_id(1)
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.arange(0, BK)
    rmask, cmask = rows < T, cols < K
    mask = rmask[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)[:, None]
    z = tl.load(z_ptr + r64 * sz + i * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w0 = _vector(w0_ptr, i, cols, cmask, keep_ptr, eps, K, NORMALIZE, HAS_KEEP)
    c0 = tl.sum(z * w0[None, :], axis=1)
    if BETA == 2:
        b = tl.load(beta_ptr + i * K + cols, mask=cmask, other=0.0).to(tl.float32)
        c0 -= tl.sum(b * w0, axis=0)
    elif BETA == 1:
        c0 -= tl.load(beta_ptr + i).to(tl.float32)
    tl.store(c_ptr + rows * NB + i, c0, mask=rmask)
    out = z + (S0 * c0)[:, None] * w0[None, :]
    if J == 2:
        w1 = _vector(w1_ptr, i, cols, cmask, keep_ptr, eps, K, NORMALIZE, HAS_KEEP)
        c1 = tl.sum(z * w1[None, :], axis=1)
        if BETA == 2:
            c1 -= tl.sum(b * w1, axis=0)
        elif BETA == 1:
            c1 -= tl.load(beta_ptr + NB + i).to(tl.float32)
        tl.store(c_ptr + (T + rows) * NB + i, c1, mask=rmask)
        out += (S1 * c1)[:, None] * w1[None, :]
    tl.store(out_ptr + r64 * so + i * K + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bwd(
    g_ptr, sg, z_ptr, sz, z2_ptr, sz2, z3_ptr, w0_ptr, w1_ptr, keep_ptr, c_ptr, d_ptr, gz_ptr, sgz, pv_ptr, pg_ptr,
    T, NB, K, P, NT, eps,
    S0: tl.constexpr, S1: tl.constexpr, J: tl.constexpr, NORMALIZE: tl.constexpr, HAS_KEEP: tl.constexpr,
    WANT_GZ: tl.constexpr, ACCUMULATE: tl.constexpr, WANT_V: tl.constexpr, WANT_GRAM: tl.constexpr,
    ACC2D: tl.constexpr, ZFORM: tl.constexpr, STORE_D: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
):
    # program (p, i) takes the token tiles p, p + P, p + 2P, ... < NT of block i (one tile when P == NT), summing
    # its share of the vector gradient sum_t (c_tj g_t + d_tj z_t) and of the gram sums; partials go to pv/pg[p].
    # ACC2D: the vector gradient is summed element-wise in a (BT, BK) accumulator and over its rows once at the
    # end, instead of a reduction across the tile's rows on every loop step. ACCUMULATE: gz += H g, not gz = H g.
    # gz may be g itself (in place): a program reads each of its tiles before it writes it, and no other reads it.
    # ZFORM: how the input z is given (`_rows`): 0 z itself; 1 an RMSNorm's parts, z = w * (x * r) (`ScaledRows`:
    # x at z_ptr, r at z2_ptr, w at z3_ptr); 2 the MLP product's factors, z = x * y (`ProductRows`: y at z2_ptr);
    # 3 no z: the partial sums take only sum_t c_tj g_t, and the caller adds sum_t d_tj z_t from the projections
    # d_tj = ŵ_jᵀ g_t, which STORE_D writes to d_ptr ((J, T, NB), like c)
    p = tl.program_id(0)
    i = tl.program_id(1)
    cols = tl.arange(0, BK)
    cmask = cols < K
    w0 = _vector(w0_ptr, i, cols, cmask, keep_ptr, eps, K, NORMALIZE, HAS_KEEP)
    if J == 2:
        w1 = _vector(w1_ptr, i, cols, cmask, keep_ptr, eps, K, NORMALIZE, HAS_KEEP)
    wz = tl.zeros((BK,), dtype=tl.float32)
    if ZFORM == 1:  # the norm's weight over this block's columns
        wz = tl.load(z3_ptr + i * K + cols, mask=cmask, other=0.0).to(tl.float32)
    if ACC2D:
        a0 = tl.zeros((BT, BK), dtype=tl.float32)
        a1 = tl.zeros((BT, BK), dtype=tl.float32)
    else:
        a0 = tl.zeros((BK,), dtype=tl.float32)
        a1 = tl.zeros((BK,), dtype=tl.float32)
    g00 = tl.zeros((BT,), dtype=tl.float32)  # sum d0 c0
    g01 = tl.zeros((BT,), dtype=tl.float32)  # sum d0 c1
    g0s = tl.zeros((BT,), dtype=tl.float32)  # sum d0
    g10 = tl.zeros((BT,), dtype=tl.float32)
    g11 = tl.zeros((BT,), dtype=tl.float32)
    g1s = tl.zeros((BT,), dtype=tl.float32)
    tile = p
    while tile < NT:  # a while loop: Triton's interpreter cannot run a range() with bounds known only at run time
        rows = tile * BT + tl.arange(0, BT)
        rmask = rows < T
        mask = rmask[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)[:, None]
        g = tl.load(g_ptr + r64 * sg + i * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        d0 = tl.sum(g * w0[None, :], axis=1)
        c0 = tl.load(c_ptr + rows * NB + i, mask=rmask, other=0.0)
        if J == 2:
            d1 = tl.sum(g * w1[None, :], axis=1)
            c1 = tl.load(c_ptr + (T + rows) * NB + i, mask=rmask, other=0.0)
        if STORE_D:
            tl.store(d_ptr + rows * NB + i, d0, mask=rmask)
            if J == 2:
                tl.store(d_ptr + (T + rows) * NB + i, d1, mask=rmask)
        if WANT_V and ZFORM == 3:
            if ACC2D:
                a0 += c0[:, None] * g
                if J == 2:
                    a1 += c1[:, None] * g
            else:
                a0 += tl.sum(c0[:, None] * g, axis=0)
                if J == 2:
                    a1 += tl.sum(c1[:, None] * g, axis=0)
        elif WANT_V:
            z = _rows(z_ptr, sz, z2_ptr, sz2, wz, r64, rows, rmask, i * K + cols[None, :], mask,
                      g_ptr.dtype.element_ty, ZFORM)
            if ACC2D:
                a0 += c0[:, None] * g + d0[:, None] * z
                if J == 2:
                    a1 += c1[:, None] * g + d1[:, None] * z
            else:
                a0 += tl.sum(c0[:, None] * g + d0[:, None] * z, axis=0)
                if J == 2:
                    a1 += tl.sum(c1[:, None] * g + d1[:, None] * z, axis=0)
        if WANT_GRAM:
            g00 += d0 * c0
            g0s += d0
            if J == 2:
                g01 += d0 * c1
                g10 += d1 * c0
                g11 += d1 * c1
                g1s += d1
        if WANT_GZ:
            gz = g + (S0 * d0)[:, None] * w0[None, :]
            if J == 2:
                gz += (S1 * d1)[:, None] * w1[None, :]
            if ACCUMULATE:
                gz += tl.load(gz_ptr + r64 * sgz + i * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(gz_ptr + r64 * sgz + i * K + cols[None, :], gz.to(gz_ptr.dtype.element_ty), mask=mask)
        tile += P
    if WANT_V:
        v0 = tl.sum(a0, axis=0) if ACC2D else a0
        tl.store(pv_ptr + (p * J * NB + i) * K + cols, v0 * S0, mask=cmask)
        if J == 2:
            v1 = tl.sum(a1, axis=0) if ACC2D else a1
            tl.store(pv_ptr + ((p * J + 1) * NB + i) * K + cols, v1 * S1, mask=cmask)
    if WANT_GRAM:
        # pg[p] is (J, J + 1, NB): [sum d_j c_l for l < J, sum d_j]
        base = p * J * (J + 1) * NB + i
        tl.store(pg_ptr + base, tl.sum(g00, axis=0))
        if J == 2:
            tl.store(pg_ptr + base + NB, tl.sum(g01, axis=0))
            tl.store(pg_ptr + base + 2 * NB, tl.sum(g0s, axis=0))
            tl.store(pg_ptr + base + 3 * NB, tl.sum(g10, axis=0))
            tl.store(pg_ptr + base + 4 * NB, tl.sum(g11, axis=0))
            tl.store(pg_ptr + base + 5 * NB, tl.sum(g1s, axis=0))
        else:
            tl.store(pg_ptr + base + NB, tl.sum(g0s, axis=0))


@triton.jit
def _sum_partials(ptr, P, BP: tl.constexpr, BK: tl.constexpr, row_stride, cols, cmask):
    """sum over p < P of ptr[p * row_stride + cols], BP partials per load."""
    acc = tl.zeros((BP, BK), dtype=tl.float32)
    p0 = 0
    while p0 < P:
        ps = p0 + tl.arange(0, BP)
        acc += tl.load(ptr + ps[:, None] * row_stride + cols[None, :], mask=(ps[:, None] < P) & cmask[None, :],
                       other=0.0)
        p0 += BP
    return tl.sum(acc, axis=0)


@triton.jit
def finish(
    pv_ptr, pg_ptr, w0_ptr, w1_ptr, keep_ptr, bias_ptr, gw_ptr, P, NB, K, eps,
    S0: tl.constexpr, S1: tl.constexpr, J: tl.constexpr, HAS_KEEP: tl.constexpr, KEPT_OUTPUT: tl.constexpr,
    HAS_BIAS: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr,
):
    # program (i, j): the gradient of the raw parameter row u[i] (j = 0) or v[i] (j = 1) from the P partial sums
    # of its unit vector's gradient (already scaled by s_j), BP partials per load: summed; made the gradient with
    # the transform's input z where backward read a kept tensor in its place (the output side: KEPT_OUTPUT, the
    # kept o = H z + b, or HAS_BIAS alone, the kept y = z + b): minus s_j (sum_l s_l G_jl ŵ_l + G_jJ b) with the
    # gram sums G from the P partials pg, (P, J, J + 1, NB); then times the keep factor and through the
    # normalisation; written to gw, (J, NB, K) in the parameters' dtype
    i = tl.program_id(0)
    j = tl.program_id(1)
    cols = tl.arange(0, BK)
    cmask = cols < K
    gu = _sum_partials(pv_ptr + (j * NB + i) * K, P, BP, BK, J * NB * K, cols, cmask)
    w0 = tl.load(w0_ptr + i * K + cols, mask=cmask, other=0.0).to(tl.float32)
    n0 = tl.sqrt(tl.sum(w0 * w0, axis=0))
    u0 = w0 / tl.maximum(n0, eps)
    norm, unit = n0, u0
    if J == 2:
        w1 = tl.load(w1_ptr + i * K + cols, mask=cmask, other=0.0).to(tl.float32)
        n1 = tl.sqrt(tl.sum(w1 * w1, axis=0))
        u1 = w1 / tl.maximum(n1, eps)
        if j == 1:
            norm, unit = n1, u1
    keep = 1.0
    if HAS_KEEP:
        keep = tl.load(keep_ptr + i)
    if KEPT_OUTPUT or HAS_BIAS:
        # G_jl for l <= J: one value each, summed over the P partials (a masked vector load, lane 0 kept)
        gbase = pg_ptr + j * (J + 1) * NB + i
        rs = J * (J + 1) * NB
        one = cols < 1
        corr = tl.zeros((BK,), dtype=tl.float32)
        if KEPT_OUTPUT:
            corr += S0 * tl.sum(_sum_partials(gbase, P, BP, BK, rs, cols * 0, one), axis=0) * (u0 * keep)
            if J == 2:
                corr += S1 * tl.sum(_sum_partials(gbase + NB, P, BP, BK, rs, cols * 0, one), axis=0) * (u1 * keep)
        if HAS_BIAS:
            b = tl.load(bias_ptr + i * K + cols, mask=cmask, other=0.0).to(tl.float32)
            corr += tl.sum(_sum_partials(gbase + J * NB, P, BP, BK, rs, cols * 0, one), axis=0) * b
        gu = gu - tl.where(j == 1, S1, S0) * corr
    if HAS_KEEP:
        gu = gu * keep
    # through w / max(‖w‖, eps): (g - û (û·g)) / ‖w‖ above eps, g / eps below (the max has no slope there)
    gw = tl.where(norm > eps, (gu - unit * tl.sum(unit * gu, axis=0)) / tl.maximum(norm, eps), gu / eps)
    tl.store(gw_ptr + (j * NB + i) * K + cols, gw.to(gw_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def cayley(s_ptr, h_ptr, K, BK: tl.constexpr):
    # program i: block i of a contiguous (n, K, K) batch of skew-symmetric S, H = 2 (I - S)^-1 - I. The inverse is
    # Gauss-Jordan elimination in place, without pivoting (every pivot of I - S is at least 1: `oft._ExactCayley`),
    # on the whole block held in registers; padding rows and columns (K < BK) are the identity and stay apart
    i = tl.program_id(0)
    rows = tl.arange(0, BK)
    cols = tl.arange(0, BK)
    S, offs, mask = _block(s_ptr, i, K, rows, cols, BK)
    eye = tl.where(rows[:, None] == cols[None, :], 1.0, 0.0).to(S.dtype)
    A = eye - S
    for p in range(0, K):
        r = tl.sum(tl.where(rows[:, None] == p, A, 0.0), axis=0)  # row p
        c = tl.sum(tl.where(cols[None, :] == p, A, 0.0), axis=1)  # column p
        a = 1.0 / tl.sum(tl.where(cols == p, r, 0.0), axis=0)  # 1 / pivot
        rr = tl.where(cols == p, 1.0, r) * a  # the new row p: r / pivot, and 1 / pivot at (p, p)
        # off row p: A_ij - A_ip A_pj / pivot, and -A_ip / pivot in column p
        A = tl.where(cols[None, :] == p, 0.0, A) - c[:, None] * rr[None, :]
        A = tl.where(rows[:, None] == p, rr[None, :], A)
    tl.store(h_ptr + offs, (2.0 * A - eye).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _block(ptr, i, K, rows, cols, BK: tl.constexpr):
    """Block `i` of a contiguous `(n, K, K)` batch as a `(BK, BK)` tile, zero outside `K x K`, and its offsets."""
    mask = (rows[:, None] < K) & (cols[None, :] < K)
    offs = i.to(tl.int64) * K * K + rows[:, None] * K + cols[None, :]
    return tl.load(ptr + offs, mask=mask, other=0.0), offs, mask


@triton.jit
def _series(S, eye, TERMS):
    """`N = sum_{j <= TERMS} S^j` for a zero-padded tile `S` (`TERMS >= 1`)."""
    N = eye + S
    P = S
    for _ in range(1, TERMS):
        P = tl.dot(P, S, input_precision="ieee")
        N += P
    return N


@triton.jit
def neumann_fwd(s_ptr, h_ptr, K, TERMS, BK: tl.constexpr):
    # program i: OFT's Cayley-Neumann block H = (I + S) sum_{j <= TERMS} S^j for block i, the powers in registers
    i = tl.program_id(0)
    rows = tl.arange(0, BK)
    cols = tl.arange(0, BK)
    S, offs, mask = _block(s_ptr, i, K, rows, cols, BK)
    eye = tl.where(rows[:, None] == cols[None, :], 1.0, 0.0).to(S.dtype)
    H = tl.dot(eye + S, _series(S, eye, TERMS), input_precision="ieee")
    tl.store(h_ptr + offs, H.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def neumann_bwd(s_ptr, gh_ptr, gs_ptr, K, TERMS, BK: tl.constexpr):
    # program i: the gradient of neumann_fwd's block, gS = gH Nᵀ + sum_{j=1..TERMS} sum_{a+b=j-1} A^a G A^b with
    # A = Sᵀ, G = (I + S)ᵀ gH; the inner sums D_j by D_1 = G, D_{j+1} = A D_j + G A^j
    i = tl.program_id(0)
    rows = tl.arange(0, BK)
    cols = tl.arange(0, BK)
    S, offs, mask = _block(s_ptr, i, K, rows, cols, BK)
    gH, _, _ = _block(gh_ptr, i, K, rows, cols, BK)
    eye = tl.where(rows[:, None] == cols[None, :], 1.0, 0.0).to(S.dtype)
    A = tl.trans(S)
    G = tl.dot(tl.trans(eye + S), gH, input_precision="ieee")
    gS = tl.dot(gH, tl.trans(_series(S, eye, TERMS)), input_precision="ieee") + G
    D = G
    P = eye
    for _ in range(1, TERMS):
        P = tl.dot(P, A, input_precision="ieee")
        D = tl.dot(A, D, input_precision="ieee") + tl.dot(G, P, input_precision="ieee")
        gS += D
    tl.store(gs_ptr + offs, gS.to(gs_ptr.dtype.element_ty), mask=mask)
