"""Fused CPU kernels for the adapters' work on activations: the Householder family's update (ETHER, ETHER+,
ETHER+HH) and OFT's block matmul.

The Householder update `z_i + sum_j s_j (ŵ_jiᵀ z_i) ŵ_ji` is a few multiply-adds per number, so its speed is the
speed of reading and writing the activations. Eager PyTorch spends several passes on it (a product, a short
reduction over the `k` values of each block, one update per vector, and the same again plus the vector gradient in
backward); the loops below do the dot products and the update of a block while its `k` values are in the
processor's cache: one read of `z` and one write in forward, one read of `g` and `z` and one write in backward, with
the vector gradient accumulated per thread on the way. OFT's `k x k` blocks are small matrix products: PyTorch runs
them as a batched matmul over permuted copies of `z` (and of `g` twice in backward); here they read the rows where
they lie, two rows per tile of explicit vector code, and backward takes `Hᵀ g` and the block gradient in one pass.

They are plain C, compiled once per machine with the system C compiler (no PyTorch headers, so it takes a second
or two), cached under `~/.cache/lit_gpt/kernels` and called through `ctypes` on the tensors' memory. Where no
compiler is found, or `LIT_GPT_CPU_KERNEL=0`, the eager paths are used: same results, slower
(`lit_gpt/adapters/ether.py`, `oft.py`).

float32 and float64 CPU tensors only, contiguous or a column slice of a wider matrix (the rows of one adapted slice
of a fused QKV output, updated where they lie); anything else takes the eager path. The Householder update may be
made in place.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from lit_gpt import recompute

log = logging.getLogger(__name__)

ENV_SWITCH = "LIT_GPT_CPU_KERNEL"
MAX_VECTORS = 4  # ETHER uses 1 vector per block, ETHER+ 2

# The Householder update's blocks in explicit vector code (False: plain loops the compiler vectorises, the code
# before it; kept so that bench/householder_blocks.py and bench/ab_step.py can compare the two in one run).
VECTOR_CODE = True

# Below this many numbers a call runs on one thread: starting the team costs more than it saves.
PARALLEL_MIN_NUMEL = 1 << 15

_SOURCE = r"""
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define MAXJ 4
#define INLINE static inline __attribute__((always_inline))

/* FN(..., k, J) with (k, J) as literals for block sizes 16/32/64/128 and one or two vectors, else as variables */
#define DISPATCH(FN, ...)                                                                                      \
    if (J == 1 && k == 32) FN(__VA_ARGS__, 32, 1);                                                             \
    else if (J == 2 && k == 32) FN(__VA_ARGS__, 32, 2);                                                        \
    else if (J == 1 && k == 128) FN(__VA_ARGS__, 128, 1);                                                      \
    else if (J == 2 && k == 128) FN(__VA_ARGS__, 128, 2);                                                      \
    else if (J == 1 && k == 64) FN(__VA_ARGS__, 64, 1);                                                        \
    else if (J == 2 && k == 64) FN(__VA_ARGS__, 64, 2);                                                        \
    else if (J == 1 && k == 16) FN(__VA_ARGS__, 16, 1);                                                        \
    else if (J == 2 && k == 16) FN(__VA_ARGS__, 16, 2);                                                        \
    else if (J == 1) FN(__VA_ARGS__, k, 1);                                                                    \
    else if (J == 2) FN(__VA_ARGS__, k, 2);                                                                    \
    else FN(__VA_ARGS__, k, J);

/* Explicit vectors of VBYTES bytes, for the OFT kernels' tiles and the Householder update's blocks (see VGEN).
   may_alias: they are loaded from and stored to arrays of T. */
#define VBYTES 32
#define VECTORS(T, SUF, VT, VI, IT)                                                                            \
typedef T VT __attribute__((vector_size(VBYTES), aligned(sizeof(T)), may_alias));                              \
typedef IT VI __attribute__((vector_size(VBYTES), aligned(sizeof(T)), may_alias));                             \
enum { VL_##SUF = VBYTES / sizeof(T) };                                                                        \
INLINE VT vld_##SUF(const T *p) { return *(const VT *)p; }                                                     \
INLINE void vst_##SUF(T *p, VT x) { *(VT *)p = x; }                                                            \
/* the lanes' sum as a tree (halves, then quarters, ...): a shorter chain of dependent additions than a loop */ \
INLINE T vsum_##SUF(VT x) {                                                                                    \
    T a[VL_##SUF];                                                                                             \
    memcpy(a, &x, sizeof x);                                                                                   \
    for (int h = VL_##SUF / 2; h; h /= 2)                                                                      \
        for (int l = 0; l < h; ++l) a[l] += a[l + h];                                                          \
    return a[0];                                                                                               \
}                                                                                                              \
/* A block of k numbers is covered by k / VL full vectors and, when VL does not divide k, one more that ends at \
   the block's end and overlaps the one before it: vtail's mask keeps the lanes of that last vector that no full \
   vector covers, for what adds up (dot products, sums) or adds into memory. Masked by bits, not by a product  \
   with 0, so that an infinite number in an overlapped lane cannot make a NaN. Needs k >= VL. */               \
static const IT vtail_bits_##SUF[16] = {0, 0, 0, 0, 0, 0, 0, 0, -1, -1, -1, -1, -1, -1, -1, -1};               \
INLINE VI vtail_##SUF(long k) { return *(const VI *)(vtail_bits_##SUF + 8 - VL_##SUF + k % VL_##SUF); }        \
INLINE VT vkeep_##SUF(VT x, VI m) { return (VT)((VI)x & m); }

VECTORS(float, f32, vec_f32, ivec_f32, int)
VECTORS(double, f64, vec_f64, ivec_f64, long long)

/* Whether the Householder update takes the explicit-vector path: asked for (VECTOR_CODE on the Python side) and
   a block at least a vector long; else plain loops that the compiler vectorises, where each short loop over a
   block whose size is not a compile-time constant pays for its own reduction, remainder and alignment handling. */
#define VGEN(vec, k, SUF) ((vec) && (k) >= VL_##SUF)
/* Backward: the block sizes DISPATCH compiles as constants run as fast or a little faster (ETHER+, 32 numbers:
   ~6%) in the plain loops, which the compiler then unrolls completely (bench/householder_blocks.py); forward
   takes the vector code at every size. */
#define CONST_K(k, J) (((J) == 1 || (J) == 2) && ((k) == 16 || (k) == 32 || (k) == 64 || (k) == 128))
#define VGEN_BWD(vec, k, J, SUF) (VGEN(vec, k, SUF) && !CONST_K(k, J))
/* Numbers per block of the vector gradient's partial sums and of a block of z made in backward: on the vector
   path with VL not dividing k, the full vectors and then the last (overlapping) one, kept apart (see vacc_block) */
#define KPAD(k, SUF) ((k) >= VL_##SUF && (k) % VL_##SUF ? ((k) / VL_##SUF + 1) * VL_##SUF : (k))

/* Activations are (ntok, nb, k) row-major; vectors v are (J, nb, k); s holds the J coefficients.
   c (forward output, backward input) is (J, ntok, nb). The block loops are inlined with the common block sizes as
   compile-time constants (the compiler then unrolls a block's vector loop completely: no loop overhead per
   block), and with one and two vectors (ETHER, ETHER+) as cases of their own. */

#define KERNELS(T, SUF)                                                                                        \
/* the primitives below on the explicit-vector path (VGEN): full vectors, then the overlapping last one */     \
INLINE void vdots_##SUF(const T *restrict a, const T *restrict v, long vstride, long k, long J, T *dots) {     \
    const long n = k / VL_##SUF, e = k - VL_##SUF;                                                             \
    const int tail = k % VL_##SUF != 0;                                                                        \
    const ivec_##SUF m = vtail_##SUF(k);                                                                       \
    if (J == 2) {                                                                                              \
        const T *restrict v1 = v + vstride;                                                                    \
        vec_##SUF s0 = {0}, s1 = {0};                                                                          \
        for (long q = 0; q < n; ++q) {                                                                         \
            vec_##SUF x = vld_##SUF(a + q * VL_##SUF);                                                         \
            s0 += x * vld_##SUF(v + q * VL_##SUF);                                                             \
            s1 += x * vld_##SUF(v1 + q * VL_##SUF);                                                            \
        }                                                                                                      \
        if (tail) {                                                                                            \
            vec_##SUF x = vkeep_##SUF(vld_##SUF(a + e), m);                                                    \
            s0 += x * vld_##SUF(v + e);                                                                        \
            s1 += x * vld_##SUF(v1 + e);                                                                       \
        }                                                                                                      \
        dots[0] = vsum_##SUF(s0); dots[1] = vsum_##SUF(s1);                                                    \
        return;                                                                                                \
    }                                                                                                          \
    for (long j = 0; j < J; ++j) {                                                                             \
        const T *restrict vj = v + j * vstride;                                                                \
        vec_##SUF s0 = {0}, s1 = {0};                                                                          \
        long q = 0;                                                                                            \
        for (; q + 1 < n; q += 2) {                                                                            \
            s0 += vld_##SUF(a + q * VL_##SUF) * vld_##SUF(vj + q * VL_##SUF);                                  \
            s1 += vld_##SUF(a + (q + 1) * VL_##SUF) * vld_##SUF(vj + (q + 1) * VL_##SUF);                      \
        }                                                                                                      \
        if (q < n) s0 += vld_##SUF(a + q * VL_##SUF) * vld_##SUF(vj + q * VL_##SUF);                           \
        if (tail) s1 += vkeep_##SUF(vld_##SUF(a + e), m) * vld_##SUF(vj + e);                                  \
        dots[j] = vsum_##SUF(s0 + s1);                                                                         \
    }                                                                                                          \
}                                                                                                              \
/* a + sum_j w[j] v_j on the vector at offset q of a block */                                                  \
INLINE vec_##SUF vaxpy_##SUF(const T *a, const T *restrict v, long vstride, long J, const T *w, long q) {      \
    vec_##SUF x = vld_##SUF(a + q);                                                                            \
    for (long j = 0; j < J; ++j) x += w[j] * vld_##SUF(v + j * vstride + q);                                   \
    return x;                                                                                                  \
}                                                                                                              \
/* o (may be a) = a + sum_j w[j] v_j; o's last vector at ot: k - VL in a row, or n VL in a padded block (see   \
   KPAD). It is made before any store, so that in place the lanes it shares with the one before it are made from \
   the same numbers, by the same expression, in both. */                                                       \
