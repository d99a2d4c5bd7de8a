"""A fused CPU kernel for the Householder family's activation update (ETHER, ETHER+, ETHER+HH).

The update `z_i + sum_j s_j (ŵ_jiᵀ z_i) ŵ_ji` is a few multiply-adds per number, so its speed is the speed of
reading and writing the activations. Eager PyTorch spends several passes on it (a product, a short reduction over
the `k` values of each block, one update per vector, and the same again plus the vector gradient in backward); the
loops below do the dot products and the update of a block while its `k` values are in the processor's cache: one
read of `z` and one write in forward, one read of `g` and `z` and one write in backward, with the vector gradient
accumulated per thread on the way. They are plain C, compiled once per machine with the system C compiler (no
PyTorch headers, so it takes about a second), cached under `~/.cache/lit_gpt/kernels` and called through `ctypes`
on the tensors' memory. Where no compiler is found, or `LIT_GPT_CPU_KERNEL=0`, the eager path is used: same
results, slower (`lit_gpt/adapters/ether.py`).

float32 and float64 CPU tensors only, contiguous or a column slice of a wider matrix (the rows of one adapted slice
of a fused QKV output, updated where they lie); anything else takes the eager path. The update may be made in place.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
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

log = logging.getLogger(__name__)

ENV_SWITCH = "LIT_GPT_CPU_KERNEL"
MAX_VECTORS = 4  # ETHER uses 1 vector per block, ETHER+ 2

# Below this many numbers a call runs on one thread: starting the team costs more than it saves.
PARALLEL_MIN_NUMEL = 1 << 15

_SOURCE = r"""
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

/* Activations are (ntok, nb, k) row-major; vectors v are (J, nb, k); s holds the J coefficients.
   c (forward output, backward input) is (J, ntok, nb). The block loops are inlined with the common block sizes as
   compile-time constants (the compiler then unrolls them completely: no loop overhead per block, which is most of
   the cost when a block holds 32 numbers), and with one and two vectors (ETHER, ETHER+) as cases of their own. */

#define KERNELS(T, SUF)                                                                                        \
/* dots[j] = <a, v_j> for one block */                                                                         \
INLINE void dots_##SUF(const T *restrict a, const T *restrict v, long vstride, long k, long J, T *dots) {       \
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
/* o = a + sum_j w[j] v_j for one block; o may be a (the update in place), so neither is restrict */                                                                     \
INLINE void update_##SUF(const T *a, const T *restrict v, long vstride, long k, long J, const T *w,            \
                         T *o) {                                                                               \
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
/* o += a + sum_j w[j] v_j for one block (a and o distinct) */                                                   \
INLINE void update_acc_##SUF(const T *restrict a, const T *restrict v, long vstride, long k, long J,            \
                             const T *w, T *restrict o) {                                                      \
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
INLINE void fwd_rows_##SUF(const T *z, long ldz, const T *v, const double *s, const T *beta, T *out, long ldo,  \
                           T *c, long lo, long hi, long ntok, long nb, long k, long J) {                       \
    long d = nb * k;                                                                                           \
    T sc[MAXJ];                                                                                                \
    for (long j = 0; j < J; ++j) sc[j] = (T)s[j];                                                              \
    for (long t = lo; t < hi; ++t) {                                                                           \
        for (long i = 0; i < nb; ++i) {                                                                        \
            const T *zp = z + t * ldz + i * k;                                                                 \
            T dd[MAXJ], w[MAXJ];                                                                               \
            dots_##SUF(zp, v + i * k, d, k, J, dd);                                                            \
            if (beta)                                                                                          \
                for (long j = 0; j < J; ++j) dd[j] -= beta[j * nb + i];                                        \
            for (long j = 0; j < J; ++j) {                                                                     \
                c[(j * ntok + t) * nb + i] = dd[j];                                                            \
                w[j] = sc[j] * dd[j];                                                                          \
            }                                                                                                  \
            update_##SUF(zp, v + i * k, d, k, J, w, out + t * ldo + i * k);                                    \
        }                                                                                                      \
    }                                                                                                          \
}                                                                                                              \
                                                                                                               \
/* gram (may be NULL), per block i: gram[(j * (J + 1) + l) * nb + i] += sum_t d_tj c_tl for l < J, and          \
   gram[(j * (J + 1) + J) * nb + i] += sum_t d_tj: what turns a vector gradient taken with the output in place  \
   of z into the one taken with z (see householder_bwd). */                                                    \
/* ap += cj g + dj z over one block: one expression for every way z is given, so the compiler fuses the same    \
   multiply-adds and the sums come out bit for bit alike */                                                    \
INLINE void acc_block_##SUF(T *restrict ap, T cj, const T *gp, T dj, const T *restrict zq, long k) {            \
    _Pragma("omp simd")                                                                                        \
    for (long q = 0; q < k; ++q) ap[q] += cj * gp[q] + dj * zq[q];                                             \
}                                                                                                              \
                                                                                                               \
INLINE void bwd_rows_##SUF(const T *g, long ldg, const T *z, long ldz, int zmode, const T *z2, long ldz2,      \
                           const T *zcol, const T *v, const double *s, const T *c, T *gz, long ldgz, int accum, \
                           T *acc, T *gram, long lo, long hi, long ntok, long nb, long k, long J) {            \
    long d = nb * k;                                                                                           \
    T sc[MAXJ];                                                                                                \
    for (long j = 0; j < J; ++j) sc[j] = (T)s[j];                                                              \
    for (long t = lo; t < hi; ++t) {                                                                           \
        for (long i = 0; i < nb; ++i) {                                                                        \
            /* not restrict: gz may be g (the update in place), so it is written last, after every read of g */ \
            const T *gp = g + t * ldg + i * k;                                                                 \
            const T *restrict zp = z + t * ldz + i * k;                                                        \
            T dd[MAXJ], w[MAXJ];                                                                               \
            dots_##SUF(gp, v + i * k, d, k, J, dd);                                                            \
            if (acc) {                                                                                         \
                /* z's block: read (zmode 0), or made as its producer made it (see householder_bwd) */        \
                T zb[zmode ? k : 1];                                                                           \
                const T *zq = zp;                                                                              \
                if (zmode == 1) {                                                                              \
                    T r = z2[t];                                                                               \
                    const T *restrict wc = zcol + i * k;                                                       \
                    _Pragma("omp simd")                                                                        \
                    for (long q = 0; q < k; ++q) zb[q] = wc[q] * (zp[q] * r);                                  \
                    zq = zb;                                                                                   \
                } else if (zmode == 2) {                                                                       \
                    const T *restrict bp = z2 + t * ldz2 + i * k;                                              \
                    _Pragma("omp simd")                                                                        \
                    for (long q = 0; q < k; ++q) zb[q] = zp[q] * bp[q];                                        \
                    zq = zb;                                                                                   \
                }                                                                                              \
                for (long j = 0; j < J; ++j) {                                                                 \
                    T *restrict ap = acc + j * d + i * k;                                                      \
                    T cj = c[(j * ntok + t) * nb + i], dj = dd[j];                                             \
                    acc_block_##SUF(ap, cj, gp, dj, zq, k);                                                    \
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
                if (accum) update_acc_##SUF(gp, v + i * k, d, k, J, w, gz + t * ldgz + i * k);                 \
                else update_##SUF(gp, v + i * k, d, k, J, w, gz + t * ldgz + i * k);                           \
            }                                                                                                  \
        }                                                                                                      \
    }                                                                                                          \
}                                                                                                              \
                                                                                                               \
/* the same rows with k (and J) fixed at compile time where they are common */                                 \
static void fwd_range_##SUF(const T *z, long ldz, const T *v, const double *s, const T *beta, T *out, long ldo, \
                            T *c, long lo, long hi, long ntok, long nb, long k, long J) {                      \
    DISPATCH(fwd_rows_##SUF, z, ldz, v, s, beta, out, ldo, c, lo, hi, ntok, nb)                                \
}                                                                                                              \
static void bwd_range_##SUF(const T *g, long ldg, const T *z, long ldz, int zmode, const T *z2, long ldz2,     \
                            const T *zcol, const T *v, const double *s, const T *c, T *gz, long ldgz, int accum, \
                            T *acc, T *gram, long lo, long hi, long ntok, long nb, long k, long J) {           \
    DISPATCH(bwd_rows_##SUF, g, ldg, z, ldz, zmode, z2, ldz2, zcol, v, s, c, gz, ldgz, accum, acc, gram, lo, hi, \
             ntok, nb)                                                                                         \
}                                                                                                              \
                                                                                                               \