INLINE void vupdate_##SUF(const T *a, const T *restrict v, long vstride, long k, long J, const T *w, T *o,     \
                          long ot) {                                                                           \
    const long n = k / VL_##SUF;                                                                               \
    const int tail = k % VL_##SUF != 0;                                                                        \
    vec_##SUF last = {0};                                                                                      \
    if (tail) last = vaxpy_##SUF(a, v, vstride, J, w, k - VL_##SUF);                                           \
    for (long q = 0; q < n; ++q) vst_##SUF(o + q * VL_##SUF, vaxpy_##SUF(a, v, vstride, J, w, q * VL_##SUF));  \
    if (tail) vst_##SUF(o + ot, last);                                                                         \
}                                                                                                              \
INLINE void vupdate_acc_##SUF(const T *restrict a, const T *restrict v, long vstride, long k, long J,          \
                              const T *w, T *restrict o) {                                                     \
    const long n = k / VL_##SUF, e = k - VL_##SUF;                                                             \
    for (long q = 0; q < n; ++q) {                                                                             \
        T *op = o + q * VL_##SUF;                                                                              \
        vst_##SUF(op, vld_##SUF(op) + vaxpy_##SUF(a, v, vstride, J, w, q * VL_##SUF));                         \
    }                                                                                                          \
    if (k % VL_##SUF)                                                                                          \
        vst_##SUF(o + e, vld_##SUF(o + e) + vkeep_##SUF(vaxpy_##SUF(a, v, vstride, J, w, e), vtail_##SUF(k))); \
}                                                                                                              \
/* ap += cj g + dj z over one block, the sums ap in the padded layout (KPAD: the last vector's lanes that the  \
   full vectors cover also add up there, and are dropped at the end); z's last vector at zt (k - VL in a row, n VL \
   in a padded block). No store overlaps another, so every load of the sums is served by the store before it. */ \
INLINE void vacc_block_##SUF(T *restrict ap, T cj, const T *gp, T dj, const T *restrict zq, long zt, long k) { \
    const long n = k / VL_##SUF;                                                                               \
    for (long q = 0; q < n * VL_##SUF; q += VL_##SUF)                                                          \
        vst_##SUF(ap + q, vld_##SUF(ap + q) + (cj * vld_##SUF(gp + q) + dj * vld_##SUF(zq + q)));              \
    if (k % VL_##SUF) {                                                                                        \
        T *at = ap + n * VL_##SUF;                                                                             \
        vst_##SUF(at, vld_##SUF(at) + (cj * vld_##SUF(gp + k - VL_##SUF) + dj * vld_##SUF(zq + zt)));          \
    }                                                                                                          \
}                                                                                                              \
/* make_z into a padded block: the same products, a vector at a time */                                        \
INLINE void vmake_z_##SUF(const T *restrict zp, int zmode, const T *restrict z2, long ldz2,                    \
                          const T *restrict zcol, long t, long i, long k, T *restrict zb) {                    \
    const long n = k / VL_##SUF, e = k - VL_##SUF;                                                             \
    const int tail = k % VL_##SUF != 0;                                                                        \
    if (zmode == 1) {                                                                                          \
        T r = z2[t];                                                                                           \
        const T *restrict wc = zcol + i * k;                                                                   \
        for (long q = 0; q < n * VL_##SUF; q += VL_##SUF)                                                      \
            vst_##SUF(zb + q, vld_##SUF(wc + q) * (vld_##SUF(zp + q) * r));                                    \
        if (tail) vst_##SUF(zb + n * VL_##SUF, vld_##SUF(wc + e) * (vld_##SUF(zp + e) * r));                   \
    } else {                                                                                                   \
        const T *restrict bp = z2 + t * ldz2 + i * k;                                                          \
        for (long q = 0; q < n * VL_##SUF; q += VL_##SUF)                                                      \
            vst_##SUF(zb + q, vld_##SUF(zp + q) * vld_##SUF(bp + q));                                          \
        if (tail) vst_##SUF(zb + n * VL_##SUF, vld_##SUF(zp + e) * vld_##SUF(bp + e));                         \
    }                                                                                                          \
}                                                                                                              \
/* dots[j] = <a, v_j> for one block */                                                                         \
INLINE void dots_##SUF(int vg, const T *restrict a, const T *restrict v, long vstride, long k, long J,         \
                       T *dots) {                                                                              \
    if (vg) { vdots_##SUF(a, v, vstride, k, J, dots); return; }                                                \
    if (J == 1) {                                                                                              \
        T s0 = 0;                                                                                              \
        _Pragma("omp simd reduction(+:s0)")                                                                    \
        for (long q = 0; q < k; ++q) s0 += a[q] * v[q];                                                        \
        dots[0] = s0;                                                                                          \
    } else if (J == 2) {                                                                                       \
        const T *restrict v1 = v + vstride;                                                                    \
        T s0 = 0, s1 = 0;                                                                                      \
        _Pragma("omp simd reduction(+:s0,s1)")                                                                 \
        for (long q = 0; q < k; ++q) { s0 += a[q] * v[q]; s1 += a[q] * v1[q]; }                                \
        dots[0] = s0; dots[1] = s1;                                                                            \
    } else {                                                                                                   \
        for (long j = 0; j < J; ++j) {                                                                         \
            const T *restrict vj = v + j * vstride;                                                            \
            T sj = 0;                                                                                          \
            _Pragma("omp simd reduction(+:sj)")                                                                \
            for (long q = 0; q < k; ++q) sj += a[q] * vj[q];                                                   \
            dots[j] = sj;                                                                                      \
        }                                                                                                      \
    }                                                                                                          \
}                                                                                                              \
/* o = a + sum_j w[j] v_j for one block; o may be a (the update in place), so neither is restrict */           \
INLINE void update_##SUF(int vg, const T *a, const T *restrict v, long vstride, long k, long J, const T *w,    \
                         T *o) {                                                                               \
    if (vg) { vupdate_##SUF(a, v, vstride, k, J, w, o, k - VL_##SUF); return; }                                \
    if (J == 1) {                                                                                              \
        T w0 = w[0];                                                                                           \
        _Pragma("omp simd")                                                                                    \
        for (long q = 0; q < k; ++q) o[q] = a[q] + w0 * v[q];                                                  \
    } else if (J == 2) {                                                                                       \
        const T *restrict v1 = v + vstride;                                                                    \
        T w0 = w[0], w1 = w[1];                                                                                \
        _Pragma("omp simd")                                                                                    \
        for (long q = 0; q < k; ++q) o[q] = a[q] + w0 * v[q] + w1 * v1[q];                                     \
    } else {                                                                                                   \
        _Pragma("omp simd")                                                                                    \
        for (long q = 0; q < k; ++q) o[q] = a[q] + w[0] * v[q];                                                \
        for (long j = 1; j < J; ++j) {                                                                         \
            const T *restrict vj = v + j * vstride;                                                            \
            T wj = w[j];                                                                                       \
            _Pragma("omp simd")                                                                                \
            for (long q = 0; q < k; ++q) o[q] += wj * vj[q];                                                   \
        }                                                                                                      \
    }                                                                                                          \
}                                                                                                              \
/* o += a + sum_j w[j] v_j for one block (a and o distinct) */                                                 \
INLINE void update_acc_##SUF(int vg, const T *restrict a, const T *restrict v, long vstride, long k, long J,   \
                             const T *w, T *restrict o) {                                                      \
    if (vg) { vupdate_acc_##SUF(a, v, vstride, k, J, w, o); return; }                                          \
    if (J == 1) {                                                                                              \
        T w0 = w[0];                                                                                           \
        _Pragma("omp simd")                                                                                    \
        for (long q = 0; q < k; ++q) o[q] += a[q] + w0 * v[q];                                                 \
    } else if (J == 2) {                                                                                       \
        const T *restrict v1 = v + vstride;                                                                    \
        T w0 = w[0], w1 = w[1];                                                                                \
        _Pragma("omp simd")                                                                                    \
        for (long q = 0; q < k; ++q) o[q] += a[q] + w0 * v[q] + w1 * v1[q];                                    \
    } else {                                                                                                   \
        _Pragma("omp simd")                                                                                    \
        for (long q = 0; q < k; ++q) o[q] += a[q];                                                             \
        for (long j = 0; j < J; ++j) {                                                                         \
            const T *restrict vj = v + j * vstride;                                                            \
            T wj = w[j];                                                                                       \
            _Pragma("omp simd")                                                                                \
            for (long q = 0; q < k; ++q) o[q] += wj * vj[q];                                                   \
        }                                                                                                      \
    }                                                                                                          \
}                                                                                                              \
                                                                                                               \
INLINE void fwd_rows_##SUF(int vec, const T *z, long ldz, const T *v, const double *s, const T *beta, T *out,  \
                           long ldo, T *c, long lo, long hi, long ntok, long nb, long k, long J) {             \
    const int vg = VGEN(vec, k, SUF);                                                                          \
    long d = nb * k;                                                                                           \
    T sc[MAXJ];                                                                                                \
    for (long j = 0; j < J; ++j) sc[j] = (T)s[j];                                                              \
    for (long t = lo; t < hi; ++t) {                                                                           \
        for (long i = 0; i < nb; ++i) {                                                                        \
            const T *zp = z + t * ldz + i * k;                                                                 \
            T dd[MAXJ], w[MAXJ];                                                                               \
            dots_##SUF(vg, zp, v + i * k, d, k, J, dd);                                                        \
            if (beta)                                                                                          \
                for (long j = 0; j < J; ++j) dd[j] -= beta[j * nb + i];                                        \
            for (long j = 0; j < J; ++j) {                                                                     \
                c[(j * ntok + t) * nb + i] = dd[j];                                                            \
                w[j] = sc[j] * dd[j];                                                                          \
            }                                                                                                  \
            update_##SUF(vg, zp, v + i * k, d, k, J, w, out + t * ldo + i * k);                                \
        }                                                                                                      \
    }                                                                                                          \
}                                                                                                              \
                                                                                                               \
/* gram (may be NULL), per block i: gram[(j * (J + 1) + l) * nb + i] += sum_t d_tj c_tl for l < J, and         \
   gram[(j * (J + 1) + J) * nb + i] += sum_t d_tj: what turns a vector gradient taken with the output in place \
   of z into the one taken with z (see householder_bwd). */                                                    \
/* ap += cj g + dj z over one block: one expression for every way z is given, so the compiler fuses the same   \
   multiply-adds and the sums come out bit for bit alike */                                                    \
INLINE void acc_block_##SUF(T *restrict ap, T cj, const T *gp, T dj, const T *restrict zq, long k) {           \
    _Pragma("omp simd")                                                                                        \
    for (long q = 0; q < k; ++q) ap[q] += cj * gp[q] + dj * zq[q];                                             \
}                                                                                                              \
                                                                                                               \