/* Rows of z / out / g / gz are ld* numbers apart (a column slice of a wider matrix); out may be z. beta (may be \
   NULL, (J, nb)) is subtracted from every dot product: with beta_ji = <b_i, v_ji> the update is then           \
   H (z - b) + b for a bias b already added to z. */                                                           \
void householder_fwd_##SUF(const T *z, long ldz, const T *v, const double *s, const T *beta, T *out, long ldo, \
                           T *c, long ntok, long nb, long k, long J, int nthreads) {                           \
    _Pragma("omp parallel num_threads(nthreads)")                                                              \
    {                                                                                                          \
        int nt = omp_get_num_threads(), me = omp_get_thread_num();                                             \
        fwd_range_##SUF(z, ldz, v, s, beta, out, ldo, c, ntok * me / nt, ntok * (me + 1) / nt, ntok, nb, k, J); \
    }                                                                                                          \
}                                                                                                              \
                                                                                                               \
/* z is given by zmode: 0, its rows (ldz apart); 1, z_t = zcol * (x_t * z2[t]) with x's rows at z (an RMSNorm's \
   output from the float32 input it keeps, its 1/rms per row z2 and its weight zcol); 2, z_t = x_t * y_t with x's \
   rows at z and y's at z2 (ldz2 apart; the MLP's product silu(a) * b). Made here in the multiplications their   \
   producers do, so the vector gradient is bit for bit the one taken with z itself, without a pass to rebuild z.  \
   gz (may be NULL; may be g) = the same update applied to g, or with accum gz += it; gv (may be NULL, (J, nb, k), overwritten) =               \
   s_j sum_t (c_tj g_t + d_tj z_t) per block, with d_tj = <g_t, v_j>; gram (may be NULL, (J, J + 1, nb),      \
   overwritten) as in bwd_rows. Each thread sums its own rows; the partial sums are added at the end. Returns    \
   0, or 1 when the few KiB of partial sums could not be allocated. */                                         \
int householder_bwd_##SUF(const T *g, long ldg, const T *z, long ldz, int zmode, const T *z2, long ldz2,       \
                          const T *zcol, const T *v, const double *s, const T *c, T *gz, long ldgz, int accum,  \
                          T *gv, T *gram, long ntok, long nb, long k, long J, int nthreads) {                  \
    long nv = gv ? J * nb * k : 0, ng = gram ? J * (J + 1) * nb : 0, per = nv + ng;                            \
    T *acc_all = NULL;                                                                                         \
    if (per) {                                                                                                 \
        acc_all = (T *)calloc((size_t)nthreads * (size_t)per, sizeof(T));                                      \
        if (!acc_all) {                                                                                        \
            nthreads = 1;                                                                                      \
            acc_all = (T *)calloc((size_t)per, sizeof(T));                                                     \
            if (!acc_all) return 1; /* out of memory: the caller raises */                                    \
        }                                                                                                      \
    }                                                                                                          \
    _Pragma("omp parallel num_threads(nthreads)")                                                              \
    {                                                                                                          \
        int nt = omp_get_num_threads(), me = omp_get_thread_num();                                             \
        T *mine = per ? acc_all + (long)me * per : NULL;                                                       \
        bwd_range_##SUF(g, ldg, z, ldz, zmode, z2, ldz2, zcol, v, s, c, gz, ldgz, accum, gv ? mine : NULL,       \
                        gram ? mine + nv : NULL, ntok * me / nt, ntok * (me + 1) / nt, ntok, nb, k, J);        \
    }                                                                                                          \
    long d = nb * k;                                                                                           \
    for (long e = 0; e < per; ++e) {                                                                           \
        T a = 0;                                                                                               \
        for (int th = 0; th < nthreads; ++th) a += acc_all[(long)th * per + e];                                \
        if (e < nv) gv[e] = (T)s[e / d] * a;                                                                   \
        else gram[e - nv] = a;                                                                                 \
    }                                                                                                          \
    free(acc_all);                                                                                             \
    return 0;                                                                                                  \
}