/* z's block i of row t made as its producer made it, into zb: zmode 1, an RMSNorm's output zcol * (x * z2[t]) \
   from x's block zp; 2, the MLP's product x * y from x's block zp and y's rows at z2 (ldz2 apart) */          \
INLINE void make_z_##SUF(const T *restrict zp, int zmode, const T *restrict z2, long ldz2,                     \
                         const T *restrict zcol, long t, long i, long k, T *restrict zb) {                     \
    if (zmode == 1) {                                                                                          \
        T r = z2[t];                                                                                           \
        const T *restrict wc = zcol + i * k;                                                                   \
        _Pragma("omp simd")                                                                                    \
        for (long q = 0; q < k; ++q) zb[q] = wc[q] * (zp[q] * r);                                              \
    } else {                                                                                                   \
        const T *restrict bp = z2 + t * ldz2 + i * k;                                                          \
        _Pragma("omp simd")                                                                                    \
        for (long q = 0; q < k; ++q) zb[q] = zp[q] * bp[q];                                                    \
    }                                                                                                          \
}                                                                                                              \
                                                                                                               \
INLINE void bwd_rows_##SUF(int vec, const T *g, long ldg, const T *z, long ldz, int zmode, const T *z2,        \
                           long ldz2, const T *zcol, T *dout, const T *v, const double *s, const T *c, T *gz,  \
                           long ldgz,                                                                          \
                           int accum, T *acc, T *gram, long lo, long hi, long ntok, long nb, long k, long J) { \
    long d = nb * k;                                                                                           \
    const int vg = VGEN_BWD(vec, k, J, SUF);                                                                   \
    const long kp = vg ? KPAD(k, SUF) : k;                                                                     \
    T sc[MAXJ];                                                                                                \
    for (long j = 0; j < J; ++j) sc[j] = (T)s[j];                                                              \
    for (long t = lo; t < hi; ++t) {                                                                           \
        for (long i = 0; i < nb; ++i) {                                                                        \
            /* not restrict: gz may be g (the update in place), so it is written last, after every read of g */ \
            const T *gp = g + t * ldg + i * k;                                                                 \
            const T *restrict zp = z + t * ldz + i * k;                                                        \
            T dd[MAXJ], w[MAXJ];                                                                               \
            dots_##SUF(vg, gp, v + i * k, d, k, J, dd);                                                        \
            if (acc) {                                                                                         \
                /* z's block: read (zmode 0), or made as its producer made it (see householder_bwd); on the    \
                   vector path a made block is padded (KPAD), its last vector at zt */                         \
                T zb[zmode ? kp : 1];                                                                          \
                const T *zq = zp;                                                                              \
                long zt = k - VL_##SUF;                                                                        \
                if (zmode && zmode != 4) zq = zb;                                                              \
                if (zmode == 1 || zmode == 2) {                                                                \
                    if (vg) { vmake_z_##SUF(zp, zmode, z2, ldz2, zcol, t, i, k, zb); zt = kp - VL_##SUF; }     \
                    else make_z_##SUF(zp, zmode, z2, ldz2, zcol, t, i, k, zb);                                 \
                } else if (zmode == 3) {                                                                       \
                    /* zp is the output o = H (z - b) + b: z = o - b - sum_l s_l c_l v_l */                    \
                    T wl[MAXJ];                                                                                \
                    for (long l = 0; l < J; ++l) wl[l] = -sc[l] * c[(l * ntok + t) * nb + i];                  \
                    if (vg) {                                                                                  \
                        zt = kp - VL_##SUF;                                                                    \
                        vupdate_##SUF(zp, v + i * k, d, k, J, wl, zb, zt);                                     \
                    } else {                                                                                   \
                        update_##SUF(0, zp, v + i * k, d, k, J, wl, zb);                                       \
                    }                                                                                          \
                    if (zcol) {                                                                                \
                        const T *restrict bb = zcol + i * k;                                                   \
                        _Pragma("omp simd")                                                                    \
                        for (long q = 0; q < (kp != k ? kp - VL_##SUF : k); ++q) zb[q] -= bb[q];               \
                        /* a padded block's last vector holds the numbers from k - VL on */                    \
                        if (kp != k)                                                                           \
                            for (long q = 0; q < VL_##SUF; ++q) zb[kp - VL_##SUF + q] -= bb[k - VL_##SUF + q]; \
                    }                                                                                          \
                }                                                                                              \
                for (long j = 0; j < J; ++j) {                                                                 \
                    T *restrict ap = acc + (j * nb + i) * kp;                                                  \
                    T cj = c[(j * ntok + t) * nb + i], dj = zmode == 4 ? 0 : dd[j];                            \
                    if (zmode == 4) dout[(j * ntok + t) * nb + i] = dd[j];                                     \
                    if (vg) vacc_block_##SUF(ap, cj, gp, dj, zq, zt, k);                                       \
                    else acc_block_##SUF(ap, cj, gp, dj, zq, k);                                               \
                }                                                                                              \
            }                                                                                                  \
            if (gram) {                                                                                        \
                for (long j = 0; j < J; ++j) {                                                                 \
                    T *gp_j = gram + j * (J + 1) * nb + i;                                                     \
                    for (long l = 0; l < J; ++l) gp_j[l * nb] += dd[j] * c[(l * ntok + t) * nb + i];           \
                    gp_j[J * nb] += dd[j];                                                                     \
                }                                                                                              \
            }                                                                                                  \
            if (gz) {                                                                                          \
                for (long j = 0; j < J; ++j) w[j] = sc[j] * dd[j];                                             \
                if (accum) update_acc_##SUF(vg, gp, v + i * k, d, k, J, w, gz + t * ldgz + i * k);             \
                else update_##SUF(vg, gp, v + i * k, d, k, J, w, gz + t * ldgz + i * k);                       \
            }                                                                                                  \
        }                                                                                                      \
    }                                                                                                          \
}                                                                                                              \
                                                                                                               \
/* the same rows with k (and J) fixed at compile time where they are common */                                 \
static void fwd_range_##SUF(int vec, const T *z, long ldz, const T *v, const double *s, const T *beta,         \
                            T *out, long ldo, T *c, long lo, long hi, long ntok, long nb, long k, long J) {    \
    DISPATCH(fwd_rows_##SUF, vec, z, ldz, v, s, beta, out, ldo, c, lo, hi, ntok, nb)                           \
}                                                                                                              \
static void bwd_range_##SUF(int vec, const T *g, long ldg, const T *z, long ldz, int zmode, const T *z2,       \
                            long ldz2, const T *zcol, T *dout, const T *v, const double *s, const T *c, T *gz, \
                            long ldgz,                                                                         \
                            int accum, T *acc, T *gram, long lo, long hi, long ntok, long nb, long k, long J) { \
    DISPATCH(bwd_rows_##SUF, vec, g, ldg, z, ldz, zmode, z2, ldz2, zcol, dout, v, s, c, gz, ldgz, accum, acc, gram, \
             lo, hi, ntok, nb)                                                                                 \
}                                                                                                              \
                                                                                                               \
/* Rows of z / out / g / gz are ld* numbers apart (a column slice of a wider matrix); out may be z. beta (may be \
   NULL, (J, nb)) is subtracted from every dot product: with beta_ji = <b_i, v_ji> the update is then          \
   H (z - b) + b for a bias b already added to z. */                                                           \
void householder_fwd_##SUF(int vec, const T *z, long ldz, const T *v, const double *s, const T *beta, T *out,  \
                           long ldo, T *c, long ntok, long nb, long k, long J, int nthreads) {                 \
    _Pragma("omp parallel num_threads(nthreads)")                                                              \
    {                                                                                                          \
        int nt = omp_get_num_threads(), me = omp_get_thread_num();                                             \
        fwd_range_##SUF(vec, z, ldz, v, s, beta, out, ldo, c, ntok * me / nt, ntok * (me + 1) / nt, ntok, nb, k, \
                        J);                                                                                    \
    }                                                                                                          \
}                                                                                                              \
                                                                                                               \
/* gv (J, nb, k) = s_j times the threads' partial sums (each thread's at acc_all + th * per + off, nv = J nb kp \
   numbers in the padded layout, KPAD: kp numbers a block, the last vector's lanes that full vectors cover dropped) */ \
static void unpad_sums_##SUF(const T *acc_all, int nthreads, long per, long off, long nv, T *gv, const double *s, \
                             long nb, long k, long kp) {                                                       \
    const long full = kp != k ? kp - VL_##SUF : k;                                                             \
    for (long e = 0; e < nv; ++e) {                                                                            \
        T a = 0;                                                                                               \
        for (int th = 0; th < nthreads; ++th) a += acc_all[(long)th * per + off + e];                          \
        long blk = e / kp, q = e % kp; /* blk = j * nb + i */                                                  \
        if (q >= full) { /* the last vector's lane: number k - kp + q, kept where no full vector covers it */  \
            q += k - kp;                                                                                       \
            if (q < full) continue;                                                                            \
        }                                                                                                      \
        gv[blk * k + q] = (T)s[blk / nb] * a;                                                                  \
    }                                                                                                          \
}                                                                                                              \
                                                                                                               \
/* z is given by zmode: 0, its rows (ldz apart); 1, z_t = zcol * (x_t * z2[t]) with x's rows at z (an RMSNorm's \
   output from the float32 input it keeps, its 1/rms per row z2 and its weight zcol); 2, z_t = x_t * y_t with x's \
   rows at z and y's at z2 (ldz2 apart; the MLP's product silu(a) * b). Made here in the multiplications their \
   producers do, so the vector gradient is bit for bit the one taken with z itself, without a pass to rebuild z. \
   3, the rows at z are this transform's output o = H (z - b) + b, kept in place of z, and z = o - b - sum_l   \
   s_l c_l v_l is made from it and the forward's projections c (zcol: b, or NULL for no bias). 4, z is not     \
   here (z, ldz: g's, never read for it): the sums leave out d_tj z_t, which the caller adds from what made z, \
   and d_tj is written to dout ((J, ntok, nb), with gv only).                                                  \
   gz (may be NULL; may be g) = the same update applied to g, or with accum gz += it; gv (may be NULL,         \
   (J, nb, k), overwritten) =                                                                                  \
   s_j sum_t (c_tj g_t + d_tj z_t) per block, with d_tj = <g_t, v_j>; gram (may be NULL, (J, J + 1, nb),       \
   overwritten) as in bwd_rows. Each thread sums its own rows; the partial sums are added at the end. Returns  \
   0, or 1 when the few KiB of partial sums could not be allocated. */                                         \
int householder_bwd_##SUF(int vec, const T *g, long ldg, const T *z, long ldz, int zmode, const T *z2,         \
                          long ldz2, const T *zcol, T *dout, const T *v, const double *s, const T *c, T *gz,   \
                          long ldgz,                                                                           \
                          int accum, T *gv, T *gram, long ntok, long nb, long k, long J, int nthreads) {       \
    /* the vector gradient's sums per block in the padded layout (KPAD) */                                     \
    const long kp = VGEN_BWD(vec, k, J, SUF) ? KPAD(k, SUF) : k;                                               \
    long nv = gv ? J * nb * kp : 0, ng = gram ? J * (J + 1) * nb : 0, per = nv + ng;                           \
    T *acc_all = NULL;                                                                                         \
    if (per) {                                                                                                 \
        acc_all = (T *)calloc((size_t)nthreads * (size_t)per, sizeof(T));                                      \
        if (!acc_all) {                                                                                        \
            nthreads = 1;                                                                                      \
            acc_all = (T *)calloc((size_t)per, sizeof(T));                                                     \
            if (!acc_all) return 1; /* out of memory: the caller raises */                                     \
        }                                                                                                      \
    }                                                                                                          \
    _Pragma("omp parallel num_threads(nthreads)")                                                              \
    {                                                                                                          \
        int nt = omp_get_num_threads(), me = omp_get_thread_num();                                             \
        T *mine = per ? acc_all + (long)me * per : NULL;                                                       \
        bwd_range_##SUF(vec, g, ldg, z, ldz, zmode, z2, ldz2, zcol, dout, v, s, c, gz, ldgz, accum,            \
                        gv ? mine : NULL,                                                                      \
                        gram ? mine + nv : NULL, ntok * me / nt, ntok * (me + 1) / nt, ntok, nb, k, J);        \
    }                                                                                                          \
    if (gv) unpad_sums_##SUF(acc_all, nthreads, per, 0, nv, gv, s, nb, k, kp);                                 \
    for (long e = 0; e < ng; ++e) {                                                                            \
        T a = 0;                                                                                               \
        for (int th = 0; th < nthreads; ++th) a += acc_all[(long)th * per + nv + e];                           \
        gram[e] = a;                                                                                           \
    }                                                                                                          \
    free(acc_all);                                                                                             \
    return 0;                                                                                                  \
}

KERNELS(float, f32)
KERNELS(double, f64)

/* ---- The MLP's SiLU and product with the output-side transforms of fc_1 and fc_2 -------------------------------
   h = silu(a') * b' with a' = H_a a, b' = H_b b, a row at a time: a row's a' and b' are made in place and are
   still in cache for the SiLU and the product, and backward takes the product's and the SiLU's gradients and the
   transforms' in one visit of a row, where PyTorch's operations and separate transforms pass over the MLP's
   activations once each. */

/* e^x on float32 lanes: x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-7 polynomial with the coefficients
   of Cephes' expf (S. L. Moshier), 2^n made in the exponent's bits. Below -87 it gives 0 and above 88 infinity
   (where e^x leaves the normal numbers), so SiLU goes to -0 and x at the two ends as PyTorch's does. */
INLINE vec_f32 vexp_f32(vec_f32 x0) {
    const vec_f32 zero = {0};
    const ivec_f32 under = x0 < zero - 87.0f, over = x0 > zero + 88.0f, out = under | over;
    const vec_f32 x = (vec_f32)((ivec_f32)x0 & ~out); /* 0 out of range: its result is replaced below */
    vec_f32 n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* rounded to the nearest integer */
    vec_f32 r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vec_f32 p = zero + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    vec_f32 y = p * r * r + r + 1.0f;
    ivec_f32 e = (__builtin_convertvector(n, ivec_f32) + 127) << 23;
    y = y * (vec_f32)e;
    return (vec_f32)(((ivec_f32)y & ~out) | ((ivec_f32)(zero + INFINITY) & over));
}

/* s = silu(a) = a / (1 + e^-a) and h = s * b over one row of n numbers (the last ones through a padded vector,
   so that every number takes the same arithmetic) */
static void silu_mul_row_f32(const float *a, const float *b, float *s, float *h, long n) {
    for (long q = 0; q < n; q += VL_f32) {
        long m = n - q < VL_f32 ? n - q : VL_f32;
        vec_f32 x, y;
        if (m == VL_f32) { x = vld_f32(a + q); y = vld_f32(b + q); }
        else {
            float xa[VL_f32] = {0}, ya[VL_f32] = {0};
            memcpy(xa, a + q, m * sizeof(float)); memcpy(ya, b + q, m * sizeof(float));
            x = vld_f32(xa); y = vld_f32(ya);
        }
        vec_f32 sv = x / (1.0f + vexp_f32(-x)), hv = sv * y;
        if (m == VL_f32) { vst_f32(s + q, sv); vst_f32(h + q, hv); }
        else { memcpy(s + q, &sv, m * sizeof(float)); memcpy(h + q, &hv, m * sizeof(float)); }
    }
}
static void silu_mul_row_f64(const double *a, const double *b, double *s, double *h, long n) {
    for (long q = 0; q < n; ++q) {
        double sv = a[q] / (1.0 + exp(-a[q]));
        s[q] = sv;
        h[q] = sv * b[q];
    }
}
/* the gradients of a and b from h's gradient g over one row: ra = (g b) silu'(a) with silu'(a) =
   sig (1 + a (1 - sig)), sig = 1 / (1 + e^-a), as PyTorch's SiLU backward; rb = g s */
static void swiglu_grad_row_f32(const float *g, const float *a, const float *s, const float *b, float *ra,
                                float *rb, long n) {
    for (long q = 0; q < n; q += VL_f32) {
        long m = n - q < VL_f32 ? n - q : VL_f32;
        vec_f32 gv, x, sv, y;
        if (m == VL_f32) { gv = vld_f32(g + q); x = vld_f32(a + q); sv = vld_f32(s + q); y = vld_f32(b + q); }
        else {
            float t[4][VL_f32] = {{0}};
            memcpy(t[0], g + q, m * sizeof(float)); memcpy(t[1], a + q, m * sizeof(float));
            memcpy(t[2], s + q, m * sizeof(float)); memcpy(t[3], b + q, m * sizeof(float));
            gv = vld_f32(t[0]); x = vld_f32(t[1]); sv = vld_f32(t[2]); y = vld_f32(t[3]);
        }
        vec_f32 sig = 1.0f / (1.0f + vexp_f32(-x));
        vec_f32 da = (gv * y) * (sig * (1.0f + x * (1.0f - sig))), db = gv * sv;
        if (m == VL_f32) { vst_f32(ra + q, da); vst_f32(rb + q, db); }
        else { memcpy(ra + q, &da, m * sizeof(float)); memcpy(rb + q, &db, m * sizeof(float)); }
    }
}
static void swiglu_grad_row_f64(const double *g, const double *a, const double *s, const double *b, double *ra,
                                double *rb, long n) {
    for (long q = 0; q < n; ++q) {
        double sig = 1.0 / (1.0 + exp(-a[q]));
        ra[q] = (g[q] * b[q]) * (sig * (1.0 + a[q] * (1.0 - sig)));
        rb[q] = g[q] * s[q];
    }
}

#define SWIGLU(T, SUF)                                                                                         \
/* a, b: fc_1's and fc_2's outputs, (ntok, n) rows lda / ldb apart, made a' = H_a a and b' = H_b b in place (Ja / \
   Jb vectors per block of n / nba / n / nbb numbers; 0: no transform), with the projections into ca / cb as   \
   householder_fwd makes them; s = silu(a') and h = s * b' written (rows lds / ldh apart). */                  \