KERNELS(float, f32)
KERNELS(double, f64)
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
        proc = subprocess.run([cc, *_FLAGS, str(src), "-o", str(out)], capture_output=True, text=True, timeout=300)
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
            log.info("No C compiler found: the Householder adapters use the eager CPU path.")
            return None
        try:
            lib = ctypes.CDLL(str(_build(cc)))
        except Exception as e:  # a failed build costs speed, never the run
            log.warning(f"Could not build the fused CPU kernel ({e}); the Householder adapters use the eager path.")
            return None
        p, i64, i32 = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
        for suf in ("f32", "f64"):
            getattr(lib, f"householder_fwd_{suf}").argtypes = [p, i64, p, p, p, p, i64, p, i64, i64, i64, i64, i32]
            bwd = getattr(lib, f"householder_bwd_{suf}")
            bwd.argtypes = [p, i64, p, i64, i32, p, i64, p, p, p, p, p, i64, i32, p, p, i64, i64, i64, i64, i32]
            bwd.restype = i32
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
    """Whether the kernel runs tensors of this dtype on this device (before any is made for it)."""
    return not _switched_off and dtype in _SUFFIX and torch.device(device).type == "cpu" and available()


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
        _ptr(z), row_stride(z), _ptr(vecs), _ptr(s), _ptr(beta), _ptr(out), row_stride(out), _ptr(c), ntok, nb, k, J,
        _threads(z.numel()),
    )
    return out, c


class ScaledRows(NamedTuple):
    """`z = w * (x * r)` given by its parts: `x` `(T, d)` rows, `r` `(T,)` contiguous, `w` `(d,)` contiguous (an
    RMSNorm's output from what it keeps: its float32 input, `1/rms` per row and its weight)."""

    x: torch.Tensor
    r: torch.Tensor
    w: torch.Tensor


class ProductRows(NamedTuple):
    """`z = x * y` given by its factors, both `(T, d)` rows (the MLP's product `silu(a) * b`)."""

    x: torch.Tensor
    y: torch.Tensor


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
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """`(gz, gvecs, gram)`: the input gradient (the same update applied to `g`, written into `gz`, which may be `g`
    itself, or with `accumulate` added to what `gz` holds; None skips it), the `(J, nb, k)` vector gradient
    `s_j sum_t (c_tj g_t + d_tj z_t)` with `d_tj = ŵ_jᵀ g_t`, and the `(J, J + 1, nb)` sums
    `[sum_t d_tj c_tl for l < J, sum_t d_tj]` per block (only with `want_gram`). `z` is the transform's input as
    rows, or as the `ScaledRows` / `ProductRows` that make it: the kernel then makes each block of it where it is
    needed, bit for bit as its producer did, instead of reading a rebuilt copy."""
    J, nb, k = vecs.shape
    if isinstance(z, ScaledRows):
        zmode, zx, z2, ldz2, zcol = 1, z.x, z.r, 0, z.w
    elif isinstance(z, ProductRows):
        zmode, zx, z2, ldz2, zcol = 2, z.x, z.y, row_stride(z.y), None
    else:
        zmode, zx, z2, ldz2, zcol = 0, z, None, 0, None
    ntok = zx.numel() // (nb * k)
    gv = torch.empty(J, nb, k, dtype=g.dtype) if want_vecs else None
    gram = torch.empty(J, J + 1, nb, dtype=g.dtype) if want_gram else None
    s = torch.tensor(coefs, dtype=torch.float64)
    failed = getattr(_lib, f"householder_bwd_{_SUFFIX[g.dtype]}")(
        _ptr(g), row_stride(g), _ptr(zx), row_stride(zx), zmode, _ptr(z2), ldz2, _ptr(zcol), _ptr(vecs), _ptr(s),
        _ptr(c), _ptr(gz), row_stride(gz) if gz is not None else 0, int(accumulate and gz is not None), _ptr(gv),
        _ptr(gram), ntok, nb, k, J, _threads(zx.numel()),
    )
    if failed:
        raise MemoryError("The Householder adapters' CPU kernel could not allocate its partial sums.")
    return gz, gv, gram