void swiglu_fwd_##SUF(int vec, T *a, long lda, T *b, long ldb, const T *va, const double *sa, long Ja, long nba, \
                      const T *vb, const double *sb, long Jb, long nbb, T *s, long lds, T *h, long ldh, T *ca, \
                      T *cb, long ntok, long n, int nthreads) {                                                \
    _Pragma("omp parallel num_threads(nthreads)")                                                              \
    {                                                                                                          \
        int nt = omp_get_num_threads(), me = omp_get_thread_num();                                             \
        for (long t = ntok * me / nt; t < ntok * (me + 1) / nt; ++t) {                                         \
            if (Ja) fwd_range_##SUF(vec, a, lda, va, sa, NULL, a, lda, ca, t, t + 1, ntok, nba, n / nba, Ja);  \
            if (Jb) fwd_range_##SUF(vec, b, ldb, vb, sb, NULL, b, ldb, cb, t, t + 1, ntok, nbb, n / nbb, Jb);  \
            silu_mul_row_##SUF(a + t * lda, b + t * ldb, s + t * lds, h + t * ldh, n);                         \
        }                                                                                                      \
    }                                                                                                          \
}                                                                                                              \
                                                                                                               \
/* swiglu_fwd's backward from h's gradient g, the kept a' and b' (each transform's input made from them and ca / \
   cb, as for OutputRows) and s: a row's gradients of a' and b' go into a per-thread buffer and through the    \
   transforms' backward into ga and gb (the gradients of fc_1's and fc_2's outputs); gva / gvb (may be NULL,   \
   (J, nb, k), overwritten) the vector gradients. Returns 0, or 1 when the buffers could not be allocated. */  \
int swiglu_bwd_##SUF(int vec, const T *g, long ldg, const T *a, long lda, const T *s, long lds, const T *b,    \
                     long ldb, const T *va, const double *sa, long Ja, long nba, const T *ca, const T *vb,     \
                     const double *sb, long Jb, long nbb, const T *cb, T *ga, long ldga, T *gb, long ldgb,     \
                     T *gva, T *gvb, long ntok, long n, int nthreads) {                                        \
    const long ka = Ja ? n / nba : n, kb = Jb ? n / nbb : n;                                                   \
    const long kpa = Ja && VGEN_BWD(vec, ka, Ja, SUF) ? KPAD(ka, SUF) : ka;                                    \
    const long kpb = Jb && VGEN_BWD(vec, kb, Jb, SUF) ? KPAD(kb, SUF) : kb;                                    \
    const long nva = gva ? Ja * nba * kpa : 0, nvb = gvb ? Jb * nbb * kpb : 0, per = nva + nvb + 2 * n;        \
    T *all = (T *)calloc((size_t)nthreads * (size_t)per, sizeof(T));                                           \
    if (!all) {                                                                                                \
        nthreads = 1;                                                                                          \
        all = (T *)calloc((size_t)per, sizeof(T));                                                             \
        if (!all) return 1; /* out of memory: the caller raises */                                             \
    }                                                                                                          \
    _Pragma("omp parallel num_threads(nthreads)")                                                              \
    {                                                                                                          \
        int nt = omp_get_num_threads(), me = omp_get_thread_num();                                             \
        T *mine = all + (long)me * per, *ra = mine + nva + nvb, *rb = ra + n;                                  \
        for (long t = ntok * me / nt; t < ntok * (me + 1) / nt; ++t) {                                         \
            swiglu_grad_row_##SUF(g + t * ldg, a + t * lda, s + t * lds, b + t * ldb, ra, rb, n);              \
            /* the row buffers as rows 0 apart: row t of them is the buffer itself */                          \
            if (Ja)                                                                                            \
                bwd_range_##SUF(vec, ra, 0, a, lda, 3, NULL, 0, NULL, NULL, va, sa, ca, ga, ldga, 0,           \
                                gva ? mine : NULL, NULL, t, t + 1, ntok, nba, ka, Ja);                         \
            else                                                                                               \
                memcpy(ga + t * ldga, ra, (size_t)n * sizeof(T));                                              \
            if (Jb)                                                                                            \
                bwd_range_##SUF(vec, rb, 0, b, ldb, 3, NULL, 0, NULL, NULL, vb, sb, cb, gb, ldgb, 0,           \
                                gvb ? mine + nva : NULL, NULL, t, t + 1, ntok, nbb, kb, Jb);                   \
            else                                                                                               \
                memcpy(gb + t * ldgb, rb, (size_t)n * sizeof(T));                                              \
        }                                                                                                      \
    }                                                                                                          \
    if (gva) unpad_sums_##SUF(all, nthreads, per, 0, nva, gva, sa, nba, ka, kpa);                              \
    if (gvb) unpad_sums_##SUF(all, nthreads, per, nva, nvb, gvb, sb, nbb, kb, kpb);                            \
    free(all);                                                                                                 \
    return 0;                                                                                                  \
}

SWIGLU(float, f32)
SWIGLU(double, f64)

/* ---- OFT: block-diagonal k x k matrices applied to the activations --------------------------------------------
   Forward: out[t, i*k:(i+1)*k] = sum_q a[t, i*k + q] M[i, q, :] for every row t and block i (M = Hᵀ gives H a_i).
   Backward, per chunk of CT rows: gz_t,i (+)= sum_j g[t, i*k + j] H[i, j, :] (Hᵀ g_i) and gH[i] += g_t,i z_t,iᵀ.
   Block sizes 16, 32 and 64 are compiled as constants with explicit vectors of VBYTES bytes (two rows per tile:
   each row of M is loaded once for both); other sizes take plain loops. The chunk's rows of g and z are first
   copied block by block into contiguous buffers (z made from its parts there, as in householder_bwd): the outer
   products then read them from the cache instead of walking a column of blocks through memory, and gz may be g
   (the chunk is read before any of its rows is written). */
#define OFT_CT 16

#define OFT_FIXED(T, SUF, VT, VL, K)                                                                           \
INLINE void oft_tile_##SUF##_##K(const T *restrict a, long lda, const T *restrict Mi, T *o, long ldo, int R,   \
                                 int accum) {                                                                  \
    enum { NV = K / VL };                                                                                      \
    VT c[2][NV];                                                                                               \
    for (int r = 0; r < R; ++r)                                                                                \
        for (int v = 0; v < NV; ++v) c[r][v] = (VT){0};                                                        \
    for (int q = 0; q < K; ++q) {                                                                              \
        const VT *mr = (const VT *)(Mi + q * K);                                                               \
        for (int r = 0; r < R; ++r) {                                                                          \
            T b = a[r * lda + q];                                                                              \
            for (int v = 0; v < NV; ++v) c[r][v] += b * mr[v];                                                 \
        }                                                                                                      \
    }                                                                                                          \
    for (int r = 0; r < R; ++r) {                                                                              \
        VT *op = (VT *)(o + r * ldo);                                                                          \
        if (accum) for (int v = 0; v < NV; ++v) op[v] += c[r][v];                                              \
        else for (int v = 0; v < NV; ++v) op[v] = c[r][v];                                                     \
    }                                                                                                          \
}                                                                                                              \
INLINE void oft_outer_##SUF##_##K(const T *restrict gb, const T *restrict zb, long n, T *restrict Gi) {        \
    enum { NV = K / VL };                                                                                      \
    for (int j = 0; j < K; j += 2) {                                                                           \
        VT c0[NV], c1[NV];                                                                                     \
        VT *r0 = (VT *)(Gi + j * K), *r1 = (VT *)(Gi + (j + 1) * K);                                           \
        for (int v = 0; v < NV; ++v) { c0[v] = r0[v]; c1[v] = r1[v]; }                                         \
        for (long t = 0; t < n; ++t) {                                                                         \
            const VT *zr = (const VT *)(zb + t * K);                                                           \
            T b0 = gb[t * K + j], b1 = gb[t * K + j + 1];                                                      \
            for (int v = 0; v < NV; ++v) { VT m = zr[v]; c0[v] += b0 * m; c1[v] += b1 * m; }                   \
        }                                                                                                      \
        for (int v = 0; v < NV; ++v) { r0[v] = c0[v]; r1[v] = c1[v]; }                                         \
    }                                                                                                          \
}

/* the same with k a variable: one output row at a time, the compiler vectorises along it */
#define OFT_GENERIC(T, SUF)                                                                                    \
INLINE void oft_tile_##SUF##_gen(const T *restrict a, long lda, const T *restrict Mi, T *o, long ldo, int R,   \
                                 int accum, long K) {                                                          \
    for (int r = 0; r < R; ++r) {                                                                              \
        T c[K];                                                                                                \
        for (long j = 0; j < K; ++j) c[j] = 0;                                                                 \
        for (long q = 0; q < K; ++q) {                                                                         \
            T b = a[r * lda + q];                                                                              \
            const T *restrict mr = Mi + q * K;                                                                 \
            _Pragma("omp simd")                                                                                \
            for (long j = 0; j < K; ++j) c[j] += b * mr[j];                                                    \
        }                                                                                                      \
        T *op = o + r * ldo;                                                                                   \
        if (accum) for (long j = 0; j < K; ++j) op[j] += c[j];                                                 \
        else for (long j = 0; j < K; ++j) op[j] = c[j];                                                        \
    }                                                                                                          \
}                                                                                                              \
INLINE void oft_outer_##SUF##_gen(const T *restrict gb, const T *restrict zb, long n, T *restrict Gi, long K) { \
    for (long t = 0; t < n; ++t)                                                                               \
        for (long j = 0; j < K; ++j) {                                                                         \
            T b = gb[t * K + j];                                                                               \
            T *restrict gr = Gi + j * K;                                                                       \
            const T *restrict zr = zb + t * K;                                                                 \
            _Pragma("omp simd")                                                                                \
            for (long q = 0; q < K; ++q) gr[q] += b * zr[q];                                                   \
        }                                                                                                      \
}

/* FN(K) for the block sizes with vector code, else FN(gen) */
#define OFT_DISPATCH(CALL16, CALL32, CALL64, CALLGEN)                                                          \
    if (K == 32) { CALL32; } else if (K == 16) { CALL16; } else if (K == 64) { CALL64; } else { CALLGEN; }

#define OFT_KERNELS(T, SUF, VT, VL)                                                                            \
OFT_FIXED(T, SUF, VT, VL, 16)                                                                                  \
OFT_FIXED(T, SUF, VT, VL, 32)                                                                                  \
OFT_FIXED(T, SUF, VT, VL, 64)                                                                                  \
OFT_GENERIC(T, SUF)                                                                                            \
                                                                                                               \
/* rows [lo, hi) of a (out) through the blocks M: out_t,i (+)= Σ_q a_t,iq M_i[q, :] */                         \
static void oft_rows_##SUF(const T *a, long lda, const T *M, T *out, long ldo, int accum, long lo, long hi,    \
                           long nb, long K) {                                                                  \
    for (long t = lo; t < hi; t += 2) {                                                                        \
        int R = t + 1 < hi ? 2 : 1;                                                                            \
        for (long i = 0; i < nb; ++i) {                                                                        \
            const T *ap = a + t * lda + i * K, *Mi = M + i * K * K;                                            \
            T *op = out + t * ldo + i * K;                                                                     \
            OFT_DISPATCH(oft_tile_##SUF##_16(ap, lda, Mi, op, ldo, R, accum),                                  \
                         oft_tile_##SUF##_32(ap, lda, Mi, op, ldo, R, accum),                                  \
                         oft_tile_##SUF##_64(ap, lda, Mi, op, ldo, R, accum),                                  \
                         oft_tile_##SUF##_gen(ap, lda, Mi, op, ldo, R, accum, K))                              \
        }                                                                                                      \
    }                                                                                                          \
}                                                                                                              \
                                                                                                               \
/* out (may not be a) = a through the blocks Mt (Mt[i] = H_iᵀ: out_i = H_i a_i) */                             \
void oft_fwd_##SUF(const T *a, long lda, const T *Mt, T *out, long ldo, long ntok, long nb, long K,            \
                   int nthreads) {                                                                             \
    _Pragma("omp parallel num_threads(nthreads)")                                                              \
    {                                                                                                          \
        int nt = omp_get_num_threads(), me = omp_get_thread_num();                                             \
        oft_rows_##SUF(a, lda, Mt, out, ldo, 0, ntok * me / nt, ntok * (me + 1) / nt, nb, K);                  \
    }                                                                                                          \
}                                                                                                              \
                                                                                                               \
static void oft_bwd_range_##SUF(const T *g, long ldg, const T *z, long ldz, int zmode, const T *z2, long ldz2, \
                                const T *zcol, const T *H, T *gz, long ldgz, int accum, T *gH, T *gb, T *zb,   \
                                long lo, long hi, long nb, long K) {                                           \
    for (long t0 = lo; t0 < hi; t0 += OFT_CT) {                                                                \
        long n = t0 + OFT_CT < hi ? OFT_CT : hi - t0;                                                          \
        for (long t = 0; t < n; ++t) {                                                                         \
            const T *gp = g + (t0 + t) * ldg, *zp = z + (t0 + t) * ldz;                                        \
            for (long i = 0; i < nb; ++i) {                                                                    \
                T *restrict gd = gb + (i * OFT_CT + t) * K;                                                    \
                memcpy(gd, gp + i * K, K * sizeof(T));                                                         \
                if (!gH) continue;                                                                             \
                T *restrict zd = zb + (i * OFT_CT + t) * K;                                                    \
                const T *restrict zq = zp + i * K;                                                             \
                if (zmode == 1 || zmode == 2) {                                                                \
                    make_z_##SUF(zq, zmode, z2, ldz2, zcol, t0 + t, i, K, zd);                                 \
                } else {                                                                                       \
                    memcpy(zd, zq, K * sizeof(T));                                                             \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
        for (long i = 0; i < nb; ++i) {                                                                        \
            const T *gi = gb + i * OFT_CT * K, *Hi = H + i * K * K;                                            \
            if (gz)                                                                                            \
                for (long t = 0; t < n; t += 2) {                                                              \
                    int R = t + 1 < n ? 2 : 1;                                                                 \
                    const T *ap = gi + t * K;                                                                  \
                    T *op = gz + (t0 + t) * ldgz + i * K;                                                      \
                    OFT_DISPATCH(oft_tile_##SUF##_16(ap, K, Hi, op, ldgz, R, accum),                           \
                                 oft_tile_##SUF##_32(ap, K, Hi, op, ldgz, R, accum),                           \
                                 oft_tile_##SUF##_64(ap, K, Hi, op, ldgz, R, accum),                           \
                                 oft_tile_##SUF##_gen(ap, K, Hi, op, ldgz, R, accum, K))                       \
                }                                                                                              \
            if (gH) {                                                                                          \
                const T *zi = zb + i * OFT_CT * K;                                                             \
                T *Gi = gH + i * K * K;                                                                        \
                OFT_DISPATCH(oft_outer_##SUF##_16(gi, zi, n, Gi), oft_outer_##SUF##_32(gi, zi, n, Gi),         \
                             oft_outer_##SUF##_64(gi, zi, n, Gi), oft_outer_##SUF##_gen(gi, zi, n, Gi, K))     \
            }                                                                                                  \
        }                                                                                                      \
    }                                                                                                          \
}                                                                                                              \
                                                                                                               \
/* gz (may be NULL; may be g; with accum added to) = Hᵀ g per block; gH (may be NULL, (nb, k, k), overwritten) = \
   sum_t g_t z_tᵀ per block, z given by zmode as in householder_bwd. Each thread sums its own rows; the partial \
   sums are added at the end. Returns 0, or 1 when the buffers could not be allocated. */                      \
int oft_bwd_##SUF(const T *g, long ldg, const T *z, long ldz, int zmode, const T *z2, long ldz2, const T *zcol, \
                  const T *H, T *gz, long ldgz, int accum, T *gH, long ntok, long nb, long K, int nthreads) {  \
    long d = nb * K, per = gH ? nb * K * K : 0, buf = OFT_CT * d * (gH ? 2 : 1);                               \
    T *all = (T *)calloc((size_t)nthreads * (size_t)(per + buf), sizeof(T));                                   \
    if (!all) {                                                                                                \
        nthreads = 1;                                                                                          \
        all = (T *)calloc((size_t)(per + buf), sizeof(T));                                                     \
        if (!all) return 1; /* out of memory: the caller raises */                                             \
    }                                                                                                          \
    _Pragma("omp parallel num_threads(nthreads)")                                                              \
    {                                                                                                          \
        int nt = omp_get_num_threads(), me = omp_get_thread_num();                                             \
        T *mine = all + (long)me * (per + buf);                                                                \
        oft_bwd_range_##SUF(g, ldg, z, ldz, zmode, z2, ldz2, zcol, H, gz, ldgz, accum, gH ? mine : NULL,       \
                            mine + per, mine + per + OFT_CT * d, ntok * me / nt, ntok * (me + 1) / nt, nb, K); \
    }                                                                                                          \
    for (long e = 0; e < per; ++e) {                                                                           \
        T s = 0;                                                                                               \
        for (int th = 0; th < nthreads; ++th) s += all[(long)th * (per + buf) + e];                            \
        gH[e] = s;                                                                                             \
    }                                                                                                          \
    free(all);                                                                                                 \
    return 0;                                                                                                  \
}

OFT_KERNELS(float, f32, vec_f32, 8)
OFT_KERNELS(double, f64, vec_f64, 4)

/* ---- OFT's exact Cayley transform ---------------------------------------------------------------------------
   H = (I + S)(I - S)^-1 = 2 (I - S)^-1 - I for nmat skew-symmetric k x k matrices S (row-major, contiguous), by
   Gauss-Jordan elimination without pivoting, which is stable here: A = I - S has symmetric part I, and so has
   every Schur complement (it gains a positive semidefinite term), so every pivot is at least 1. About 12 us per
   32 x 32 float32 matrix on a Zen core, where torch.linalg.inv_ex takes 31 (bench/oft_blocks.py). */
#define CAYLEY(T, SUF)                                                                                         \
void cayley_##SUF(const T *S, T *H, long nmat, long k, int nthreads) {                                         \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                                         \
    for (long b = 0; b < nmat; ++b) {                                                                          \
        const T *s = S + b * k * k;                                                                            \
        T *a = H + b * k * k;                                                                                  \
        for (long e = 0; e < k * k; ++e) a[e] = -s[e];                                                         \
        for (long i = 0; i < k; ++i) a[i * k + i] += 1;                                                        \
        /* Gauss-Jordan in place: a becomes A^-1 */                                                            \
        for (long p = 0; p < k; ++p) {                                                                         \
            T *restrict rp = a + p * k;                                                                        \
            const T piv = 1 / rp[p];                                                                           \
            rp[p] = 1;                                                                                         \
            _Pragma("omp simd")                                                                                \
            for (long j = 0; j < k; ++j) rp[j] *= piv;                                                         \
            for (long i = 0; i < k; ++i) {                                                                     \
                if (i == p) continue;                                                                          \
                T *restrict ri = a + i * k;                                                                    \
                const T f = ri[p];                                                                             \
                ri[p] = 0;                                                                                     \
                _Pragma("omp simd")                                                                            \
                for (long j = 0; j < k; ++j) ri[j] -= f * rp[j];                                               \
            }                                                                                                  \
        }                                                                                                      \
        for (long e = 0; e < k * k; ++e) a[e] *= 2;                                                            \
        for (long i = 0; i < k; ++i) a[i * k + i] -= 1;                                                        \
    }                                                                                                          \
}

CAYLEY(float, f32)
CAYLEY(double, f64)
"""

_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu99"]  # gnu99: lets the compiler fuse multiply-adds

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_tried = False
_switched_off = 0  # > 0 inside `disabled()`


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "lit_gpt" / "kernels"


def _cpu_fingerprint() -> str:
    """`-march=native` code may not run on another processor: the cache key includes this one's features."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([_SOURCE, cc, version, *_FLAGS, _cpu_fingerprint()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"householder_{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "householder.c"
        src.write_text(_SOURCE, encoding="utf-8")
        out = Path(tmp) / target.name
        proc = subprocess.run([cc, *_FLAGS, str(src), "-o", str(out), "-lm"], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "compiler failed")
        os.replace(out, target)  # atomic: a concurrent process either sees the whole library or none
    return target


def _load() -> Optional[ctypes.CDLL]:
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
            return None
        cc = _compiler()
        if cc is None:
            log.info("No C compiler found: the ETHER-family and OFT adapters use the eager CPU path.")
            return None
        try:
            lib = ctypes.CDLL(str(_build(cc)))
        except Exception as e:  # a failed build costs speed, never the run
            log.warning(
                f"Could not build the fused CPU kernel ({e}); the ETHER-family and OFT adapters use the eager path."
            )
            return None
        p, i64, i32 = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
        for suf in ("f32", "f64"):
            fwd = getattr(lib, f"householder_fwd_{suf}")
            fwd.argtypes = [i32, p, i64, p, p, p, p, i64, p, i64, i64, i64, i64, i32]
            bwd = getattr(lib, f"householder_bwd_{suf}")
            bwd.argtypes = [i32, p, i64, p, i64, i32, p, i64, p, p, p, p, p, p, i64, i32, p, p, i64, i64, i64, i64,
                            i32]
            bwd.restype = i32
            getattr(lib, f"oft_fwd_{suf}").argtypes = [p, i64, p, p, i64, i64, i64, i64, i32]
            obwd = getattr(lib, f"oft_bwd_{suf}")
            obwd.argtypes = [p, i64, p, i64, i32, p, i64, p, p, p, i64, i32, p, i64, i64, i64, i32]
            obwd.restype = i32
            getattr(lib, f"swiglu_fwd_{suf}").argtypes = [
                i32, p, i64, p, i64, p, p, i64, i64, p, p, i64, i64, p, i64, p, i64, p, p, i64, i64, i32]
            sbwd = getattr(lib, f"swiglu_bwd_{suf}")
            sbwd.argtypes = [i32, p, i64, p, i64, p, i64, p, i64, p, p, i64, i64, p, p, p, i64, i64, p, p, i64, p,
                             i64, p, p, i64, i64, i32]
            sbwd.restype = i32
            getattr(lib, f"cayley_{suf}").argtypes = [p, p, i64, i64, i32]
        _lib = lib
        return _lib


def available() -> bool:
    """Whether the compiled kernel can be used in this process (building it on first call)."""
    return _load() is not None


_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


@contextmanager
def disabled():
    """Run the eager path inside this block (tests and benchmarks compare the two)."""
    global _switched_off
    _switched_off += 1
    try:
        yield
    finally:
        _switched_off -= 1


def row_stride(t: torch.Tensor) -> Optional[int]:
    """How many numbers apart the rows of `t` are, when the kernel can walk it as `(rows, d)` rows of unit stride:
    contiguous tensors, and 2-D ones whose rows are spaced further apart (a column slice of a wider matrix, such as
    the value rows of a fused QKV output). None otherwise."""
    if t.is_contiguous():
        return t.shape[-1] if t.dim() else 1
    if t.dim() == 2 and t.stride(1) == 1 and t.stride(0) >= t.shape[1]:
        return t.stride(0)
    return None


def runs(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the kernel runs tensors of this dtype on this device (before any is made for it). Never while
    `torch.compile` traces: the kernel writes through `data_ptr()`, which the compiler does not see, so compiled code
    takes the eager path (same results)."""
    return (
        not _switched_off
        and dtype in _SUFFIX
        and torch.device(device).type == "cpu"
        and not torch.compiler.is_compiling()
        and available()
    )


def usable(vecs: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """The kernel takes contiguous `(J <= 4, nb, k)` vectors and float32/float64 CPU tensors of the same dtype that
    are contiguous or 2-D with rows of unit stride (`row_stride`)."""
    dt = vecs.dtype
    return (
        vecs.ndim == 3
        and vecs.shape[0] <= MAX_VECTORS
        and vecs.is_contiguous()
        and all(t.device.type == "cpu" and t.dtype == dt and row_stride(t) is not None for t in tensors)
        and runs(dt, vecs.device)
    )


def _threads(numel: int) -> int:
    return 1 if numel < PARALLEL_MIN_NUMEL else max(1, torch.get_num_threads())


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def forward(
    z: torch.Tensor,
    vecs: torch.Tensor,
    coefs: tuple[float, ...],
    out: Optional[torch.Tensor] = None,
    beta: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(out, c)`: the updated activations and the `(J, tokens, nb)` projections. `out` (default: a new contiguous
    tensor shaped like `z`) may be `z` itself: the update is then made in place. `beta` (contiguous `(J, nb)`, the
    vectors' products with a bias `b` that `z` already holds) makes it `H (z - b) + b`."""
    J, nb, k = vecs.shape
    assert J <= MAX_VECTORS and z.shape[-1] == nb * k
    ntok = z.numel() // (nb * k)
    out = torch.empty(z.shape, dtype=z.dtype) if out is None else out
    c = torch.empty(J, ntok, nb, dtype=z.dtype)
    s = torch.tensor(coefs, dtype=torch.float64)
    getattr(_lib, f"householder_fwd_{_SUFFIX[z.dtype]}")(
        int(VECTOR_CODE), _ptr(z), row_stride(z), _ptr(vecs), _ptr(s), _ptr(beta), _ptr(out), row_stride(out),
        _ptr(c), ntok, nb, k, J, _threads(z.numel()),
    )
    return out, c


class ScaledRows(NamedTuple):
    """`z = w * (x * r).to(w.dtype)` given by its parts: `x` `(T, d)` float32 rows, `r` `(T,)` float32
    contiguous, `w` `(d,)` contiguous (an RMSNorm's output from what it keeps: its float32 input, `1/rms` per row
    and its weight), `w` of the activations' dtype: float32 for this kernel, also bfloat16/float16 for the GPU's."""

    x: torch.Tensor
    r: torch.Tensor
    w: torch.Tensor


class ProductRows(NamedTuple):
    """`z = x * y` given by its factors, both `(T, d)` rows (the MLP's product `silu(a) * b`)."""

    x: torch.Tensor
    y: torch.Tensor


class OutputRows(NamedTuple):
    """A Householder transform's input given by its output `o = H (z - b) + b` (`(T, d)` rows, kept in place of `z`
    by an update made in place) and `b` (`(d,)` contiguous, or None): the backward kernel makes each block of
    `z = o - b - sum_l s_l c_l ŵ_l` from the forward's projections `c` where it reads it."""

    o: torch.Tensor
    bias: Optional[torch.Tensor]


def backward(
    g: torch.Tensor,
    z,
    vecs: torch.Tensor,
    coefs: tuple[float, ...],
    c: torch.Tensor,
    gz: Optional[torch.Tensor],
    want_vecs: bool,
    want_gram: bool = False,
    accumulate: bool = False,
    d: Optional[torch.Tensor] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """`(gz, gvecs, gram)`: the input gradient (the same update applied to `g`, written into `gz`, which may be `g`
    itself, or with `accumulate` added to what `gz` holds; None skips it), the `(J, nb, k)` vector gradient
    `s_j sum_t (c_tj g_t + d_tj z_t)` with `d_tj = ŵ_jᵀ g_t`, and the `(J, J + 1, nb)` sums
    `[sum_t d_tj c_tl for l < J, sum_t d_tj]` per block (only with `want_gram`). `z` is the transform's input as
    rows, or as the `ScaledRows` / `ProductRows` that make it (the kernel then makes each block of it where it is
    needed, bit for bit as its producer did, instead of reading a rebuilt copy) or the `OutputRows` it was
    updated into. `z` None with `d`, a contiguous `(J, tokens, nb)` tensor of `g`'s dtype, and `want_vecs`: the
    vector gradient leaves out `s_j sum_t d_tj z_t` (for a caller that takes it from what made `z`) and the
    projections `d` are written into `d`."""
    J, nb, k = vecs.shape
    if z is None:
        assert want_vecs and d is not None and d.is_contiguous() and d.dtype == g.dtype
        zmode, zx, z2, ldz2, zcol = 4, g, None, 0, None
    else:
        zmode, zx, z2, ldz2, zcol = _z_rows(z)
    ntok = zx.numel() // (nb * k)
    gv = torch.empty(J, nb, k, dtype=g.dtype) if want_vecs else None
    gram = torch.empty(J, J + 1, nb, dtype=g.dtype) if want_gram else None
    s = torch.tensor(coefs, dtype=torch.float64)
    failed = getattr(_lib, f"householder_bwd_{_SUFFIX[g.dtype]}")(
        int(VECTOR_CODE), _ptr(g), row_stride(g), _ptr(zx), row_stride(zx), zmode, _ptr(z2), ldz2, _ptr(zcol),
        _ptr(d if z is None else None), _ptr(vecs), _ptr(s), _ptr(c), _ptr(gz),
        row_stride(gz) if gz is not None else 0, int(accumulate and gz is not None), _ptr(gv), _ptr(gram), ntok,
        nb, k, J, _threads(zx.numel()),
    )
    if failed:
        raise MemoryError("The Householder adapters' CPU kernel could not allocate its partial sums.")
    return gz, gv, gram


def as_rows(t: torch.Tensor, d: int) -> torch.Tensor:
    """`t` as `(tokens, d)` rows of unit stride: a view where one exists (a column slice stays a view), else a copy."""
    t2 = t.reshape(-1, d)
    return t2 if row_stride(t2) is not None else t2.contiguous()


_workspaces = threading.local()


def workspace(shape: tuple[int, ...], dtype: torch.dtype, slot: int = 0) -> torch.Tensor:
    """A scratch CPU tensor of this shape for use inside one call: one buffer per thread, dtype and slot (a call
    that needs two at once takes two slots), grown as needed and reused by every layer and step. A layer's
    transformed input lives only between its transform and its GEMM, its output gradient's transform only until the
    GEMM's backward has read it; fresh tensors for them would cost the allocator's page faults (tens of milliseconds
    a step on a 4-layer width-1024 model)."""
    n = math.prod(shape)
    bufs = _workspaces.__dict__.setdefault("bufs", {})
    key = (dtype, slot, torch.is_inference_mode_enabled())  # an inference tensor cannot be written outside the mode
    buf = bufs.get(key)
    if buf is None or buf.numel() < n:
        buf = bufs[key] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


KERNEL_FORMS = recompute.FORMS  # the kernels make every form of `lit_gpt.recompute` themselves (`kernel_rows`)


def kernel_rows(recipe: recompute.Recipe, parts, d: int, dtype: torch.dtype):
    """A marked input's rows for the kernels' backward (this CPU kernel's and the GPU ones') from its recipe's
    inputs: `ScaledRows` / `ProductRows`, which a kernel turns into the input's values where it would read them (one
    read of the parts instead of a pass that rebuilds the input, a write and a read of it), or the rebuilt rows where
    the parts are not rows it can read. `dtype` is the input's (the activations') dtype."""
    if recipe.form == "scale":
        x, r, w = parts
        rows = ScaledRows(x.reshape(-1, d), r.reshape(-1), w)
        if (row_stride(rows.x) is not None and rows.x.dtype == rows.r.dtype == torch.float32
                and rows.r.is_contiguous() and rows.w.is_contiguous() and rows.w.dtype == dtype):
            return rows
    elif recipe.form == "mul":
        rows = ProductRows(parts[0].reshape(-1, d), parts[1].reshape(-1, d))
        if all(row_stride(t) is not None and t.dtype == dtype for t in rows):
            return rows
    return as_rows(recipe.fn(*parts), d)


def _z_rows(z) -> tuple:
    """`(zmode, x, z2, ldz2, zcol)` for the kernels' backward: `z` as rows, `ScaledRows`, `ProductRows` or
    `OutputRows` (the Householder kernel only)."""
    if isinstance(z, ScaledRows):
        return 1, z.x, z.r, 0, z.w
    if isinstance(z, ProductRows):
        return 2, z.x, z.y, row_stride(z.y), None
    if isinstance(z, OutputRows):
        return 3, z.o, None, 0, z.bias
    return 0, z, None, 0, None


def _side(vecs: Optional[torch.Tensor], coefs: Optional[tuple[float, ...]]) -> tuple:
    """A SwiGLU side's kernel arguments: its vectors, coefficients, J and nb (None, None, 0, 1 without a transform)."""
    if vecs is None:
        return None, None, 0, 1
    return vecs, torch.tensor(coefs, dtype=torch.float64), vecs.shape[0], vecs.shape[1]


def swiglu_forward(
    a: torch.Tensor,
    b: torch.Tensor,
    va: Optional[torch.Tensor],
    coefs_a: Optional[tuple[float, ...]],
    vb: Optional[torch.Tensor],
    coefs_b: Optional[tuple[float, ...]],
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The MLP's `h = silu(H_a a) * (H_b b)` for `(tokens, n)` rows `a`, `b` (fc_1's and fc_2's outputs), a row at
    a time: `a` and `b` are made `H_a a` and `H_b b` in place (`va` / `vb`: contiguous `(J, nb, k)` unit vectors
    with `nb * k = n`, or None for no transform). Returns `(s, h, ca, cb)`: `s = silu(H_a a)`, `h` (both new
    `(tokens, n)` tensors) and each side's `(J, tokens, nb)` projections (None without a transform)."""
    ntok, n = a.shape
    s, h = torch.empty(ntok, n, dtype=a.dtype), torch.empty(ntok, n, dtype=a.dtype)
    va, sa, Ja, nba = _side(va, coefs_a)
    vb, sb, Jb, nbb = _side(vb, coefs_b)
    ca = torch.empty(Ja, ntok, nba, dtype=a.dtype) if Ja else None
    cb = torch.empty(Jb, ntok, nbb, dtype=a.dtype) if Jb else None
    getattr(_lib, f"swiglu_fwd_{_SUFFIX[a.dtype]}")(
        int(VECTOR_CODE), _ptr(a), row_stride(a), _ptr(b), row_stride(b), _ptr(va), _ptr(sa), Ja, nba, _ptr(vb),
        _ptr(sb), Jb, nbb, _ptr(s), n, _ptr(h), n, _ptr(ca), _ptr(cb), ntok, n, _threads(2 * a.numel()),
    )
    return s, h, ca, cb


def swiglu_backward(
    g: torch.Tensor,
    a: torch.Tensor,
    s: torch.Tensor,
    b: torch.Tensor,
    va: Optional[torch.Tensor],
    coefs_a: Optional[tuple[float, ...]],
    ca: Optional[torch.Tensor],
    vb: Optional[torch.Tensor],
    coefs_b: Optional[tuple[float, ...]],
    cb: Optional[torch.Tensor],
    want_va: bool,
    want_vb: bool,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """`swiglu_forward`'s backward from `h`'s gradient `g`, given the transformed `a`, `b` (as `swiglu_forward`
    left them), `s` and the projections: `(ga, gb, gva, gvb)`, the gradients of fc_1's and fc_2's outputs (new
    tensors) and each side's `(J, nb, k)` vector gradient (None unless wanted)."""
    ntok, n = a.shape
    ga, gb = torch.empty(ntok, n, dtype=g.dtype), torch.empty(ntok, n, dtype=g.dtype)
    gva = torch.empty(va.shape, dtype=g.dtype) if want_va and va is not None else None
    gvb = torch.empty(vb.shape, dtype=g.dtype) if want_vb and vb is not None else None
    va, sa, Ja, nba = _side(va, coefs_a)
    vb, sb, Jb, nbb = _side(vb, coefs_b)
    failed = getattr(_lib, f"swiglu_bwd_{_SUFFIX[g.dtype]}")(
        int(VECTOR_CODE), _ptr(g), row_stride(g), _ptr(a), row_stride(a), _ptr(s), row_stride(s), _ptr(b),
        row_stride(b), _ptr(va), _ptr(sa), Ja, nba, _ptr(ca), _ptr(vb), _ptr(sb), Jb, nbb, _ptr(cb), _ptr(ga), n,
        _ptr(gb), n, _ptr(gva), _ptr(gvb), ntok, n, _threads(2 * a.numel()),
    )
    if failed:
        raise MemoryError("The SwiGLU CPU kernel could not allocate its buffers.")
    return ga, gb, gva, gvb


def oft_forward(a: torch.Tensor, blocks_t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out = H a` block by block for `(tokens, nb * k)` rows `a` (`out` distinct from `a`), given the contiguous
    `(nb, k, k)` transposed blocks `blocks_t[i] = H_iᵀ`; returns `out`."""
    nb, k, _ = blocks_t.shape
    ntok = a.numel() // (nb * k)
    getattr(_lib, f"oft_fwd_{_SUFFIX[a.dtype]}")(
        _ptr(a), row_stride(a), _ptr(blocks_t), _ptr(out), row_stride(out), ntok, nb, k, _threads(a.numel())
    )
    return out


def oft_backward(
    g: torch.Tensor, z, blocks: torch.Tensor, gz: Optional[torch.Tensor], want_blocks: bool, accumulate: bool = False
) -> Optional[torch.Tensor]:
    """OFT's backward for `out = H z`: writes `Hᵀ g` into `gz` (which may be `g` itself; with `accumulate` added to
    what it holds; None skips it) and returns the `(nb, k, k)` block gradient `sum_t g_t z_tᵀ` per block (None
    unless `want_blocks`). `blocks` are the contiguous `H_i`; `z` is rows, `ScaledRows` or `ProductRows` (as for
    `backward`)."""
    nb, k, _ = blocks.shape
    zmode, zx, z2, ldz2, zcol = _z_rows(z)
    ntok = g.numel() // (nb * k)
    gH = torch.empty(nb, k, k, dtype=g.dtype) if want_blocks else None
    failed = getattr(_lib, f"oft_bwd_{_SUFFIX[g.dtype]}")(
        _ptr(g), row_stride(g), _ptr(zx) if want_blocks else None, row_stride(zx) if want_blocks else 0, zmode,
        _ptr(z2), ldz2, _ptr(zcol), _ptr(blocks), _ptr(gz), row_stride(gz) if gz is not None else 0,
        int(accumulate and gz is not None), _ptr(gH), ntok, nb, k, _threads(g.numel()),
    )
    if failed:
        raise MemoryError("The OFT CPU kernel could not allocate its buffers.")
    return gH


def cayley(S: torch.Tensor) -> torch.Tensor:
    """`(I + S)(I - S)^-1` for a contiguous `(n, k, k)` float32/float64 batch of skew-symmetric `S` (a new tensor)."""
    n, k, _ = S.shape
    H = torch.empty_like(S)
    getattr(_lib, f"cayley_{_SUFFIX[S.dtype]}")(_ptr(S), _ptr(H), n, k, _threads(S.numel() * k))
    return H
