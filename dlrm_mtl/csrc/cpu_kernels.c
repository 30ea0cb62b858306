/* dlrm_mtl._cpu_kernels: fused host kernels for per-step work on small tensors.
 *
 * On a CPU, a training step spends much of its time outside the GEMMs in dozens of ATen
 * operators on [B, T]-sized tensors (B = batch, T = tasks), each of which costs a dispatch
 * (5-20 us here) for a few microseconds of arithmetic, and in fbgemm's CPU lookup. The
 * functions here do such a chain in one pass: the loss terms, the one-table embedding lookup
 * with its exact row-wise Adagrad update, the id shift, a batch's KJT cut, the scenario
 * embeddings' rows and their gradient, the mixture layers' gated sums over their experts. They take raw
 * pointers and sizes (Python ints, from Tensor.data_ptr() or numpy), work on host memory of
 * the layouts their comments give (float32 values, int64/int32 ids and offsets), and release
 * the GIL while they compute. dlrm_mtl/native.py wraps them and says when they apply; every
 * caller keeps its ATen/fbgemm path (GPU, float64, builds without this module), and tests
 * compare the two.
 *
 * Built by setup.py (setuptools) at install time; plain C99, no Torch headers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* ---------------------------------------------------------------------------------------
 * Threads. Built with OpenMP (setup.py tries -fopenmp first), the embedding lookup and its
 * update run on the calling thread's OpenMP team: the very libgomp worker threads PyTorch's
 * own intra-op loops use (torch loads libgomp.so.1 before this module, so the loader hands
 * this module the same runtime), sized by torch.set_num_threads (omp_get_max_threads of the
 * calling thread). Work is split so every thread computes the same float operations in the
 * same order as one thread would: rows of the output (pooled_sum) or groups of features
 * that share no table row (rowwise_adagrad_update: each row summed and updated by one
 * thread); the results are bit for bit the serial ones. Below PAR_MIN
 * floats of work, or built without OpenMP, they run on the calling thread alone.
 */
#define PAR_MIN 32768
static int one_thread = 0; /* set_one_thread(1): dlrm_mtl/native.py found a second OpenMP runtime */
static int team_size(Py_ssize_t work) {
#ifdef _OPENMP
    if (work >= PAR_MIN && !one_thread && !omp_in_parallel()) {
        const int t = omp_get_max_threads();
        return t > 1 ? t : 1;
    }
#else
    (void)work;
#endif
    return 1;
}

/* ---------------------------------------------------------------------------------------
 * term_means_forward / term_means_backward: dlrm_mtl.losses.TermMeans, fused.
 *
 * Per row b and term k (K terms on T task logits z [B, T]):
 *   logit term (src task i):  l = BCE-with-logits(z_i, y) = max(z,0) - z y + log1p(e^{-|z|})
 *                             d = sigma(z_i) - y
 *   entire term:              lp = sum_t logsig(z_t) A[t,k] (+ sum_t logsig(-z_t) A[T+t,k])
 *                             lpc = min(lp, -1e-30);  em = expm1(lpc)  (= P - 1)
 *                             l = -(y lpc + (1 - y) log(-em))
 *                             d = ratio (1 - y) - y,  ratio = P / (1 - P) = (em + 1) / -em
 *                                 (0 where lp > -1e-30: the clamp's gradient)
 *   weight c_bk = r_bk lam_b / max(sum_b r_bk, 1e-12);  per_k = sum_b c_bk l_bk;  D_bk = c_bk d
 * Saved for the backward: D [B, K], sigma(z) and sigma(-z) [B, T].
 * Backward with the incoming gradient g [K] and M = grad_map [K, 3T] = [S | P+ | P-]:
 *   dz_bt = sum_k g_k D_bk (S_kt + P+_kt sigma(-z_bt) - P-_kt sigma(z_bt)).
 * Sums over rows accumulate in double.
 */

#define MAX_DIM 1024 /* the widest embedding whose bags the lookup kernels may average */

/* an address: a Python int (Tensor.data_ptr()), or an object with the buffer protocol (a numpy
 * array: its first element's address, which stays valid while the caller holds the array;
 * ~0.2 us where numpy's __array_interface__ costs 2-3 us) */
static int get_ptr(PyObject *o, void **out) {
    if (!PyLong_Check(o)) {
        Py_buffer view;
        if (PyObject_GetBuffer(o, &view, PyBUF_RECORDS_RO) != 0) return -1;
        *out = view.buf;
        PyBuffer_Release(&view);
        return 0;
    }
    *out = PyLong_AsVoidPtr(o);
    return (*out == NULL && PyErr_Occurred()) ? -1 : 0;
}

static int get_size(PyObject *o, Py_ssize_t *out) {
    *out = PyLong_AsSsize_t(o);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

/* ---------------------------------------------------------------------------------------
 * Vectorisable float math for the loss terms' element-wise passes. glibc's expf, log1pf,
 * expm1f and logf are scalar calls (~18 ns each here: 2,048 rows x 6 calls were ~220 us of a
 * MovieLens step); these are branch-free polynomials the compiler turns into SIMD loops
 * (AVX-512 / AVX2 clones where the CPU has them, chosen at load time; the same arithmetic in
 * every clone: no FMA contraction, so every machine computes the same bits). Relative error
 * within ~2 ulp of the correctly rounded result (tests/test_native.py compares them with
 * float64 over their whole ranges).
 */
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SIMD_CLONES
#endif

static inline float f_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* e^x for x <= 0 (0 below -87: e^-87 = 1.6e-38, the smallest normal float's range). Cephes'
 * expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial in r, scaled by 2^n. */
static inline float exp_nonpos(float x) {
    const float xc = x < -87.0f ? -87.0f : x;
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    const float t = xc * 1.44269504088896341f + magic;
    const float n = t - magic;
    const int32_t ni = (int32_t)(bits_of(t) - bits_of(magic)); /* n, as an integer */
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    const float z = r * r;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * z + r + 1.0f;
    const float scale = f_from_bits((uint32_t)(ni + 127) << 23);
    return x < -87.0f ? 0.0f : p * scale;
}

/* log(m) + k ln2 for m in [sqrt(1/2), sqrt(2)): Cephes' logf polynomial in f = m - 1. */
static inline float log_reduced(float m, float k) {
    const float f = m - 1.0f;
    const float z = f * f;
    float y = 7.0376836292e-2f;
    y = y * f - 1.1514610310e-1f;
    y = y * f + 1.1676998740e-1f;
    y = y * f - 1.2420140846e-1f;
    y = y * f + 1.4249322787e-1f;
    y = y * f - 1.6668057665e-1f;
    y = y * f + 2.0000714765e-1f;
    y = y * f - 2.4999993993e-1f;
    y = y * f + 3.3333331174e-1f;
    y = y * f * z;
    y = y + k * -2.12194440e-4f;
    y = y - 0.5f * z;
    return (f + y) + k * 0.693359375f;
}

/* log(x) for a normal x > 0. */
static inline float log_pos(float x) {
    const uint32_t u = bits_of(x);
    float k = (float)((int32_t)(u >> 23) - 126);
    float m = f_from_bits((u & 0x007fffffu) | 0x3f000000u); /* [1/2, 1) */
    const int low = m < 0.70710678118654752f;
    m = low ? m + m : m;
    k = low ? k - 1.0f : k;
    return log_reduced(m, k);
}

/* log(1 + e) for e in [0, 1]: log of u = 1 + e, corrected by the rounding of the sum. */
static inline float log1p_unit(float e) {
    const float u = 1.0f + e;
    const float c = (e - (u - 1.0f)) / u;
    const int high = u > 1.41421356237309505f;
    return log_reduced(high ? u * 0.5f : u, high ? 1.0f : 0.0f) + c;
}

/* e^x - 1 for x <= 0: Taylor to x^7 near 0 (|x| < ln2 / 2), e^x - 1 beyond. */
static inline float expm1_nonpos(float x) {
    float p = 1.0f / 5040.0f;
    p = p * x + 1.0f / 720.0f;
    p = p * x + 1.0f / 120.0f;
    p = p * x + 1.0f / 24.0f;
    p = p * x + 1.0f / 6.0f;
    p = p * x + 0.5f;
    const float near = x + (x * x) * p;
    const float far = exp_nonpos(x) - 1.0f;
    return x > -0.34657359027997264f ? near : far;
}

/* The loss terms' per-logit pass over n = B T contiguous logits z: l1p = log1p(e^{-|z|}),
 * log sigma(z) and log sigma(-z), sigma(z) and sigma(-z). */
SIMD_CLONES
static void logit_pass(const float *restrict z, Py_ssize_t n, float *restrict l1p, float *restrict lsp,
                       float *restrict lsn, float *restrict sp, float *restrict sn) {
    for (Py_ssize_t i = 0; i < n; i++) {
        const float v = z[i];
        const float e = exp_nonpos(-fabsf(v));
        const float l = log1p_unit(e);
        const float s1 = 1.0f / (1.0f + e); /* sigma(|z|) */
        const float s0 = e * s1;            /* sigma(-|z|) */
        l1p[i] = l;
        lsp[i] = (v < 0.0f ? v : 0.0f) - l;
        lsn[i] = (v > 0.0f ? -v : 0.0f) - l;
        sp[i] = v >= 0.0f ? s1 : s0;
        sn[i] = v >= 0.0f ? s0 : s1;
    }
}

/* An entire-space term's per-row pass over its log-probabilities lp [n]: lpc = min(lp,
 * -1e-30), em = e^lpc - 1 (= P - 1), lg = log(-em) = log(1 - P). */
SIMD_CLONES
static void entire_pass(const float *restrict lp, Py_ssize_t n, float *restrict lpc, float *restrict em,
                        float *restrict lg) {
    for (Py_ssize_t i = 0; i < n; i++) {
        const float c = lp[i] < -1e-30f ? lp[i] : -1e-30f;
        const float m = expm1_nonpos(c);
        lpc[i] = c;
        em[i] = m;
        lg[i] = log_pos(-m);
    }
}

/* A term's per-row weighted loss cl = c l and derivative D = d c (c = r lam inv; y, r and D
 * with row stride K, lam [B] or NULL): an entire-space term from its lp, lpc, e^lpc - 1 and
 * log(1 - P) ... */
SIMD_CLONES
static void entire_terms(const float *restrict y, const float *restrict r, const float *restrict lam, Py_ssize_t K,
                         Py_ssize_t B, float inv, const float *restrict lpv, const float *restrict lpc,
                         const float *restrict emv, const float *restrict lgv, float *restrict cl, float *restrict D) {
    for (Py_ssize_t b = 0; b < B; b++) {
        const float yk = y[b * K];
        const float c = r[b * K] * (lam ? lam[b] : 1.0f) * inv;
        const float em = emv[b];
        const float loss = -(yk * lpc[b] + (1.0f - yk) * lgv[b]);
        const float ratio = lpv[b] > -1e-30f ? 0.0f : (em + 1.0f) / -em;
        const float d = ratio * (1.0f - yk) - yk;
        cl[b] = c * loss;
        D[b * K] = d * c;
    }
}

/* ... and a logit term from its source task's logit v, log1p(e^-|v|) and sigma(v) (row stride T) */
SIMD_CLONES
static void logit_terms(const float *restrict y, const float *restrict r, const float *restrict lam, Py_ssize_t K,
                        Py_ssize_t B, float inv, const float *restrict zc, const float *restrict l1p,
                        const float *restrict sp, Py_ssize_t T, float *restrict cl, float *restrict D) {
    for (Py_ssize_t b = 0; b < B; b++) {
        const float yk = y[b * K];
        const float c = r[b * K] * (lam ? lam[b] : 1.0f) * inv;
        const float v = zc[b * T];
        const float loss = (v > 0.0f ? v : 0.0f) - v * yk + l1p[b * T];
        const float d = sp[b * T] - yk;
        cl[b] = c * loss;
        D[b * K] = d * c;
    }
}

/* term_means_forward(z, y, r, lam, B, T, K, src, is_entire, log_prob, negated,
 *                    per, D, sig_pos, sig_neg, colsum, z_stride0, z_stride1) -> None
 * z [B,T] (element strides z_stride0, z_stride1: a transposed view too), y [B,K], r [B,K]
 * contiguous, lam [B] or 0, src int64 [K], is_entire uint8 [K],
 * log_prob [(negated ? 2T : T), K]; outputs per [K], D [B,K], sig_pos, sig_neg [B,T];
 * colsum: double scratch [K]. */
static PyObject *term_means_forward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 18) {
        PyErr_SetString(PyExc_TypeError, "term_means_forward takes 18 arguments");
        return NULL;
    }
    void *p[16];
    Py_ssize_t B, T, K, negated, zs0, zs1;
    for (int i = 0; i < 4; i++)
        if (get_ptr(args[i], &p[i])) return NULL;
    if (get_size(args[4], &B) || get_size(args[5], &T) || get_size(args[6], &K)) return NULL;
    for (int i = 7; i < 10; i++)
        if (get_ptr(args[i], &p[i])) return NULL;
    if (get_size(args[10], &negated)) return NULL;
    for (int i = 11; i < 16; i++)
        if (get_ptr(args[i], &p[i])) return NULL;
    if (get_size(args[16], &zs0) || get_size(args[17], &zs1)) return NULL;
    const float *z = p[0], *y = p[1], *r = p[2], *lam = p[3];
    const int64_t *src = p[7];
    const uint8_t *is_entire = p[8];
    const float *log_prob = p[9];
    float *per = p[11], *D = p[12], *sp = p[13], *sn = p[14];
    double *colsum = p[15];
    if (T > 64 || K > 64) {
        PyErr_SetString(PyExc_ValueError, "term_means_forward: at most 64 tasks and terms");
        return NULL;
    }
    /* scratch: the logits (contiguous), their l1p, log sigma(z), log sigma(-z) [B T]; an
     * entire term's lp, lpc, e^lpc - 1, log(1 - P) [B]; a term's weighted losses c l [B] */
    float *scratch = malloc(sizeof(float) * (size_t)(4 * B * T + 5 * B + 1));
    if (!scratch) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    float *zc = scratch, *l1p = zc + B * T, *lsp = l1p + B * T, *lsn = lsp + B * T;
    float *lpv = lsn + B * T, *lpc = lpv + B, *emv = lpc + B, *lgv = emv + B, *cl = lgv + B;
    /* Row sums in double, each with one accumulator in row order (a register chain: colsum
     * is written once); the per-row float math in loops of their own, which vectorise. */
    for (Py_ssize_t k = 0; k < K; k++) {
        double sum = 0.0;
        for (Py_ssize_t b = 0; b < B; b++) sum += r[b * K + k];
        colsum[k] = sum;
    }
    float inv[64];
    for (Py_ssize_t k = 0; k < K; k++) inv[k] = (float)(1.0 / (colsum[k] > 1e-12 ? colsum[k] : 1e-12));
    if (zs1 == 1 && zs0 == T)
        memcpy(zc, z, sizeof(float) * (size_t)(B * T));
    else
        for (Py_ssize_t b = 0; b < B; b++)
            for (Py_ssize_t t = 0; t < T; t++) zc[b * T + t] = z[b * zs0 + t * zs1];
    logit_pass(zc, B * T, l1p, lsp, lsn, sp, sn);
    for (Py_ssize_t k = 0; k < K; k++) {
        if (is_entire[k]) { /* lp = sum_t logsig(z_t) A[t,k] (+ sum_t logsig(-z_t) A[T+t,k]), row by row */
            for (Py_ssize_t b = 0; b < B; b++) {
                const float *lspb = lsp + b * T, *lsnb = lsn + b * T;
                float lp = 0.0f;
                for (Py_ssize_t t = 0; t < T; t++) lp += lspb[t] * log_prob[t * K + k];
                if (negated)
                    for (Py_ssize_t t = 0; t < T; t++) lp += lsnb[t] * log_prob[(T + t) * K + k];
                lpv[b] = lp;
            }
            entire_pass(lpv, B, lpc, emv, lgv);
            entire_terms(y + k, r + k, lam, K, B, inv[k], lpv, lpc, emv, lgv, cl, D + k);
        } else {
            logit_terms(y + k, r + k, lam, K, B, inv[k], zc + src[k], l1p + src[k], sp + src[k], T, cl, D + k);
        }
        double sum = 0.0;
        for (Py_ssize_t b = 0; b < B; b++) sum += (double)cl[b];
        per[k] = (float)sum;
    }
    Py_END_ALLOW_THREADS
    free(scratch);
    Py_RETURN_NONE;
}

/* dz[:, t] = sum_k g_k D[:, k] (S_kt + P+_kt sigma(-z_t) - P-_kt sigma(z_t)): the three sums
 * over k in k's order per row (acc: 3 B floats of scratch), then combined */
SIMD_CLONES
static void term_grad_column(const float *restrict D, const float *restrict g, const float *restrict M,
                             const float *restrict sp, const float *restrict sn, Py_ssize_t B, Py_ssize_t T,
                             Py_ssize_t K, Py_ssize_t t, float *restrict acc, float *restrict out) {
    float *restrict s = acc, *restrict pp = acc + B, *restrict pn = acc + 2 * B;
    for (Py_ssize_t b = 0; b < B; b++) s[b] = pp[b] = pn[b] = 0.0f;
    for (Py_ssize_t k = 0; k < K; k++) {
        const float gk = g[k], ms = M[k * 3 * T + t], mp = M[k * 3 * T + T + t], mn = M[k * 3 * T + 2 * T + t];
        for (Py_ssize_t b = 0; b < B; b++) {
            const float w = D[b * K + k] * gk;
            s[b] += w * ms;
            pp[b] += w * mp;
            pn[b] += w * mn;
        }
    }
    for (Py_ssize_t b = 0; b < B; b++) out[b * T + t] = s[b] + pp[b] * sn[b * T + t] - pn[b] * sp[b * T + t];
}

/* term_means_backward(D, g, grad_map, sig_pos, sig_neg, B, T, K, out) -> None
 * D [B,K], g [K], grad_map [K, 3T], sig_pos, sig_neg [B,T]; out dz [B,T]. */
static PyObject *term_means_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "term_means_backward takes 9 arguments");
        return NULL;
    }
    void *p[9];
    Py_ssize_t B, T, K;
    for (int i = 0; i < 5; i++)
        if (get_ptr(args[i], &p[i])) return NULL;
    if (get_size(args[5], &B) || get_size(args[6], &T) || get_size(args[7], &K) || get_ptr(args[8], &p[8]))
        return NULL;
    const float *D = p[0], *g = p[1], *M = p[2], *sp = p[3], *sn = p[4];
    float *out = p[8];
    if (T > 64 || K > 64) {
        PyErr_SetString(PyExc_ValueError, "term_means_backward: at most 64 tasks and terms");
        return NULL;
    }
    float *acc = malloc(sizeof(float) * (size_t)(3 * B + 1)); /* s, p+, p- of one task column [B] each */
    if (!acc) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t t = 0; t < T; t++) /* column by column, the sums over k in k's order, vectorised over rows */
        term_grad_column(D, g, M, sp, sn, B, T, K, t, acc, out);
    Py_END_ALLOW_THREADS
    free(acc);
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------
 * shift_ids: the ids of F features' bags shifted by their table's first row in one table
 * (dlrm_mtl.models.recorded_lookup.RecordedLookup._shifted): feature f's ids are
 * indices[offsets[f B] : offsets[(f+1) B]].
 * shift_ids(indices, out, offsets, row_start, F, B, offsets_int32, N) -> None
 * row_start int64 [F]; indices/out [N] int64, offsets int64 or int32;
 * offsets that are not non-decreasing within [0, N], ending at N, raise ValueError (nothing written).
 */
static PyObject *shift_ids(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "shift_ids takes 8 arguments");
        return NULL;
    }
    void *p[4];
    Py_ssize_t F, B, off32, N;
    for (int i = 0; i < 4; i++)
        if (get_ptr(args[i], &p[i])) return NULL;
    if (get_size(args[4], &F) || get_size(args[5], &B) || get_size(args[6], &off32) || get_size(args[7], &N))
        return NULL;
    const int64_t *row_start = p[3];
    for (Py_ssize_t f = 0; f <= F; f++) {
        const int64_t o = off32 ? ((const int32_t *)p[2])[f * B] : ((const int64_t *)p[2])[f * B];
        const int64_t prev = f == 0 ? 0 : (off32 ? ((const int32_t *)p[2])[(f - 1) * B] : ((const int64_t *)p[2])[(f - 1) * B]);
        if (o < prev || o > N || (f == F && o != N)) {
            PyErr_Format(PyExc_ValueError, "shift_ids: offset %lld of feature %zd is outside [%lld, %zd] "
                         "(the last one must be the number of ids)", (long long)o, f, (long long)prev, N);
            return NULL;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t f = 0; f < F; f++) {
        const int64_t a = off32 ? ((const int32_t *)p[2])[f * B] : ((const int64_t *)p[2])[f * B];
        const int64_t z = off32 ? ((const int32_t *)p[2])[(f + 1) * B] : ((const int64_t *)p[2])[(f + 1) * B];
        const int64_t s = row_start[f];
        const int64_t *in = (const int64_t *)p[0] + a;
        int64_t *out = (int64_t *)p[1] + a;
        for (int64_t n = 0; n < z - a; n++) out[n] = in[n] + s;
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------
 * pooled_sum / rowwise_adagrad_update: a one-table embedding lookup (R rows of dim D; F
 * features' bags of B rows, ids feature after feature with offsets [F B + 1], the layout of
 * dlrm_mtl.models.recorded_lookup.RecordedLookup's one-table call) and its backward with
 * fbgemm's exact row-wise Adagrad, as fbgemm_gpu 1.8's CPU kernels compute them for a table
 * read by several features:
 *   forward   out[b, f D + d] = sum over the bag's ids, in order, of w[id, d] (float);
 *   backward  each touched row's gradient g = sum of its bags' output gradients, in the ids'
 *             order; m += sum_d g^2 / D; w -= g lr / (sqrt(m) + eps), all in float (fbgemm's
 *             CPU template accumulates in at::acc_type<float, true>, i.e. float) and without
 *             fused multiply-adds (-ffp-contract=off), so the tables train bit for bit as
 *             through fbgemm (tests/test_native.py).
 * fbgemm finds each row's bags by sorting the ids (a stable radix sort: a row's bags stay in
 * the ids' order); here a row's first id gives it a slot in a dense accumulator instead
 * (slot [R] int32, all -1 between calls). An id outside [0, R) raises IndexError and
 * changes nothing.
 * single: every bag holds one id (bag (f, b) is id f B + b; offsets are not read).
 * mean: uint8 [F] or 0: feature f's bags are means, not sums (the schema's mean pooling,
 * dlrm_mtl.models.bag_means.mean_of_bags): forward each bag of L > 1 ids divided by (float)L
 * after its sum; backward each of its ids' gradient g / (float)L — the very divisions the
 * model's in-place division and its autograd backward make. D <= MAX_DIM where mean is given.
 * pooled_sum(w, R, D, ids, offsets, F, B, out, single, N, mean, ld)   (out: [B, F D], row stride ld)
 * rowwise_adagrad_update(grad, ld, ids, offsets, F, B, D, R, w, m, lr_ptr, eps, slot, single, N, mean)
 */
/* ids in [0, R); offsets rising from 0 (single: every bag holds one id, offsets not read,
 * and the ids number F B) */
SIMD_CLONES
static int any_fall(const int64_t *restrict offsets, Py_ssize_t n) {
    int falls = 0;
    for (Py_ssize_t i = 0; i < n; i++) falls |= offsets[i + 1] < offsets[i];
    return falls;
}

SIMD_CLONES
static int any_outside(const int64_t *restrict ids, int64_t n, Py_ssize_t R) {
    int outside = 0;
    for (int64_t p = 0; p < n; p++) outside |= (uint64_t)ids[p] >= (uint64_t)R; /* negative ids too */
    return outside;
}

static int check_bags(const int64_t *ids, const int64_t *offsets, Py_ssize_t F, Py_ssize_t B, Py_ssize_t R,
                      int single, Py_ssize_t N) {
    int64_t n = N;
    if (single) {
        if (N != F * B) {
            PyErr_Format(PyExc_ValueError, "embedding lookup: %zd ids for %zd one-id bags", N, F * B);
            return -1;
        }
    } else {
        n = offsets[F * B];
        if (offsets[0] != 0 || n != N) {
            PyErr_Format(PyExc_ValueError, "embedding lookup: offsets run from %lld to %lld for %zd ids",
                         (long long)offsets[0], (long long)n, N);
            return -1;
        }
        if (any_fall(offsets, F * B)) /* branch-free scans (SIMD clones); the position only on failure */
            for (Py_ssize_t i = 0; i < F * B; i++)
                if (offsets[i + 1] < offsets[i]) {
                    PyErr_Format(PyExc_ValueError, "embedding lookup: offsets fall at bag %zd", i);
                    return -1;
                }
    }
    if (any_outside(ids, n, R))
        for (int64_t p = 0; p < n; p++)
            if (ids[p] < 0 || ids[p] >= R) {
                PyErr_Format(PyExc_IndexError, "embedding lookup: id %lld (position %lld) is outside the table's %zd rows",
                             (long long)ids[p], (long long)p, R);
                return -1;
            }
    return 0;
}

/* a bag's rows summed into o (from 0, in the ids' order): for the usual embedding dims the
 * D sums are held in registers (a constant trip count the compiler unrolls); other dims sum
 * in memory */
#define DEFINE_BAG_SUM(DC)                                                                          \
    static inline void bag_sum_##DC(float *restrict o, const float *restrict W, const int64_t *restrict id, \
                                    int64_t a, int64_t z) {                                        \
        float acc[DC] = {0.0f};                                                                     \
        for (int64_t p = a; p < z; p++) {                                                           \
            const float *restrict row = W + id[p] * DC;                                             \
            for (int d = 0; d < DC; d++) acc[d] += row[d];                                          \
        }                                                                                           \
        for (int d = 0; d < DC; d++) o[d] = acc[d];                                                 \
    }
DEFINE_BAG_SUM(4)
DEFINE_BAG_SUM(8)
DEFINE_BAG_SUM(16)
DEFINE_BAG_SUM(32)
DEFINE_BAG_SUM(64)

static inline void bag_sum(float *restrict o, const float *restrict W, const int64_t *restrict id, int64_t a,
                           int64_t z, Py_ssize_t D) {
    switch (D) {
    case 4: bag_sum_4(o, W, id, a, z); return;
    case 8: bag_sum_8(o, W, id, a, z); return;
    case 16: bag_sum_16(o, W, id, a, z); return;
    case 32: bag_sum_32(o, W, id, a, z); return;
    case 64: bag_sum_64(o, W, id, a, z); return;
    default: break;
    }
    for (Py_ssize_t d = 0; d < D; d++) o[d] = 0.0f;
    for (int64_t p = a; p < z; p++) {
        const float *restrict row = W + id[p] * D;
        for (Py_ssize_t d = 0; d < D; d++) o[d] += row[d];
    }
}

/* row r's gradient accumulator a += g (D columns; the usual dims with a constant trip count) */
static inline void add_row(float *restrict a, const float *restrict g, Py_ssize_t D) {
    switch (D) {
    case 8: for (int d = 0; d < 8; d++) a[d] += g[d]; return;
    case 16: for (int d = 0; d < 16; d++) a[d] += g[d]; return;
    case 32: for (int d = 0; d < 32; d++) a[d] += g[d]; return;
    default: for (Py_ssize_t d = 0; d < D; d++) a[d] += g[d]; return;
    }
}

static PyObject *pooled_sum(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 12) {
        PyErr_SetString(PyExc_TypeError, "pooled_sum takes 12 arguments");
        return NULL;
    }
    void *w, *ids, *offsets, *out, *mean_ptr;
    Py_ssize_t R, D, F, B, single, N, ld;
    if (get_ptr(args[0], &w) || get_size(args[1], &R) || get_size(args[2], &D) || get_ptr(args[3], &ids)
        || get_ptr(args[4], &offsets) || get_size(args[5], &F) || get_size(args[6], &B) || get_ptr(args[7], &out)
        || get_size(args[8], &single) || get_size(args[9], &N) || get_ptr(args[10], &mean_ptr)
        || get_size(args[11], &ld))
        return NULL;
    const uint8_t *mean = mean_ptr;
    const int64_t *id = ids, *off = offsets;
    if (check_bags(id, off, F, B, R, (int)single, N)) return NULL;
    const int nt = team_size(N * D);
    (void)nt;
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
#endif
    for (Py_ssize_t b = 0; b < B; b++)  /* row after row (a block of rows per thread) */
        for (Py_ssize_t f = 0; f < F; f++) {
            float *o = (float *)out + b * ld + f * D;
            const int64_t a = single ? f * B + b : off[f * B + b], z = single ? a + 1 : off[f * B + b + 1];
            bag_sum(o, w, id, a, z, D);
            if (mean && mean[f] && z - a > 1) {
                const float L = (float)(z - a);
                for (Py_ssize_t d = 0; d < D; d++) o[d] /= L;
            }
        }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* the smallest and largest of n ids (INT64_MAX and -1 for none): one branch-free pass, in SIMD
 * clones (int64 compares need AVX2) */
SIMD_CLONES
static void id_range(const int64_t *restrict ids, int64_t n, int64_t *lo, int64_t *hi) {
    int64_t l = INT64_MAX, h = -1;
    for (int64_t p = 0; p < n; p++) {
        l = ids[p] < l ? ids[p] : l;
        h = ids[p] > h ? ids[p] : h;
    }
    *lo = l, *hi = h;
}

/* Which thread updates each feature's rows: features whose id ranges overlap (a table read by
 * several features) form one group, so every row's bags are summed by one thread in the ids'
 * order; groups go to threads costliest first, each to the least loaded. A feature's cost:
 * its ids (each one row added) plus twice the rows it can touch at most, min(ids, its id
 * range) (each touched row: a zeroed accumulator and the Adagrad update, with a cache miss
 * where the table is large) — a wide table's feature (users, items) costs about three times
 * a small one's of as many ids. thread_of [F] (out), load [T] (out: ids per thread, what its
 * scratch must hold). Returns the number of groups. */
static Py_ssize_t feature_threads(const int64_t *id, const int64_t *off, Py_ssize_t F, Py_ssize_t B, int single,
                                  int T, int32_t *thread_of, int64_t *load, int64_t *scratch) {
    int64_t *lo = scratch, *hi = scratch + F, *n = scratch + 2 * F, *order = scratch + 3 * F, *gc = scratch + 4 * F;
    for (Py_ssize_t f = 0; f < F; f++) {
        const int64_t pa = single ? f * B : off[f * B], pz = single ? pa + B : off[(f + 1) * B];
        id_range(id + pa, pz - pa, lo + f, hi + f);
        n[f] = pz - pa, order[f] = f;
    }
    for (Py_ssize_t i = 1; i < F; i++) /* features by their first row (F is small) */
        for (Py_ssize_t j = i; j > 0 && lo[order[j]] < lo[order[j - 1]]; j--) {
            const int64_t x = order[j]; order[j] = order[j - 1]; order[j - 1] = x;
        }
    Py_ssize_t G = 0;
    int64_t reach = -1;
    for (Py_ssize_t i = 0; i < F; i++) { /* thread_of holds the group index for now */
        const int64_t f = order[i];
        if (n[f] == 0) { thread_of[f] = -1; continue; }
        if (G == 0 || lo[f] > reach) gc[G++] = 0;
        reach = hi[f] > reach ? hi[f] : reach;
        thread_of[f] = (int32_t)(G - 1);
        const int64_t span = hi[f] - lo[f] + 1;
        gc[G - 1] += n[f] + 2 * (n[f] < span ? n[f] : span);
    }
    for (int t = 0; t < T; t++) load[t] = 0; /* the threads' costs while placing */
    int64_t *gt = lo; /* lo is no longer needed: the thread of each group */
    for (Py_ssize_t k = 0; k < G; k++) gt[k] = -1;
    for (Py_ssize_t k = 0; k < G; k++) {
        Py_ssize_t big = -1; /* the costliest group not yet placed */
        for (Py_ssize_t g = 0; g < G; g++)
            if (gt[g] < 0 && (big < 0 || gc[g] > gc[big])) big = g;
        int least = 0;
        for (int t = 1; t < T; t++)
            if (load[t] < load[least]) least = t;
        gt[big] = least;
        load[least] += gc[big];
    }
    for (int t = 0; t < T; t++) load[t] = 0;
    for (Py_ssize_t f = 0; f < F; f++) {
        thread_of[f] = thread_of[f] < 0 ? 0 : (int32_t)gt[thread_of[f]];
        load[thread_of[f]] += n[f];
    }
    return G;
}

/* n bytes of scratch starting on a 64-byte boundary (*base: what to free). malloc's 16-byte
 * alignment would split rows of 16 floats over two cache lines, and an accumulator row added
 * to again right after its last store then misses store-to-load forwarding on every vector:
 * the one-table update's accumulators and the folded backward's row sums are such rows. */
static void *scratch64(size_t n, void **base) {
    char *p = malloc(n + 64);
    *base = p;
    return p == NULL ? NULL : (void *)(((uintptr_t)p + 63) & ~(uintptr_t)63);
}

/* The row-wise Adagrad update of the U touched rows (touched [U]) whose summed gradients are
 * acc [U, D] (fbgemm's order of float operations), each row's slot reset to -1. */
static void adagrad_apply(const float *acc, const int64_t *touched, int64_t U, Py_ssize_t D, float *W, float *M,
                          float lr, float epsf, int32_t *slot) {
    for (int64_t u = 0; u < U; u++) {
        const int64_t r = touched[u];
        const float *a = acc + u * D;
        float *row = W + r * D;
        float ss = 0.0f;
        for (Py_ssize_t d = 0; d < D; d++) ss += a[d] * a[d];
        const float nsq = M[r] + ss / (float)D;
        M[r] = nsq;
        const float mult = lr / (sqrtf(nsq) + epsf);
        for (Py_ssize_t d = 0; d < D; d++) row[d] = row[d] - a[d] * mult;
        slot[r] = -1;
    }
}

/* row r's gradient acc[slot[r]] += g (D columns), the row entering the touched list on its
 * first gradient */
static inline void add_row_grad(int64_t r, const float *g, Py_ssize_t D, int32_t *slot, float *acc, int64_t *touched,
                                int64_t *U) {
    int32_t s = slot[r];
    float *a;
    if (s < 0) {
        s = slot[r] = (int32_t)*U;
        touched[(*U)++] = r;
        a = acc + (int64_t)s * D;
        for (Py_ssize_t d = 0; d < D; d++) a[d] = 0.0f;
    } else {
        a = acc + (int64_t)s * D;
    }
    add_row(a, g, D);
}

/* Feature f's bags' gradients (bag b's: D columns of G from row b, column f D; row stride ld)
 * added to each of their ids' rows (add_row_grad), bag after bag; a mean bag of L > 1 ids
 * gives each id g / L. */
static void feature_grads_by_id(const float *G, Py_ssize_t ld, const int64_t *id, const int64_t *off, Py_ssize_t f,
                                Py_ssize_t B, Py_ssize_t D, int single, int mean, int32_t *slot, float *acc,
                                int64_t *touched, int64_t *U) {
    for (Py_ssize_t b = 0; b < B; b++) {
        const float *g = G + b * ld + f * D;
        float gm[MAX_DIM];
        const int64_t pa = single ? f * B + b : off[f * B + b], pz = single ? pa + 1 : off[f * B + b + 1];
        if (mean && pz - pa > 1) { /* a mean bag: each id's gradient is g / L */
            const float L = (float)(pz - pa);
            for (Py_ssize_t d = 0; d < D; d++) gm[d] = g[d] / L;
            g = gm;
        }
        for (int64_t p = pa; p < pz; p++) add_row_grad(id[p], g, D, slot, acc, touched, U);
    }
}

/* The features of thread t (thread_of): their rows' gradients accumulated over the bags in
 * the ids' order, then each touched row's row-wise Adagrad update. acc [rows, D] and touched
 * [rows] are the thread's own scratch. */
static void adagrad_rows(const float *G, Py_ssize_t ld, const int64_t *id, const int64_t *off, Py_ssize_t F,
                         Py_ssize_t B, Py_ssize_t D, float *W, float *M, float lr, float epsf, int32_t *slot,
                         int single, const uint8_t *mean, const int32_t *thread_of, int t, float *acc,
                         int64_t *touched) {
    int64_t U = 0;
    for (Py_ssize_t f = 0; f < F; f++)
        if (thread_of[f] == t) feature_grads_by_id(G, ld, id, off, f, B, D, single, mean && mean[f], slot, acc, touched, &U);
    adagrad_apply(acc, touched, U, D, W, M, lr, epsf, slot);
}

static PyObject *rowwise_adagrad_update(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 16) {
        PyErr_SetString(PyExc_TypeError, "rowwise_adagrad_update takes 16 arguments");
        return NULL;
    }
    void *grad, *ids, *offsets, *w, *m, *lr_ptr, *slot_ptr, *mean_ptr;
    Py_ssize_t ld, F, B, D, R, single, N;
    double eps;
    if (get_ptr(args[0], &grad) || get_size(args[1], &ld) || get_ptr(args[2], &ids) || get_ptr(args[3], &offsets)
        || get_size(args[4], &F) || get_size(args[5], &B) || get_size(args[6], &D) || get_size(args[7], &R)
        || get_ptr(args[8], &w) || get_ptr(args[9], &m) || get_ptr(args[10], &lr_ptr))
        return NULL;
    eps = PyFloat_AsDouble(args[11]);
    if (eps == -1.0 && PyErr_Occurred()) return NULL;
    if (get_ptr(args[12], &slot_ptr) || get_size(args[13], &single) || get_size(args[14], &N)
        || get_ptr(args[15], &mean_ptr))
        return NULL;
    const uint8_t *mean = mean_ptr;
    const int64_t *id = ids, *off = offsets;
    if (mean && D > MAX_DIM) {
        PyErr_Format(PyExc_ValueError, "rowwise_adagrad_update: mean bags of dim %zd > %d", D, MAX_DIM);
        return NULL;
    }
    if (check_bags(id, off, F, B, R, (int)single, N)) return NULL;
    int T = team_size(N * D);
    int32_t *thread_of = malloc((size_t)(F > 0 ? F : 1) * sizeof(int32_t));
    int64_t *load = malloc((size_t)T * sizeof(int64_t)), *fs = malloc((size_t)(F > 0 ? F : 1) * 5 * sizeof(int64_t));
    size_t *at = malloc((size_t)T * 2 * sizeof(size_t));
    if (thread_of == NULL || load == NULL || fs == NULL || at == NULL) {
        free(thread_of), free(load), free(fs), free(at);
        return PyErr_NoMemory();
    }
    if (T < 2 || feature_threads(id, off, F, B, (int)single, T, thread_of, load, fs) < 2) { /* one thread */
        T = 1;
        load[0] = N;
        for (Py_ssize_t f = 0; f < F; f++) thread_of[f] = 0;
    }
    size_t rows_total = 0; /* thread t's scratch: rows_t = min(its ids, R) rows from at[t] */
    for (int t = 0; t < T; t++) {
        const size_t rows_t = (size_t)(load[t] < R ? load[t] : R);
        at[t] = rows_total, at[T + t] = rows_t;
        rows_total += rows_t;
    }
    void *acc_base;
    float *acc = scratch64((rows_total > 0 ? rows_total : 1) * (size_t)D * sizeof(float), &acc_base);
    int64_t *touched = malloc((rows_total > 0 ? rows_total : 1) * sizeof(int64_t));
    if (acc == NULL || touched == NULL) {
        free(thread_of), free(load), free(fs), free(at), free(acc_base), free(touched);
        return PyErr_NoMemory();
    }
    const float lr = *(const float *)lr_ptr;
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
#pragma omp parallel num_threads(T) if (T > 1)
    { /* a smaller team than asked for: each thread takes the planned threads t, t + team, ... */
        for (int t = omp_get_thread_num(); t < T; t += omp_get_num_threads())
#else
    {
        for (int t = 0; t < T; t++)
#endif
            adagrad_rows(grad, ld, id, off, F, B, D, w, m, lr, (float)eps, slot_ptr, (int)single, mean, thread_of, t,
                         acc + at[t] * (size_t)D, touched + at[t]);
    }
    Py_END_ALLOW_THREADS
    free(thread_of), free(load), free(fs), free(at), free(acc_base), free(touched);
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------
 * kjt_single_run / kjt_multi_key: one run of a batch's KJT cut from a buffer's id columns
 * (dlrm_mtl.data.batch_columns.IdBlocks.kjt): the batch's values, lengths and bag ends of
 * m adjacent single-hot keys (a [m, rows] int64 matrix, row stride ld) or of one multi-hot
 * key (int32 lengths, int64 offsets and values of the buffer's rows), for rows
 * [start, start + n) in a batch of B rows (padding bags empty); values from position pos.
 * kjt_single_run(matrix, ld, m, start, n, B, pos, values, lengths, ends)
 * kjt_multi_key(lens, offs, vals, start, n, B, pos, values, lengths, ends)
 * lengths: int32 [m, B]; ends: int64 [m, B] (the KJT offsets from the run's first bag on).
 */
static PyObject *kjt_single_run(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "kjt_single_run takes 10 arguments");
        return NULL;
    }
    void *matrix, *values, *lengths, *ends;
    Py_ssize_t ld, m, start, n, B, pos;
    if (get_ptr(args[0], &matrix) || get_size(args[1], &ld) || get_size(args[2], &m) || get_size(args[3], &start)
        || get_size(args[4], &n) || get_size(args[5], &B) || get_size(args[6], &pos) || get_ptr(args[7], &values)
        || get_ptr(args[8], &lengths) || get_ptr(args[9], &ends))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t j = 0; j < m; j++) {
        const int64_t *src = (const int64_t *)matrix + j * ld + start;
        const int64_t first = pos + j * n;
        memcpy((int64_t *)values + first, src, (size_t)n * sizeof(int64_t));
        int32_t *len = (int32_t *)lengths + j * B;
        int64_t *end = (int64_t *)ends + j * B;
        for (Py_ssize_t i = 0; i < n; i++) {
            len[i] = 1;
            end[i] = first + i + 1;
        }
        for (Py_ssize_t i = n; i < B; i++) {
            len[i] = 0;
            end[i] = first + n;
        }
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *kjt_multi_key(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "kjt_multi_key takes 10 arguments");
        return NULL;
    }
    void *lens, *offs, *vals, *values, *lengths, *ends;
    Py_ssize_t start, n, B, pos;
    if (get_ptr(args[0], &lens) || get_ptr(args[1], &offs) || get_ptr(args[2], &vals) || get_size(args[3], &start)
        || get_size(args[4], &n) || get_size(args[5], &B) || get_size(args[6], &pos) || get_ptr(args[7], &values)
        || get_ptr(args[8], &lengths) || get_ptr(args[9], &ends))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    const int64_t *o = (const int64_t *)offs + start;
    const int64_t a = o[0], size = o[n] - a, shift = pos - a;
    memcpy((int64_t *)values + pos, (const int64_t *)vals + a, (size_t)size * sizeof(int64_t));
    const int32_t *l = (const int32_t *)lens + start;
    int32_t *len = lengths;
    int64_t *end = ends;
    for (Py_ssize_t i = 0; i < n; i++) {
        len[i] = l[i];
        end[i] = o[i + 1] + shift;
    }
    for (Py_ssize_t i = n; i < B; i++) {
        len[i] = 0;
        end[i] = pos + size;
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------
 * table_rows / rows_by_id: a small dense table's rows for a batch's ids and the backward's
 * per-id sums (dlrm_mtl.models.scenario_rows.TableRows: the scenario embeddings).
 * table_rows(w, V, e, ids, ids_ld, B, out, out_ld): out[b] = w[ids[b * ids_ld]] (w [V, e]
 *   contiguous, out [B, e] with row stride out_ld; an id outside [0, V) raises IndexError,
 *   naming its row).
 * rows_by_id(grad, ld, B, ids, ids_ld, G, V, e): G [V, e] = the rows of grad (row stride ld)
 *   summed by id, in float, rows in order (index_add's order); zeros where no row has the id.
 * A table of one row (V = 1, a scenario level of one value) is that row for every id, which
 * is not read (the reader admits only 0 there; the ATen path expands the row alike).
 */
static int check_row_ids(const int64_t *ids, Py_ssize_t ids_ld, Py_ssize_t B, Py_ssize_t V) {
    if (V == 1) return 0;
    for (Py_ssize_t b = 0; b < B; b++) {
        const int64_t s = ids[b * ids_ld];
        if (s < 0 || s >= V) {
            PyErr_Format(PyExc_IndexError, "table rows: id %lld (row %zd) is outside the table's %zd rows", (long long)s,
                         b, V);
            return -1;
        }
    }
    return 0;
}

static PyObject *table_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "table_rows takes 8 arguments");
        return NULL;
    }
    void *w, *ids_ptr, *out;
    Py_ssize_t V, e, ids_ld, B, out_ld;
    if (get_ptr(args[0], &w) || get_size(args[1], &V) || get_size(args[2], &e) || get_ptr(args[3], &ids_ptr)
        || get_size(args[4], &ids_ld) || get_size(args[5], &B) || get_ptr(args[6], &out) || get_size(args[7], &out_ld))
        return NULL;
    const int64_t *ids = ids_ptr;
    if (check_row_ids(ids, ids_ld, B, V)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t b = 0; b < B; b++) {
        const int64_t s = V == 1 ? 0 : ids[b * ids_ld];
        memcpy((float *)out + b * out_ld, (const float *)w + s * e, (size_t)e * sizeof(float));
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *rows_by_id(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "rows_by_id takes 8 arguments");
        return NULL;
    }
    void *grad, *ids_ptr, *G_ptr;
    Py_ssize_t ld, B, ids_ld, V, e;
    if (get_ptr(args[0], &grad) || get_size(args[1], &ld) || get_size(args[2], &B) || get_ptr(args[3], &ids_ptr)
        || get_size(args[4], &ids_ld) || get_ptr(args[5], &G_ptr) || get_size(args[6], &V) || get_size(args[7], &e))
        return NULL;
    const int64_t *ids = ids_ptr;
    if (check_row_ids(ids, ids_ld, B, V)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    float *G = G_ptr;
    memset(G, 0, (size_t)(V * e) * sizeof(float));
    for (Py_ssize_t b = 0; b < B; b++) add_row(G + (V == 1 ? 0 : ids[b * ids_ld]) * e, (const float *)grad + b * ld, e);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------
 * folded_backward / folded_rows_backward: the backward of an affine map h = x Wx + b whose
 * input is the dense arch's x = [front | pooled | scenario rows] (OneTableInputRows), taken
 * by table row instead of by batch row, without x's gradient
 * (dlrm_mtl.modules.folded_affine.FoldedInputAffine).
 *
 * With G = dL/dh [B, N] and W_f [D, N] the rows of Wx that read feature f's pooled columns,
 * feature f's bags give each table row r they hold the sum gT_r of their rows of G (G_b / L
 * for a mean bag of L > 1 ids), and then
 *   dL/dW_f  = sum_r E_r^T gT_r     (E_r: row r of the table before this step's update)
 *   dL/dE_r += W_f gT_r             (every feature reading row r, in feature order)
 * — the sums x_pooled^T G and G W_f^T make over the batch, regrouped by row (equal to float
 * rounding), with the D N products taken once per touched row instead of once per id. The
 * rows' gradients then get rowwise_adagrad_update's exact row-wise Adagrad, on its threads
 * (groups of features that share no row, each row summed and updated by one thread).
 * folded_backward(G, ldg, N, ids, offsets, F, B, D, R, w, m, lr_ptr, eps, slot, single, Nids,
 *                 mean, Wp, ldw, gWp, ldgw, direct, gx, ldx)
 *   Wp: the pooled rows of Wx, [F D, N] with row stride ldw; gWp: their gradient (out, row
 *   stride ldgw; not written for direct features); direct: uint8 [F] or 0: the features not folded, whose columns of x's gradient
 *   the caller computed (gx [B, F D], row stride ldx; only their columns are read) and whose
 *   ids take them as rowwise_adagrad_update does (a table much wider than its ids: by row
 *   there would be as many products as by id, and the GEMM takes them faster); the rest as
 *   for rowwise_adagrad_update.
 * folded_rows_backward(G, ldg, N, ids, ids_ld, B, E, V, e, Wl, ldw, gWl, ldgw, gE): one scenario
 *   level (one id per row, row stride ids_ld; table E [V, e], rows Wl [e, N] of Wx): gWl [e, N]
 *   (out) and the table's gradient gE [V, e] (out; zeros where no row has the id).
 * The dot products W_f gT_r run in 16 partial sums (lane k: the columns k, k + 16, ...), then
 * halved pairwise (lane k += lane k + 8, k + 4, ...); E_r^T gT_r is added to dL/dW_f four
 * rows at a time (gw += e_0 t_0 + e_1 t_1 + e_2 t_2 + e_3 t_3, left to right): the same float
 * operations on every instruction set and any number of threads.
 */
#define FOLD_LANES 16
static inline __attribute__((always_inline)) float dot16(const float *restrict a, const float *restrict b, Py_ssize_t n) {
    float part[FOLD_LANES] = {0.0f};
    Py_ssize_t j = 0;
    for (; j + FOLD_LANES <= n; j += FOLD_LANES)
        for (int k = 0; k < FOLD_LANES; k++) part[k] += a[j + k] * b[j + k];
    for (int k = 0; j < n; j++, k++) part[k] += a[j] * b[j];
    for (int w = FOLD_LANES / 2; w > 0; w /= 2)
        for (int k = 0; k < w; k++) part[k] += part[k + w];
    return part[0];
}

/* dot16 as a function of its own (the callers that do not inline it) */
SIMD_CLONES
static float dot_lanes(const float *restrict a, const float *restrict b, Py_ssize_t n) { return dot16(a, b, n); }

/* out[d] = dot_lanes(W + d ldw, t, N) for d < D: for the usual dims all D dot products at
 * once (D independent 16-lane sums, where one would wait on its own additions), each summed
 * as dot_lanes sums it — the same float operations, so the same result */
#define DEFINE_ROW_DOTS(DC)                                                                          \
    static inline __attribute__((always_inline)) void row_dots_##DC(const float *restrict W, Py_ssize_t ldw, const float *restrict t, \
                                     Py_ssize_t N, float *restrict out) {                            \
        float part[DC][FOLD_LANES] = {{0.0f}};                                                       \
        Py_ssize_t j = 0;                                                                            \
        for (; j + FOLD_LANES <= N; j += FOLD_LANES)                                                 \
            for (int d = 0; d < DC; d++)                                                             \
                for (int k = 0; k < FOLD_LANES; k++) part[d][k] += W[d * ldw + j + k] * t[j + k];    \
        for (int d = 0; d < DC; d++)                                                                 \
            for (Py_ssize_t i = j, k = 0; i < N; i++, k++) part[d][k] += W[d * ldw + i] * t[i];      \
        for (int w = FOLD_LANES / 2; w > 0; w /= 2)                                                  \
            for (int d = 0; d < DC; d++)                                                             \
                for (int k = 0; k < w; k++) part[d][k] += part[d][k + w];                            \
        for (int d = 0; d < DC; d++) out[d] = part[d][0];                                            \
    }
DEFINE_ROW_DOTS(4)
DEFINE_ROW_DOTS(8)
DEFINE_ROW_DOTS(16)

static inline __attribute__((always_inline)) void row_dots(const float *restrict W, Py_ssize_t ldw, const float *restrict t, Py_ssize_t N,
                            Py_ssize_t D, float *restrict out) {
    switch (D) {
    case 4: row_dots_4(W, ldw, t, N, out); return;
    case 8: row_dots_8(W, ldw, t, N, out); return;
    case 16: row_dots_16(W, ldw, t, N, out); return;
    default: break;
    }
    for (Py_ssize_t d = 0; d < D; d++) out[d] = dot_lanes(W + d * ldw, t, N);
}

/* One feature's (or scenario level's) bags b0 <= b < b1: their rows of G summed by table
 * row into gT (row u of the sums: table row rows[u], in first-seen order; *U of them so far).
 * Bag b holds ids p in [pa, pz) (single: p = base + b; else from off[base + b]), id p at
 * id[p id_ld]; lslot[r - lo]: row r's u, -1 before it is seen. mean: a mean feature (a bag
 * of L > 1 ids adds G_b / L). */
SIMD_CLONES
static void fold_scatter(const float *restrict G, Py_ssize_t ldg, Py_ssize_t N, Py_ssize_t b0, Py_ssize_t b1,
                         const int64_t *restrict id, Py_ssize_t id_ld, const int64_t *restrict off, Py_ssize_t base,
                         int single, int mean, int32_t *restrict lslot, int64_t lo, int64_t *restrict rows,
                         float *restrict gT, int64_t *U) {
    int64_t n = *U;
    for (Py_ssize_t b = b0; b < b1; b++) {
        const int64_t pa = single ? base + b : off[base + b], pz = single ? pa + 1 : off[base + b + 1];
        const float *restrict g = G + b * ldg;
        const float L = (float)(pz - pa);
        const int div = mean && pz - pa > 1;
        for (int64_t p = pa; p < pz; p++) {
            const int64_t r = id[p * id_ld];
            int32_t u = lslot[r - lo];
            float *restrict t;
            if (u < 0) { /* the row's first bag: its sum starts there */
                u = lslot[r - lo] = (int32_t)n;
                rows[n++] = r;
                t = gT + (int64_t)u * N;
                if (div)
                    for (Py_ssize_t j = 0; j < N; j++) t[j] = g[j] / L;
                else
                    for (Py_ssize_t j = 0; j < N; j++) t[j] = g[j];
            } else {
                t = gT + (int64_t)u * N;
                if (div)
                    for (Py_ssize_t j = 0; j < N; j++) t[j] += g[j] / L;
                else
                    for (Py_ssize_t j = 0; j < N; j++) t[j] += g[j];
            }
        }
    }
    *U = n;
}

/* The products of one feature's U row sums gT [U, N] (table rows rows [U] of E [., D]):
 * gWf [D, N] = sum_u E_r^T gT_u (written), gE [U, D] = W_f gT_u (W_f [D, N], row stride ldw). */
SIMD_CLONES
static void fold_products(Py_ssize_t N, int64_t U, const int64_t *restrict rows, const float *restrict gT,
                          const float *restrict E, Py_ssize_t D, const float *restrict Wf, Py_ssize_t ldw,
                          float *restrict gWf, Py_ssize_t ldgw, float *restrict gE) {
    for (Py_ssize_t d = 0; d < D; d++) memset(gWf + d * ldgw, 0, (size_t)N * sizeof(float));
    int64_t u = 0;
    for (; u + 4 <= U; u += 4) { /* four rows at a time into dL/dW_f */
        const float *restrict t0 = gT + u * N, *restrict t1 = t0 + N, *restrict t2 = t1 + N, *restrict t3 = t2 + N;
        const float *restrict e0 = E + rows[u] * D, *restrict e1 = E + rows[u + 1] * D;
        const float *restrict e2 = E + rows[u + 2] * D, *restrict e3 = E + rows[u + 3] * D;
        for (Py_ssize_t d = 0; d < D; d++) {
            float *restrict gw = gWf + d * ldgw;
            const float a0 = e0[d], a1 = e1[d], a2 = e2[d], a3 = e3[d];
            for (Py_ssize_t j = 0; j < N; j++) gw[j] = gw[j] + a0 * t0[j] + a1 * t1[j] + a2 * t2[j] + a3 * t3[j];
        }
        for (int k = 0; k < 4; k++) row_dots(Wf, ldw, t0 + k * N, N, D, gE + (u + k) * D);
    }
    for (; u < U; u++) {
        const float *restrict t = gT + u * N;
        const float *restrict er = E + rows[u] * D;
        for (Py_ssize_t d = 0; d < D; d++) {
            float *restrict gw = gWf + d * ldgw;
            const float ed = er[d];
            for (Py_ssize_t j = 0; j < N; j++) gw[j] += ed * t[j];
        }
        row_dots(Wf, ldw, t, N, D, gE + u * D);
    }
}

#define FOLD_CHUNK 64 /* rows of G (32 KB at N = 128) each folded feature of a thread sums in turn */

static PyObject *folded_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 24) {
        PyErr_SetString(PyExc_TypeError, "folded_backward takes 24 arguments");
        return NULL;
    }
    void *G, *ids, *offsets, *w, *m, *lr_ptr, *slot_ptr, *mean_ptr, *Wp, *gWp, *direct_ptr, *gx;
    Py_ssize_t ldg, N, F, B, D, R, single, Nids, ldw, ldgw, ldx;
    double eps;
    if (get_ptr(args[0], &G) || get_size(args[1], &ldg) || get_size(args[2], &N) || get_ptr(args[3], &ids)
        || get_ptr(args[4], &offsets) || get_size(args[5], &F) || get_size(args[6], &B) || get_size(args[7], &D)
        || get_size(args[8], &R) || get_ptr(args[9], &w) || get_ptr(args[10], &m) || get_ptr(args[11], &lr_ptr))
        return NULL;
    eps = PyFloat_AsDouble(args[12]);
    if (eps == -1.0 && PyErr_Occurred()) return NULL;
    if (get_ptr(args[13], &slot_ptr) || get_size(args[14], &single) || get_size(args[15], &Nids)
        || get_ptr(args[16], &mean_ptr) || get_ptr(args[17], &Wp) || get_size(args[18], &ldw)
        || get_ptr(args[19], &gWp) || get_size(args[20], &ldgw) || get_ptr(args[21], &direct_ptr)
        || get_ptr(args[22], &gx) || get_size(args[23], &ldx))
        return NULL;
    const uint8_t *mean = mean_ptr, *direct = direct_ptr;
    if (mean && direct && D > MAX_DIM) {
        PyErr_Format(PyExc_ValueError, "folded_backward: mean bags of dim %zd > %d", D, MAX_DIM);
        return NULL;
    }
    if (direct != NULL && gx == NULL) {
        PyErr_SetString(PyExc_ValueError, "folded_backward: direct features need their gradient columns");
        return NULL;
    }
    const int64_t *id = ids, *off = offsets;
    if (check_bags(id, off, F, B, R, (int)single, Nids)) return NULL;
    int T = team_size(Nids * N);
    const size_t Fa = (size_t)(F > 0 ? F : 1);
    int32_t *thread_of = malloc(Fa * sizeof(int32_t));
    int64_t *load = malloc((size_t)T * sizeof(int64_t)), *fs = malloc(Fa * 5 * sizeof(int64_t));
    int64_t *lo = malloc(Fa * 5 * sizeof(int64_t)); /* per feature: lo, first sum row, first slot, sums, (spare) */
    size_t *at = malloc((size_t)T * 2 * sizeof(size_t));
    if (thread_of == NULL || load == NULL || fs == NULL || lo == NULL || at == NULL) {
        free(thread_of), free(load), free(fs), free(lo), free(at);
        return PyErr_NoMemory();
    }
    if (T < 2 || feature_threads(id, off, F, B, (int)single, T, thread_of, load, fs) < 2) { /* one thread */
        T = 1;
        load[0] = Nids;
        for (Py_ssize_t f = 0; f < F; f++) thread_of[f] = 0;
    }
    /* a folded feature's row sums: at most min(its ids, its id range) of them, each with a slot
     * in its own id range (lslot from soff[f], indexed by row - lo[f]) */
    int64_t *goff = lo + F, *soff = lo + 2 * F, *Uf = lo + 3 * F;
    int64_t sums_total = 0, slots_total = 0;
    for (Py_ssize_t f = 0; f < F; f++) {
        Uf[f] = 0, goff[f] = sums_total, soff[f] = slots_total, lo[f] = 0;
        if (direct != NULL && direct[f]) continue;
        const int64_t pa = single ? f * B : off[f * B], pz = single ? pa + B : off[(f + 1) * B];
        int64_t l, h;
        id_range(id + pa, pz - pa, &l, &h);
        if (pz == pa) continue;
        const int64_t span = h - l + 1, n = pz - pa;
        lo[f] = l, sums_total += n < span ? n : span, slots_total += span;
    }
    size_t rows_total = 0; /* thread t's accumulated rows: min(its ids, R) from at[t] */
    for (int t = 0; t < T; t++) {
        const size_t rows_t = (size_t)(load[t] < R ? load[t] : R);
        at[t] = rows_total, at[T + t] = rows_t;
        rows_total += rows_t;
    }
    const size_t rt = rows_total > 0 ? rows_total : 1, ct = sums_total > 0 ? (size_t)sums_total : 1;
    void *acc_base, *gT_base;
    float *acc = scratch64(rt * (size_t)D * sizeof(float), &acc_base), *gT = scratch64(ct * (size_t)N * sizeof(float), &gT_base);
    float *gE = malloc(ct * (size_t)D * sizeof(float));
    int64_t *touched = malloc(rt * sizeof(int64_t)), *frows = malloc(ct * sizeof(int64_t));
    int32_t *lslot = malloc((slots_total > 0 ? (size_t)slots_total : 1) * sizeof(int32_t));
    if (acc == NULL || gT == NULL || gE == NULL || touched == NULL || frows == NULL || lslot == NULL) {
        free(thread_of), free(load), free(fs), free(lo), free(at), free(acc_base), free(gT_base), free(gE), free(touched),
            free(frows), free(lslot);
        return PyErr_NoMemory();
    }
    const float lr = *(const float *)lr_ptr;
    int32_t *slot = slot_ptr;
    float *W = w, *M = m;
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
#pragma omp parallel num_threads(T) if (T > 1)
    {
        for (int t = omp_get_thread_num(); t < T; t += omp_get_num_threads()) {
#else
    {
        for (int t = 0; t < T; t++) {
#endif
            float *acc_t = acc + at[t] * (size_t)D;
            int64_t *touched_t = touched + at[t];
            int64_t U = 0;
            /* the thread's folded features, G read once: each block of rows summed by every one */
            for (Py_ssize_t f = 0; f < F; f++)
                if (thread_of[f] == t && !(direct != NULL && direct[f])) {
                    const int64_t n = (f + 1 < F ? soff[f + 1] : slots_total) - soff[f];
                    for (int64_t i = 0; i < n; i++) lslot[soff[f] + i] = -1;
                }
            for (Py_ssize_t b0 = 0; b0 < B; b0 += FOLD_CHUNK) {
                const Py_ssize_t b1 = b0 + FOLD_CHUNK < B ? b0 + FOLD_CHUNK : B;
                for (Py_ssize_t f = 0; f < F; f++)
                    if (thread_of[f] == t && !(direct != NULL && direct[f]))
                        fold_scatter(G, ldg, N, b0, b1, id, 1, off, f * B, (int)single, mean != NULL && mean[f],
                                     lslot + soff[f], lo[f], frows + goff[f], gT + goff[f] * N, Uf + f);
            }
            for (Py_ssize_t f = 0; f < F; f++) { /* each row's gradient, feature after feature */
                if (thread_of[f] != t) continue;
                if (direct != NULL && direct[f]) { /* x's gradient columns given: by id, as adagrad_rows */
                    feature_grads_by_id(gx, ldx, id, off, f, B, D, (int)single, mean && mean[f], slot, acc_t, touched_t, &U);
                    continue;
                }
                float *gE_f = gE + goff[f] * D;
                fold_products(N, Uf[f], frows + goff[f], gT + goff[f] * N, W, D, (const float *)Wp + f * D * ldw, ldw,
                              (float *)gWp + f * D * ldgw, ldgw, gE_f);
                for (int64_t u = 0; u < Uf[f]; u++) add_row_grad(frows[goff[f] + u], gE_f + u * D, D, slot, acc_t, touched_t, &U);
            }
            adagrad_apply(acc_t, touched_t, U, D, W, M, lr, (float)eps, slot);
        }
    }
    Py_END_ALLOW_THREADS
    free(thread_of), free(load), free(fs), free(lo), free(at), free(acc_base), free(gT_base), free(gE), free(touched),
        free(frows), free(lslot);
    Py_RETURN_NONE;
}

static PyObject *folded_rows_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 14) {
        PyErr_SetString(PyExc_TypeError, "folded_rows_backward takes 14 arguments");
        return NULL;
    }
    void *G, *ids_ptr, *E, *Wl, *gWl, *gE_ptr;
    Py_ssize_t ldg, N, ids_ld, B, V, e, ldw, ldgw;
    if (get_ptr(args[0], &G) || get_size(args[1], &ldg) || get_size(args[2], &N) || get_ptr(args[3], &ids_ptr)
        || get_size(args[4], &ids_ld) || get_size(args[5], &B) || get_ptr(args[6], &E) || get_size(args[7], &V)
        || get_size(args[8], &e) || get_ptr(args[9], &Wl) || get_size(args[10], &ldw) || get_ptr(args[11], &gWl)
        || get_size(args[12], &ldgw) || get_ptr(args[13], &gE_ptr))
        return NULL;
    const int64_t *ids = ids_ptr;
    if (check_row_ids(ids, ids_ld, B, V)) return NULL;
    const size_t cap = (size_t)(B < V ? B : V) + 1;
    int32_t *fslot = malloc((size_t)V * sizeof(int32_t));
    int64_t *rows = malloc(cap * sizeof(int64_t)), *zero = V == 1 ? calloc((size_t)B + 1, sizeof(int64_t)) : NULL;
    void *gT_base;
    float *gT = scratch64(cap * (size_t)N * sizeof(float), &gT_base), *gEu = malloc(cap * (size_t)e * sizeof(float));
    if (fslot == NULL || rows == NULL || gT == NULL || gEu == NULL || (V == 1 && zero == NULL)) {
        free(fslot), free(rows), free(zero), free(gT_base), free(gEu);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    float *gE = gE_ptr;
    for (Py_ssize_t v = 0; v < V; v++) fslot[v] = -1;
    memset(gE, 0, (size_t)(V * e) * sizeof(float));
    /* a table of one row: every id reads it (as table_rows) */
    int64_t U = 0;
    fold_scatter(G, ldg, N, 0, B, V == 1 ? zero : ids, V == 1 ? 1 : ids_ld, NULL, 0, 1, 0, fslot, 0, rows, gT, &U);
    fold_products(N, U, rows, gT, E, e, Wl, ldw, gWl, ldgw, gEu);
    for (int64_t u = 0; u < U; u++) memcpy(gE + rows[u] * e, gEu + u * e, (size_t)e * sizeof(float));
    Py_END_ALLOW_THREADS
    free(fslot), free(rows), free(zero), free(gT_base), free(gEu);
    Py_RETURN_NONE;
}

/* float_math(which, x, out, n) -> None: one of the loss passes' functions on n float32 values
 * (0: e^x for x <= 0, 1: log(1 + x) for x in [0, 1], 2: e^x - 1 for x <= 0, 3: log(x) for a
 * normal x > 0), for tests against float64. */
SIMD_CLONES
static void float_math_pass(int which, const float *restrict x, float *restrict out, Py_ssize_t n) {
    if (which == 0)
        for (Py_ssize_t i = 0; i < n; i++) out[i] = exp_nonpos(x[i]);
    else if (which == 1)
        for (Py_ssize_t i = 0; i < n; i++) out[i] = log1p_unit(x[i]);
    else if (which == 2)
        for (Py_ssize_t i = 0; i < n; i++) out[i] = expm1_nonpos(x[i]);
    else
        for (Py_ssize_t i = 0; i < n; i++) out[i] = log_pos(x[i]);
}

static PyObject *float_math(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "float_math takes 4 arguments");
        return NULL;
    }
    Py_ssize_t which, n;
    void *x, *out;
    if (get_size(args[0], &which) || get_ptr(args[1], &x) || get_ptr(args[2], &out) || get_size(args[3], &n))
        return NULL;
    if (which < 0 || which > 3) {
        PyErr_SetString(PyExc_ValueError, "float_math: which is 0..3");
        return NULL;
    }
    float_math_pass((int)which, x, out, n);
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------
 * mixture_forward / mixture_backward: dlrm_mtl.modules.mixture's gated sums on the CPU.
 *
 * Per row b, G gates' weights w [G, E] over E expert outputs x_e [D] (r(x) = x, or ReLU(x) =
 * (x < 0 ? 0 : x) where the experts' last ReLU is left to this kernel):
 *   y_g      = sum_e w[g, e] r(x_e)                       (e ascending)
 * and with the incoming gradients gy_g [D]:
 *   gw[g, e] = sum_d gy_g[d] r(x_e[d])                    (16 partial sums, d mod 16, then
 *                                                           added in lane order)
 *   gx_e[d]  = sum_g w[g, e] gy_g[d]                      (g ascending; 0 where x_e[d] <= 0
 *                                                           for ReLU: its backward)
 * PyTorch runs each of the three as a bmm of B tiny matrices ([2048, 3, 64] x [2048, 64, 4]:
 * a scalar fallback below a size, one small BLAS call per matrix above it, 0.2-2 ms each on
 * the 2-core VM), and the ReLU, its backward, the cat of the expert banks' outputs and the
 * cat of the outputs' gradients as passes of their own; here a row is one pass over a few kB
 * that stay in L1. Every expert e is read at x_e = xs[e] + b * xbs[e] (its own pointer and
 * row stride: the banks' outputs need no cat) and every gate's output row written at
 * ys[g] + b * ybs[g] (outputs split between consumers need no cat of their gradients). Rows
 * are split over PyTorch's threads; a row's arithmetic is the same whatever the thread count
 * or SIMD clone (the dot products' 16 partial sums are explicit, no reassociation, no FMA
 * contraction). Strides are in floats; w's are any, every expert and output row is contiguous.
 */
#define MAX_MIX 64 /* experts and gates per mixture */
typedef struct {
    const float *w;
    Py_ssize_t wb, wg, we; /* w's strides */
    Py_ssize_t G, E, D;
    int relu;
    const float *x[MAX_MIX];
    Py_ssize_t xb[MAX_MIX];
    float *gx[MAX_MIX]; /* NULL: that expert's gradient is not wanted */
    Py_ssize_t gxb[MAX_MIX];
    float *y[MAX_MIX];
    Py_ssize_t yb[MAX_MIX];
    const float *gy[MAX_MIX];
    Py_ssize_t gyb[MAX_MIX];
    float *gw; /* [B, G, E] contiguous, or NULL */
} mixture_args;

SIMD_CLONES
static void mixture_forward_rows(const mixture_args *a, Py_ssize_t b0, Py_ssize_t b1) {
    const Py_ssize_t G = a->G, E = a->E, D = a->D;
    const int relu = a->relu;
    for (Py_ssize_t b = b0; b < b1; b++) {
        const float *w = a->w + b * a->wb;
        for (Py_ssize_t g = 0; g < G; g++) {
            float *restrict y = a->y[g] + b * a->yb[g];
            for (Py_ssize_t d = 0; d < D; d++) y[d] = 0.0f;
            for (Py_ssize_t e = 0; e < E; e++) {
                const float we = w[g * a->wg + e * a->we];
                const float *restrict xe = a->x[e] + b * a->xb[e];
                if (relu)
                    for (Py_ssize_t d = 0; d < D; d++) y[d] += we * (xe[d] < 0.0f ? 0.0f : xe[d]);
                else
                    for (Py_ssize_t d = 0; d < D; d++) y[d] += we * xe[d];
            }
        }
    }
}

SIMD_CLONES
static void mixture_backward_rows(const mixture_args *a, Py_ssize_t b0, Py_ssize_t b1) {
    const Py_ssize_t G = a->G, E = a->E, D = a->D, D16 = D - D % 16;
    const int relu = a->relu;
    for (Py_ssize_t b = b0; b < b1; b++) {
        const float *w = a->w + b * a->wb;
        if (a->gw != NULL)
            for (Py_ssize_t g = 0; g < G; g++)
                for (Py_ssize_t e = 0; e < E; e++) {
                    const float *restrict u = a->gy[g] + b * a->gyb[g], *restrict v = a->x[e] + b * a->xb[e];
                    float acc[16] = {0};
                    if (relu) {
                        for (Py_ssize_t d = 0; d < D16; d += 16)
                            for (int l = 0; l < 16; l++) acc[l] += u[d + l] * (v[d + l] < 0.0f ? 0.0f : v[d + l]);
                        for (Py_ssize_t d = D16; d < D; d++) acc[d - D16] += u[d] * (v[d] < 0.0f ? 0.0f : v[d]);
                    } else {
                        for (Py_ssize_t d = 0; d < D16; d += 16)
                            for (int l = 0; l < 16; l++) acc[l] += u[d + l] * v[d + l];
                        for (Py_ssize_t d = D16; d < D; d++) acc[d - D16] += u[d] * v[d];
                    }
                    float s = 0.0f;
                    for (int l = 0; l < 16; l++) s += acc[l];
                    a->gw[(b * G + g) * E + e] = s;
                }
        for (Py_ssize_t e = 0; e < E; e++) {
            if (a->gx[e] == NULL) continue;
            float *restrict gx = a->gx[e] + b * a->gxb[e];
            for (Py_ssize_t d = 0; d < D; d++) gx[d] = 0.0f;
            for (Py_ssize_t g = 0; g < G; g++) {
                const float wg = w[g * a->wg + e * a->we];
                const float *restrict u = a->gy[g] + b * a->gyb[g];
                for (Py_ssize_t d = 0; d < D; d++) gx[d] += wg * u[d];
            }
            if (relu) {
                const float *restrict xe = a->x[e] + b * a->xb[e];
                for (Py_ssize_t d = 0; d < D; d++) gx[d] = xe[d] <= 0.0f ? 0.0f : gx[d];
            }
        }
    }
}

/* the rows [0, B) in blocks of 64, over the team when the work is large enough */
static void mixture_run(const mixture_args *a, Py_ssize_t B, int backward) {
    const int nt = team_size(B * a->G * a->E * a->D);
    (void)nt;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
#endif
    for (Py_ssize_t c = 0; c < (B + 63) / 64; c++) {
        const Py_ssize_t b0 = c * 64, b1 = b0 + 64 < B ? b0 + 64 : B;
        if (backward)
            mixture_backward_rows(a, b0, b1);
        else
            mixture_forward_rows(a, b0, b1);
    }
}

/* n addresses (0 allowed where `nullable`) and n sizes from two tuples */
static int get_rows(PyObject *ptrs, PyObject *strides, Py_ssize_t n, void **out, Py_ssize_t *st, int nullable) {
    if (!PyTuple_Check(ptrs) || !PyTuple_Check(strides) || PyTuple_GET_SIZE(ptrs) != n || PyTuple_GET_SIZE(strides) != n) {
        PyErr_Format(PyExc_ValueError, "mixture: expected tuples of %zd addresses and %zd row strides", n, n);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (get_ptr(PyTuple_GET_ITEM(ptrs, i), &out[i]) || get_size(PyTuple_GET_ITEM(strides, i), &st[i])) return -1;
        if (out[i] == NULL && !nullable) {
            PyErr_SetString(PyExc_ValueError, "mixture: a null address");
            return -1;
        }
    }
    return 0;
}

/* the arguments both directions share: G, E, D, B, relu, w, wb, wg, we, xs, xbs (args[0..10]) */
static int mixture_common(mixture_args *a, PyObject *const *args, Py_ssize_t *B) {
    void *w;
    Py_ssize_t relu;
    if (get_size(args[0], &a->G) || get_size(args[1], &a->E) || get_size(args[2], &a->D)) return -1;
    if (a->G < 1 || a->E < 1 || a->G > MAX_MIX || a->E > MAX_MIX || a->D < 0) {
        PyErr_Format(PyExc_ValueError, "mixture: %zd gates over %zd experts (1..%d each)", a->G, a->E, MAX_MIX);
        return -1;
    }
    if (get_size(args[3], B) || get_size(args[4], &relu) || get_ptr(args[5], &w) || get_size(args[6], &a->wb)
        || get_size(args[7], &a->wg) || get_size(args[8], &a->we) || get_rows(args[9], args[10], a->E, (void **)a->x, a->xb, 0))
        return -1;
    a->w = w, a->relu = relu != 0;
    return 0;
}

/* mixture_forward(G, E, D, B, relu, w, wb, wg, we, xs, xbs, ys, ybs) -> None */
static PyObject *mixture_forward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 13) {
        PyErr_SetString(PyExc_TypeError, "mixture_forward takes 13 arguments");
        return NULL;
    }
    mixture_args *a = calloc(1, sizeof(mixture_args));
    if (a == NULL) return PyErr_NoMemory();
    Py_ssize_t B;
    if (mixture_common(a, args, &B) || get_rows(args[11], args[12], a->G, (void **)a->y, a->yb, 0)) {
        free(a);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    mixture_run(a, B, 0);
    Py_END_ALLOW_THREADS
    free(a);
    Py_RETURN_NONE;
}

/* mixture_backward(G, E, D, B, relu, w, wb, wg, we, xs, xbs, gys, gybs, gw, gxs, gxbs) -> None:
 * gw [B, G, E] contiguous or 0 (not wanted); an expert's gx address 0: not wanted */
static PyObject *mixture_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 16) {
        PyErr_SetString(PyExc_TypeError, "mixture_backward takes 16 arguments");
        return NULL;
    }
    mixture_args *a = calloc(1, sizeof(mixture_args));
    if (a == NULL) return PyErr_NoMemory();
    void *gw;
    Py_ssize_t B;
    if (mixture_common(a, args, &B) || get_rows(args[11], args[12], a->G, (void **)a->gy, a->gyb, 0)
        || get_ptr(args[13], &gw) || get_rows(args[14], args[15], a->E, (void **)a->gx, a->gxb, 1)) {
        free(a);
        return NULL;
    }
    a->gw = gw;
    Py_BEGIN_ALLOW_THREADS
    mixture_run(a, B, 1);
    Py_END_ALLOW_THREADS
    free(a);
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------
 * bias_act / bias_act_backward / tower_logits / tower_logits_backward: the passes around the
 * dense arch's GEMMs (dlrm_mtl/modules/fused_affine.py).
 *
 * ATen's CPU addmm copies the bias into every output row and then runs its GEMM with beta = 1;
 * the ReLU is a pass of its own, its backward another, and the bias gradient (a column sum of
 * the ReLU's gradient) another: four passes over a [B, N] activation besides the GEMMs. Here
 * the GEMM writes its product (mm) and one pass each way does the rest. G groups of R rows
 * (row r of group g at y + g gs + r ld, N contiguous floats; the group's bias row b + g N):
 *   bias_act:           y[r, n] = act(y[r, n] + b[n])      (in place; act: ReLU, y < 0 ? 0 : y,
 *                                                            or the identity)
 *   bias_act_backward:  gp[r, n] = relu && y[r, n] <= 0 ? 0 : g[r, n]  (y: the forward's
 *                       output; ReLU's backward as ATen's threshold_backward writes it)
 *                       gb[n] = sum_r gp[r, n]   (per group; every pointer its own row stride)
 * The towers' logit layer: T towers of hidden width K, the hidden row (b, t) at
 * h + t st + b sb (K contiguous floats, after its ReLU), logit weights w [T, K], biases c [T]:
 *   tower_logits:           z[b, t] = dot(h_bt, w_t) + c_t                     (z [B, T]), after
 *                           h_bt = ReLU(h_bt + hb_t) in place where the hidden bias hb [T, K]
 *                           is given (bias_act's arithmetic: the hidden layer's pass joined)
 *   tower_logits_backward:  with g = dL/dz [B, T] (contiguous):
 *       gp_bt[k] = h_bt[k] <= 0 ? 0 : g[b, t] w_t[k]  (the hidden layer's pre-activation
 *                                                       gradient, at gp + t st + b sb)
 *       gw_t[k] = sum_b g[b, t] h_bt[k];   gc_t = sum_b g[b, t];   gh_t[k] = sum_b gp_bt[k]
 * (the hidden layer's bias gradient gh: its ReLU's backward and the logit layer's in one pass).
 * A dot runs in 16 partial sums as dot_lanes does. Sums over rows run per block of 64 rows
 * (rows in order), then over the blocks in order: the same float operations whatever the
 * number of threads.
 */
#define ROW_BLOCK 64

SIMD_CLONES
static void bias_act_rows(float *restrict y, Py_ssize_t ld, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t N,
                          const float *restrict b, int relu) {
    for (Py_ssize_t r = r0; r < r1; r++) {
        float *restrict row = y + r * ld;
        if (relu)
            for (Py_ssize_t n = 0; n < N; n++) {
                const float v = row[n] + b[n];
                row[n] = v < 0.0f ? 0.0f : v;
            }
        else
            for (Py_ssize_t n = 0; n < N; n++) row[n] += b[n];
    }
}

/* Column sums over a block's rows kept in registers: GCC's generic vectors of 16 floats (one
 * AVX-512 register, two AVX2 ones), loaded and stored with memcpy (any alignment). Written
 * as plain arrays, the sums stayed in memory (loaded, added and stored again for every row)
 * and the pass ran at 0.6x the speed of one that keeps them in registers. */
typedef float vf16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
#define VLOAD(v, p) memcpy(&(v), (p), sizeof(vf16))
#define VSTORE(p, v) memcpy((p), &(v), sizeof(vf16))

/* columns n0 .. n0 + 16 NV of rows r0 .. r1 of bias_act_backward, their sums into part + n0 */
#define DEFINE_ACT_BACK_CHUNK(NV)                                                                    \
    static inline __attribute__((always_inline)) void act_back_chunk_##NV(                           \
        const float *restrict g, Py_ssize_t gld, const float *restrict y, Py_ssize_t yld, float *restrict gp, \
        Py_ssize_t pld, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t n0, int relu, float *restrict part) { \
        const vf16 zero = {0.0f};                                                                    \
        vf16 acc[NV];                                                                                \
        for (int i = 0; i < NV; i++) acc[i] = zero;                                                  \
        for (Py_ssize_t r = r0; r < r1; r++) {                                                       \
            const float *gr = g + r * gld + n0, *yr = y + r * yld + n0;                              \
            float *pr = gp + r * pld + n0;                                                           \
            for (int i = 0; i < NV; i++) {                                                           \
                vf16 v, m;                                                                           \
                VLOAD(v, gr + 16 * i);                                                               \
                if (relu) {                                                                          \
                    VLOAD(m, yr + 16 * i);                                                           \
                    v = (vf16)((vi16)v & ~(vi16)(m <= zero));                                        \
                }                                                                                    \
                VSTORE(pr + 16 * i, v);                                                              \
                acc[i] += v;                                                                         \
            }                                                                                        \
        }                                                                                            \
        for (int i = 0; i < NV; i++) VSTORE(part + n0 + 16 * i, acc[i]);                             \
    }
DEFINE_ACT_BACK_CHUNK(8)
DEFINE_ACT_BACK_CHUNK(4)
DEFINE_ACT_BACK_CHUNK(1)

/* a block's rows r0 .. r1 of ReLU's backward (or a copy) into gp, their column sums into part
 * [N]: 128, 64 or 16 columns at a time, the rest one by one */
SIMD_CLONES
static void bias_act_back_rows(const float *restrict g, Py_ssize_t gld, const float *restrict y, Py_ssize_t yld,
                               float *restrict gp, Py_ssize_t pld, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t N,
                               int relu, float *restrict part) {
    Py_ssize_t n0 = 0;
    for (; n0 + 128 <= N; n0 += 128) act_back_chunk_8(g, gld, y, yld, gp, pld, r0, r1, n0, relu, part);
    for (; n0 + 64 <= N; n0 += 64) act_back_chunk_4(g, gld, y, yld, gp, pld, r0, r1, n0, relu, part);
    for (; n0 + 16 <= N; n0 += 16) act_back_chunk_1(g, gld, y, yld, gp, pld, r0, r1, n0, relu, part);
    for (Py_ssize_t n = n0; n < N; n++) part[n] = 0.0f;
    for (Py_ssize_t r = r0; r < r1 && n0 < N; r++)
        for (Py_ssize_t n = n0; n < N; n++) {
            const float gv = g[r * gld + n];
            const float v = relu && y[r * yld + n] <= 0.0f ? 0.0f : gv;
            gp[r * pld + n] = v;
            part[n] += v;
        }
}

/* the G groups' blocks of ROW_BLOCK rows: block i is group i / nb, rows (i % nb) ROW_BLOCK .. */
#define GROUP_BLOCKS(R) (((R) + ROW_BLOCK - 1) / ROW_BLOCK)

/* the end of the row block that starts at r0, of R rows */
static inline Py_ssize_t block_end(Py_ssize_t r0, Py_ssize_t R) { return r0 + ROW_BLOCK < R ? r0 + ROW_BLOCK : R; }

/* 0 where the three sizes are >= 0, else -1 with a ValueError naming the kernel */
static int nonneg_sizes(const char *kernel, Py_ssize_t a, Py_ssize_t b, Py_ssize_t c) {
    if (a >= 0 && b >= 0 && c >= 0) return 0;
    PyErr_Format(PyExc_ValueError, "%s: negative sizes", kernel);
    return -1;
}

/* bias_act(y, G, gs, R, ld, N, b, relu) -> None */
static PyObject *bias_act(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "bias_act takes 8 arguments");
        return NULL;
    }
    void *y, *b;
    Py_ssize_t G, gs, R, ld, N, relu;
    if (get_ptr(args[0], &y) || get_size(args[1], &G) || get_size(args[2], &gs) || get_size(args[3], &R)
        || get_size(args[4], &ld) || get_size(args[5], &N) || get_ptr(args[6], &b) || get_size(args[7], &relu))
        return NULL;
    if (nonneg_sizes("bias_act", G, R, N)) return NULL;
    const Py_ssize_t nb = GROUP_BLOCKS(R);
    const int nt = team_size(G * R * N);
    (void)nt;
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
#endif
    for (Py_ssize_t i = 0; i < G * nb; i++) {
        const Py_ssize_t grp = i / nb, r0 = (i % nb) * ROW_BLOCK, r1 = block_end(r0, R);
        bias_act_rows((float *)y + grp * gs, ld, r0, r1, N, (const float *)b + grp * N, relu != 0);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* bias_act_backward(g, ggs, gld, y, ygs, yld, gp, pgs, pld, G, R, N, gb, relu) -> None:
 * gb [G, N] contiguous, or 0 (not wanted) */
static PyObject *bias_act_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 14) {
        PyErr_SetString(PyExc_TypeError, "bias_act_backward takes 14 arguments");
        return NULL;
    }
    void *g, *y, *gp, *gb;
    Py_ssize_t ggs, gld, ygs, yld, pgs, pld, G, R, N, relu;
    if (get_ptr(args[0], &g) || get_size(args[1], &ggs) || get_size(args[2], &gld) || get_ptr(args[3], &y)
        || get_size(args[4], &ygs) || get_size(args[5], &yld) || get_ptr(args[6], &gp) || get_size(args[7], &pgs)
        || get_size(args[8], &pld) || get_size(args[9], &G) || get_size(args[10], &R) || get_size(args[11], &N)
        || get_ptr(args[12], &gb) || get_size(args[13], &relu))
        return NULL;
    if (nonneg_sizes("bias_act_backward", G, R, N)) return NULL;
    const Py_ssize_t nb = GROUP_BLOCKS(R);
    void *base;
    float *part = scratch64((size_t)(G * nb * N + 1) * sizeof(float), &base);
    if (part == NULL) return PyErr_NoMemory();
    const int nt = team_size(G * R * N);
    (void)nt;
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
#endif
    for (Py_ssize_t i = 0; i < G * nb; i++) {
        const Py_ssize_t grp = i / nb, r0 = (i % nb) * ROW_BLOCK, r1 = block_end(r0, R);
        bias_act_back_rows((const float *)g + grp * ggs, gld, (const float *)y + grp * ygs, yld, (float *)gp + grp * pgs,
                           pld, r0, r1, N, relu != 0, part + i * N);
    }
    if (gb != NULL)
        for (Py_ssize_t grp = 0; grp < G; grp++) {
            float *restrict o = (float *)gb + grp * N;
            for (Py_ssize_t n = 0; n < N; n++) o[n] = 0.0f;
            for (Py_ssize_t i = grp * nb; i < (grp + 1) * nb; i++)
                for (Py_ssize_t n = 0; n < N; n++) o[n] += part[i * N + n];
        }
    Py_END_ALLOW_THREADS
    free(base);
    Py_RETURN_NONE;
}

SIMD_CLONES
static void tower_logits_rows(float *restrict h, Py_ssize_t st, Py_ssize_t sb, Py_ssize_t T, Py_ssize_t K,
                              const float *restrict hb, const float *restrict w, const float *restrict c,
                              float *restrict z, Py_ssize_t b0, Py_ssize_t b1) {
    for (Py_ssize_t b = b0; b < b1; b++)
        for (Py_ssize_t t = 0; t < T; t++) {
            float *restrict hr = h + t * st + b * sb;
            if (hb != NULL) { /* the hidden layer's bias and ReLU first, as bias_act */
                const float *restrict bt = hb + t * K;
                for (Py_ssize_t k = 0; k < K; k++) {
                    const float v = hr[k] + bt[k];
                    hr[k] = v < 0.0f ? 0.0f : v;
                }
            }
            z[b * T + t] = dot16(hr, w + t * K, K) + c[t];
        }
}

/* tower t's columns k0 .. k0 + 16 NV of rows b0 .. b1 of tower_logits_backward, its sums into
 * pw + k0 and ph + k0 */
#define DEFINE_TOWER_BACK_CHUNK(NV)                                                                  \
    static inline __attribute__((always_inline)) void tower_back_chunk_##NV(                         \
        const float *restrict g, Py_ssize_t T, Py_ssize_t t, const float *restrict h, Py_ssize_t sb,   \
        const float *restrict wt, float *restrict gp, Py_ssize_t b0, Py_ssize_t b1, Py_ssize_t k0,     \
        float *restrict pw, float *restrict ph) {                                                    \
        const vf16 zero = {0.0f};                                                                    \
        vf16 aw[NV], ah[NV], w[NV];                                                                  \
        for (int i = 0; i < NV; i++) {                                                               \
            aw[i] = ah[i] = zero;                                                                    \
            VLOAD(w[i], wt + k0 + 16 * i);                                                           \
        }                                                                                            \
        for (Py_ssize_t b = b0; b < b1; b++) {                                                       \
            const float gbt = g[b * T + t];                                                          \
            const float *hr = h + b * sb + k0;                                                       \
            float *pr = gp + b * sb + k0;                                                            \
            for (int i = 0; i < NV; i++) {                                                           \
                vf16 hv, v;                                                                          \
                VLOAD(hv, hr + 16 * i);                                                              \
                v = gbt * w[i];                                                                      \
                v = (vf16)((vi16)v & ~(vi16)(hv <= zero));                                           \
                VSTORE(pr + 16 * i, v);                                                              \
                ah[i] += v;                                                                          \
                aw[i] += gbt * hv;                                                                   \
            }                                                                                        \
        }                                                                                            \
        for (int i = 0; i < NV; i++) {                                                               \
            VSTORE(pw + k0 + 16 * i, aw[i]);                                                         \
            VSTORE(ph + k0 + 16 * i, ah[i]);                                                         \
        }                                                                                            \
    }
DEFINE_TOWER_BACK_CHUNK(4)
DEFINE_TOWER_BACK_CHUNK(1)

/* a block's rows b0 .. b1 of the towers' backward; per tower t its sums gw_t [K], gh_t [K],
 * gc_t into part + t (2K + 1): 64 or 16 columns at a time, the rest one by one */
SIMD_CLONES
static void tower_back_rows(const float *restrict g, const float *restrict h, Py_ssize_t st, Py_ssize_t sb,
                            Py_ssize_t T, Py_ssize_t K, const float *restrict w, float *restrict gp, Py_ssize_t b0,
                            Py_ssize_t b1, float *restrict part) {
    const Py_ssize_t P = 2 * K + 1;
    for (Py_ssize_t t = 0; t < T; t++) {
        float *restrict pw = part + t * P, *restrict ph = pw + K;
        const float *restrict wt = w + t * K, *restrict ht = h + t * st;
        float *restrict gt = gp + t * st;
        float gc = 0.0f;
        for (Py_ssize_t b = b0; b < b1; b++) gc += g[b * T + t];
        pw[2 * K] = gc;
        Py_ssize_t k0 = 0;
        for (; k0 + 64 <= K; k0 += 64) tower_back_chunk_4(g, T, t, ht, sb, wt, gt, b0, b1, k0, pw, ph);
        for (; k0 + 16 <= K; k0 += 16) tower_back_chunk_1(g, T, t, ht, sb, wt, gt, b0, b1, k0, pw, ph);
        for (Py_ssize_t k = k0; k < K; k++) pw[k] = ph[k] = 0.0f;
        for (Py_ssize_t b = b0; b < b1 && k0 < K; b++) {
            const float gbt = g[b * T + t];
            for (Py_ssize_t k = k0; k < K; k++) {
                const float hv = ht[b * sb + k];
                const float v = hv <= 0.0f ? 0.0f : gbt * wt[k];
                gt[b * sb + k] = v;
                ph[k] += v;
                pw[k] += gbt * hv;
            }
        }
    }
}

/* tower_logits(h, st, sb, T, K, B, hb, w, c, z) -> None: hb [T, K] contiguous (the hidden
 * layer's bias, applied with its ReLU to h in place first), or 0 (h is final) */
static PyObject *tower_logits(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "tower_logits takes 10 arguments");
        return NULL;
    }
    void *h, *hb, *w, *c, *z;
    Py_ssize_t st, sb, T, K, B;
    if (get_ptr(args[0], &h) || get_size(args[1], &st) || get_size(args[2], &sb) || get_size(args[3], &T)
        || get_size(args[4], &K) || get_size(args[5], &B) || get_ptr(args[6], &hb) || get_ptr(args[7], &w)
        || get_ptr(args[8], &c) || get_ptr(args[9], &z))
        return NULL;
    if (nonneg_sizes("tower_logits", T, K, B)) return NULL;
    const Py_ssize_t nb = GROUP_BLOCKS(B);
    const int nt = team_size(B * T * K);
    (void)nt;
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
#endif
    for (Py_ssize_t i = 0; i < nb; i++)
        tower_logits_rows(h, st, sb, T, K, hb, w, c, z, i * ROW_BLOCK, block_end(i * ROW_BLOCK, B));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* tower_logits_backward(g, h, st, sb, T, K, B, w, gp, gw, gc, gh) -> None: gp laid out as h;
 * gw [T, K], gc [T], gh [T, K] contiguous */
static PyObject *tower_logits_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 12) {
        PyErr_SetString(PyExc_TypeError, "tower_logits_backward takes 12 arguments");
        return NULL;
    }
    void *g, *h, *w, *gp, *gw, *gc, *gh;
    Py_ssize_t st, sb, T, K, B;
    if (get_ptr(args[0], &g) || get_ptr(args[1], &h) || get_size(args[2], &st) || get_size(args[3], &sb)
        || get_size(args[4], &T) || get_size(args[5], &K) || get_size(args[6], &B) || get_ptr(args[7], &w)
        || get_ptr(args[8], &gp) || get_ptr(args[9], &gw) || get_ptr(args[10], &gc) || get_ptr(args[11], &gh))
        return NULL;
    if (nonneg_sizes("tower_logits_backward", T, K, B)) return NULL;
    const Py_ssize_t nb = GROUP_BLOCKS(B), P = 2 * K + 1;
    void *base;
    float *part = scratch64((size_t)(nb * T * P + 1) * sizeof(float), &base);
    if (part == NULL) return PyErr_NoMemory();
    const int nt = team_size(B * T * K);
    (void)nt;
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
#endif
    for (Py_ssize_t i = 0; i < nb; i++)
        tower_back_rows(g, h, st, sb, T, K, w, gp, i * ROW_BLOCK, block_end(i * ROW_BLOCK, B), part + i * T * P);
    for (Py_ssize_t t = 0; t < T; t++) {
        float *restrict ow = (float *)gw + t * K, *restrict oh = (float *)gh + t * K, *restrict oc = (float *)gc + t;
        for (Py_ssize_t k = 0; k < K; k++) ow[k] = oh[k] = 0.0f;
        *oc = 0.0f;
        for (Py_ssize_t i = 0; i < nb; i++) {
            const float *p = part + (i * T + t) * P;
            for (Py_ssize_t k = 0; k < K; k++) {
                ow[k] += p[k];
                oh[k] += p[K + k];
            }
            *oc += p[2 * K];
        }
    }
    Py_END_ALLOW_THREADS
    free(base);
    Py_RETURN_NONE;
}

/* lookup_plan(ids, offsets, F, B, single, N, T, thread_of): feature_threads for T threads into
 * thread_of (int32 [F]); returns the number of feature groups (tests read the plan) */
static PyObject *lookup_plan(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "lookup_plan takes 8 arguments");
        return NULL;
    }
    void *ids, *offsets, *out;
    Py_ssize_t F, B, single, N, T;
    if (get_ptr(args[0], &ids) || get_ptr(args[1], &offsets) || get_size(args[2], &F) || get_size(args[3], &B)
        || get_size(args[4], &single) || get_size(args[5], &N) || get_size(args[6], &T) || get_ptr(args[7], &out))
        return NULL;
    if (T < 1 || T > 4096 || F < 0) {
        PyErr_Format(PyExc_ValueError, "lookup_plan: %zd threads, %zd features", T, F);
        return NULL;
    }
    if (check_bags(ids, offsets, F, B, INT64_MAX, (int)single, N)) return NULL;
    int64_t *load = malloc((size_t)T * sizeof(int64_t)), *fs = malloc((size_t)(F > 0 ? F : 1) * 5 * sizeof(int64_t));
    if (load == NULL || fs == NULL) {
        free(load), free(fs);
        return PyErr_NoMemory();
    }
    const Py_ssize_t G = feature_threads(ids, offsets, F, B, (int)single, (int)T, out, load, fs);
    free(load), free(fs);
    return PyLong_FromSsize_t(G);
}

/* set_one_thread(flag): keep every kernel on the calling thread (flag 1) or let the lookup use
 * its OpenMP team (0) */
static PyObject *set_one_thread(PyObject *self, PyObject *arg) {
    (void)self;
    const long v = PyLong_AsLong(arg);
    if (v == -1 && PyErr_Occurred()) return NULL;
    one_thread = v != 0;
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------
 * take_rows / take_lists: the reader's shuffle (dlrm_mtl.data.batch_columns.BatchColumns.take),
 * rows of a buffer's columns gathered in a new order.
 *
 * take_rows(idx, n, rows, threads, specs...): for each array, given as five integers
 * (src, src row stride in bytes, dst, dst row stride in bytes, row bytes), dst row i = src
 * row idx[i], i < n. Every idx must lie in [0, rows) (IndexError otherwise, nothing written).
 * A column of a single-hot id matrix [m, rows] gathered along its rows is one array per
 * matrix row (row bytes 8, strides 8).
 * take_lists(idx, n, rows, threads, lens, offs, vals, new_offs, out): a list column's rows
 * idx: out[new_offs[i] .. new_offs[i + 1]) = vals[offs[idx[i]] ..] (int64 values and offsets;
 * new_offs, the cumulative sums of lens[idx], from the caller). Both split the rows i over
 * `threads` threads (plain copies: the same bytes on any number of threads).
 */
static int check_idx(const int64_t *idx, Py_ssize_t n, Py_ssize_t rows) {
    int64_t bad = 0;
    for (Py_ssize_t i = 0; i < n; i++) bad |= (idx[i] < 0) | (idx[i] >= rows);
    if (!bad) return 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (idx[i] < 0 || idx[i] >= rows) {
            PyErr_Format(PyExc_IndexError, "take: index %lld at position %zd is out of range for %zd rows",
                         (long long)idx[i], i, rows);
            break;
        }
    return -1;
}

static int take_threads(Py_ssize_t threads, Py_ssize_t work) {
#ifdef _OPENMP
    if (threads > 1 && work >= PAR_MIN && !one_thread && !omp_in_parallel()) return (int)threads;
#else
    (void)work, (void)threads;
#endif
    return 1;
}

#define TAKE_LOOP(T_)                                                                                   \
    for (Py_ssize_t i = i0; i < i1; i++) memcpy(d + i * ds, s + idx[i] * ss, sizeof(T_))

static void take_array(const int64_t *restrict idx, Py_ssize_t i0, Py_ssize_t i1, const char *restrict s, Py_ssize_t ss,
                       char *restrict d, Py_ssize_t ds, Py_ssize_t rb) {
    switch (rb) { /* fixed sizes: the copy is one load and store */
    case 1: TAKE_LOOP(uint8_t); return;
    case 2: TAKE_LOOP(uint16_t); return;
    case 4: TAKE_LOOP(uint32_t); return;
    case 8: TAKE_LOOP(uint64_t); return;
    case 12: for (Py_ssize_t i = i0; i < i1; i++) memcpy(d + i * ds, s + idx[i] * ss, 12); return;
    case 16: for (Py_ssize_t i = i0; i < i1; i++) memcpy(d + i * ds, s + idx[i] * ss, 16); return;
    default: for (Py_ssize_t i = i0; i < i1; i++) memcpy(d + i * ds, s + idx[i] * ss, (size_t)rb);
    }
}

static PyObject *take_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs < 4 || (nargs - 4) % 5) {
        PyErr_SetString(PyExc_TypeError, "take_rows takes idx, n, rows, threads and five integers per array");
        return NULL;
    }
    void *idx_ptr;
    Py_ssize_t n, rows, threads;
    if (get_ptr(args[0], &idx_ptr) || get_size(args[1], &n) || get_size(args[2], &rows) || get_size(args[3], &threads))
        return NULL;
    const Py_ssize_t A = (nargs - 4) / 5;
    char **src = malloc((size_t)(A ? A : 1) * 2 * sizeof(char *));
    Py_ssize_t *st = malloc((size_t)(A ? A : 1) * 3 * sizeof(Py_ssize_t));
    if (src == NULL || st == NULL) {
        free(src), free(st);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t a = 0; a < A; a++) {
        PyObject *const *f = args + 4 + a * 5;
        void *s, *d;
        if (get_ptr(f[0], &s) || get_size(f[1], &st[3 * a]) || get_ptr(f[2], &d) || get_size(f[3], &st[3 * a + 1])
            || get_size(f[4], &st[3 * a + 2])) {
            free(src), free(st);
            return NULL;
        }
        src[2 * a] = s, src[2 * a + 1] = d;
    }
    const int64_t *idx = idx_ptr;
    if (n < 0 || check_idx(idx, n, rows)) {
        if (n < 0) PyErr_SetString(PyExc_ValueError, "take_rows: negative n");
        free(src), free(st);
        return NULL;
    }
    Py_ssize_t bytes = 0;
    for (Py_ssize_t a = 0; a < A; a++) bytes += st[3 * a + 2];
    const int T = take_threads(threads, n * (bytes / 4 + 1));
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
#pragma omp parallel for num_threads(T) schedule(static) if (T > 1)
#endif
    for (int t = 0; t < T; t++) {
        const Py_ssize_t i0 = n * t / T, i1 = n * (t + 1) / T;
        for (Py_ssize_t a = 0; a < A; a++)
            take_array(idx, i0, i1, src[2 * a], st[3 * a], src[2 * a + 1], st[3 * a + 1], st[3 * a + 2]);
    }
    Py_END_ALLOW_THREADS
    free(src), free(st);
    Py_RETURN_NONE;
}

static PyObject *take_lists(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "take_lists takes 9 arguments");
        return NULL;
    }
    void *idx_ptr, *lens_ptr, *offs_ptr, *vals_ptr, *new_ptr, *out_ptr;
    Py_ssize_t n, rows, threads;
    if (get_ptr(args[0], &idx_ptr) || get_size(args[1], &n) || get_size(args[2], &rows) || get_size(args[3], &threads)
        || get_ptr(args[4], &lens_ptr) || get_ptr(args[5], &offs_ptr) || get_ptr(args[6], &vals_ptr)
        || get_ptr(args[7], &new_ptr) || get_ptr(args[8], &out_ptr))
        return NULL;
    const int64_t *idx = idx_ptr, *offs = offs_ptr, *vals = vals_ptr, *new_offs = new_ptr;
    const int32_t *lens = lens_ptr;
    int64_t *out = out_ptr;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "take_lists: negative n");
        return NULL;
    }
    if (check_idx(idx, n, rows)) return NULL;
    const int T = take_threads(threads, n > 0 ? n + new_offs[n] : 0);
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
#pragma omp parallel for num_threads(T) schedule(static) if (T > 1)
#endif
    for (int t = 0; t < T; t++) {
        const Py_ssize_t i0 = n * t / T, i1 = n * (t + 1) / T;
        for (Py_ssize_t i = i0; i < i1; i++) {
            const int64_t r = idx[i], a = offs[r];
            const int32_t len = lens[r];
            int64_t *o = out + new_offs[i];
            for (int32_t j = 0; j < len; j++) o[j] = vals[a + j];
        }
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------
 * metric_pairs: an evaluation batch's binary views added to the metrics' sums and AUC
 * histograms (dlrm_mtl.metrics.MetricAccumulator.update).
 *
 * metric_pairs(N, V, rows, views, Vb, leaf, S, y, p, ll, bins, obins, sums, hist, ohist, BINS):
 * for each binary view v = views[j] (j < Vb, in order) and each row n < N (in order) with
 * rows[n, v] != 0, the pair's slot s = v S + leaf[n] gets sums[s] += (1, y, p, ll, 0, 0, y, 0)
 * (the metrics' _SUMS; y, p, ll: [N, V] float64 label, probability and log loss) and
 * hist[(2 s + y) BINS + bins[n, v]] += 1 (int64 [N, V] histogram bins), and where obins is
 * given ohist likewise at obins[n, v] (the oracle's AUC). The pairs are added in the order a
 * loop over the views, then the rows, adds them: every float64 sum is the one index_add_ of
 * the pairs computes. Leaves outside [0, S), bins outside [0, BINS) or a label whose class
 * (int64)y is not 0 or 1: ValueError, nothing added.
 */
static PyObject *metric_pairs(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 16) {
        PyErr_SetString(PyExc_TypeError, "metric_pairs takes 16 arguments");
        return NULL;
    }
    Py_ssize_t N, V, Vb, S, BINS;
    void *rows_p, *views_p, *leaf_p, *y_p, *p_p, *ll_p, *bins_p, *obins_p, *sums_p, *hist_p, *ohist_p;
    if (get_size(args[0], &N) || get_size(args[1], &V) || get_ptr(args[2], &rows_p) || get_ptr(args[3], &views_p)
        || get_size(args[4], &Vb) || get_ptr(args[5], &leaf_p) || get_size(args[6], &S) || get_ptr(args[7], &y_p)
        || get_ptr(args[8], &p_p) || get_ptr(args[9], &ll_p) || get_ptr(args[10], &bins_p) || get_ptr(args[11], &obins_p)
        || get_ptr(args[12], &sums_p) || get_ptr(args[13], &hist_p) || get_ptr(args[14], &ohist_p) || get_size(args[15], &BINS))
        return NULL;
    const uint8_t *rows = rows_p;
    const int64_t *views = views_p, *leaf = leaf_p, *bins = bins_p, *obins = obins_p;
    const double *y = y_p, *p = p_p, *ll = ll_p;
    double *sums = sums_p;
    int64_t *hist = hist_p, *ohist = ohist_p;
    if (N < 0 || V < 0 || Vb < 0 || S <= 0 || BINS <= 0) {
        PyErr_SetString(PyExc_ValueError, "metric_pairs: bad sizes");
        return NULL;
    }
    for (Py_ssize_t j = 0; j < Vb; j++)
        if (views[j] < 0 || views[j] >= V) {
            PyErr_Format(PyExc_ValueError, "metric_pairs: view %lld outside [0, %zd)", (long long)views[j], V);
            return NULL;
        }
    for (Py_ssize_t n = 0; n < N; n++)
        if (leaf[n] < 0 || leaf[n] >= S) {
            PyErr_Format(PyExc_ValueError, "metric_pairs: row %zd's leaf scenario %lld outside [0, %zd)", n,
                         (long long)leaf[n], S);
            return NULL;
        }
    for (Py_ssize_t j = 0; j < Vb; j++)
        for (Py_ssize_t n = 0; n < N; n++) {
            const Py_ssize_t e = n * V + views[j];
            if (rows[e] && (bins[e] < 0 || bins[e] >= BINS || (obins && (obins[e] < 0 || obins[e] >= BINS)))) {
                PyErr_Format(PyExc_ValueError, "metric_pairs: row %zd's histogram bin outside [0, %zd)", n, BINS);
                return NULL;
            }
            if (rows[e] && !(y[e] > -1.0 && y[e] < 2.0)) { /* the histogram's class: (int64)y, 0 or 1 */
                PyErr_Format(PyExc_ValueError, "metric_pairs: row %zd's label %g is not a binary label", n, y[e]);
                return NULL;
            }
        }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t j = 0; j < Vb; j++) {
        const int64_t v = views[j];
        for (Py_ssize_t n = 0; n < N; n++) {
            const Py_ssize_t e = n * V + v;
            if (!rows[e]) continue;
            const int64_t slot = v * S + leaf[n];
            const double yv = y[e];
            double *sm = sums + slot * 8;
            sm[0] += 1.0, sm[1] += yv, sm[2] += p[e], sm[3] += ll[e];
            sm[4] += 0.0, sm[5] += 0.0, sm[6] += yv, sm[7] += 0.0;
            const int64_t base = (slot * 2 + (int64_t)yv) * BINS;
            hist[base + bins[e]] += 1;
            if (obins) ohist[base + obins[e]] += 1;
        }
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------
 * hist_aucs: the AUCs of an evaluation's histograms (dlrm_mtl.metrics.MetricAccumulator.compute).
 *
 * hist_aucs(hist, V, S, BINS, out): hist int64 [V, S, 2, BINS] (per view and leaf scenario,
 * negatives then positives, ascending bins) -> out float64 [V, S + 1, 2]: per view, slice 0
 * (every leaf's counts summed: "all") then each leaf, (AUC, its maximum error):
 *   AUC = sum_b n1_b (N0_below_b + n0_b / 2) / (N1 N0),  error = sum_b n1_b n0_b / 2 / (N1 N0),
 * NaN where a class is missing. The sums are kept in exact integers (twice the AUC's
 * numerator) and divided once: the value metrics.histogram_auc computes in float64 (whose
 * sums are exact below 2^53), in one pass over the bins instead of a dozen numpy passes per
 * slice. Returns False (out unspecified) where a slice's 2 N1 N0 does not fit 64 bits
 * (billions of rows of each class: the caller takes numpy's float64 path).
 */
static PyObject *hist_aucs(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "hist_aucs takes 5 arguments");
        return NULL;
    }
    void *hist_p, *out_p;
    Py_ssize_t V, S, BINS;
    if (get_ptr(args[0], &hist_p) || get_size(args[1], &V) || get_size(args[2], &S) || get_size(args[3], &BINS)
        || get_ptr(args[4], &out_p))
        return NULL;
    if (V < 0 || S < 1 || BINS < 1) {
        PyErr_SetString(PyExc_ValueError, "hist_aucs: bad sizes");
        return NULL;
    }
    const int64_t *hist = hist_p;
    double *out = out_p;
    const Py_ssize_t L = S + 1; /* slices: all, then each leaf */
    uint64_t *acc = calloc((size_t)L * 2, sizeof(uint64_t)); /* 2 x numerator, sum n1 n0 */
    int64_t *cnt = calloc((size_t)L * 2, sizeof(int64_t));   /* N0 (so far: below the bin), N1 */
    if (acc == NULL || cnt == NULL) {
        free(acc), free(cnt);
        return PyErr_NoMemory();
    }
    int bad = 0, big = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t v = 0; v < V && !bad; v++) {
        memset(acc, 0, (size_t)L * 2 * sizeof(uint64_t));
        memset(cnt, 0, (size_t)L * 2 * sizeof(int64_t));
        const int64_t *hv = hist + v * S * 2 * BINS;
        for (Py_ssize_t b = 0; b < BINS; b++) {
            int64_t t0 = 0, t1 = 0;
            for (Py_ssize_t s = 0; s <= S; s++) {
                int64_t h0, h1;
                if (s < S) {
                    h0 = hv[(s * 2) * BINS + b], h1 = hv[(s * 2 + 1) * BINS + b];
                    if (h0 < 0 || h1 < 0) bad = 1;
                    t0 += h0, t1 += h1;
                } else {
                    h0 = t0, h1 = t1;
                }
                const Py_ssize_t l = s < S ? s + 1 : 0;
                if (h1) { /* below 2^64 while 2 N1 N0 is (checked below) */
                    acc[2 * l] += (uint64_t)h1 * (uint64_t)(2 * cnt[2 * l] + h0);
                    acc[2 * l + 1] += (uint64_t)h1 * (uint64_t)h0;
                }
                cnt[2 * l] += h0, cnt[2 * l + 1] += h1;
            }
        }
        for (Py_ssize_t l = 0; l < L; l++) {
            const double n1 = (double)cnt[2 * l + 1], n0 = (double)cnt[2 * l];
            double *o = out + (v * L + l) * 2;
            if (2.0 * n1 * n0 >= 1.8e19) big = 1;
            if (n1 == 0.0 || n0 == 0.0) {
                o[0] = o[1] = NAN;
                continue;
            }
            o[0] = (double)acc[2 * l] * 0.5 / (n1 * n0);
            o[1] = 0.5 * (double)acc[2 * l + 1] / (n1 * n0);
        }
    }
    Py_END_ALLOW_THREADS
    free(acc), free(cnt);
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "hist_aucs: negative histogram counts");
        return NULL;
    }
    if (big) Py_RETURN_FALSE;
    Py_RETURN_TRUE;
}

/* openmp_threads(): the team the lookup kernels would use on this thread (0: built without OpenMP) */
static PyObject *openmp_threads(PyObject *self, PyObject *unused) {
    (void)self, (void)unused;
#ifdef _OPENMP
    return PyLong_FromLong(team_size(PAR_MIN));
#else
    return PyLong_FromLong(0);
#endif
}

static PyMethodDef methods[] = {
    {"term_means_forward", (PyCFunction)(void (*)(void))term_means_forward, METH_FASTCALL,
     "Fused TermMeans forward on float32 CPU memory (see cpu_kernels.c)."},
    {"term_means_backward", (PyCFunction)(void (*)(void))term_means_backward, METH_FASTCALL,
     "Fused TermMeans backward on float32 CPU memory (see cpu_kernels.c)."},
    {"shift_ids", (PyCFunction)(void (*)(void))shift_ids, METH_FASTCALL,
     "Each feature's ids shifted by its table's first row (see cpu_kernels.c)."},
    {"pooled_sum", (PyCFunction)(void (*)(void))pooled_sum, METH_FASTCALL,
     "One-table embedding bags summed (see cpu_kernels.c)."},
    {"rowwise_adagrad_update", (PyCFunction)(void (*)(void))rowwise_adagrad_update, METH_FASTCALL,
     "One-table lookup's backward with exact row-wise Adagrad, in place (see cpu_kernels.c)."},
    {"folded_backward", (PyCFunction)(void (*)(void))folded_backward, METH_FASTCALL,
     "An affine map's backward on the one-table lookup's input, by table row, with row-wise Adagrad (see cpu_kernels.c)."},
    {"folded_rows_backward", (PyCFunction)(void (*)(void))folded_rows_backward, METH_FASTCALL,
     "An affine map's backward on a scenario level's rows, by row (see cpu_kernels.c)."},
    {"kjt_single_run", (PyCFunction)(void (*)(void))kjt_single_run, METH_FASTCALL,
     "A batch's KJT values, lengths and bag ends of a run of single-hot keys (see cpu_kernels.c)."},
    {"kjt_multi_key", (PyCFunction)(void (*)(void))kjt_multi_key, METH_FASTCALL,
     "A batch's KJT values, lengths and bag ends of one multi-hot key (see cpu_kernels.c)."},
    {"table_rows", (PyCFunction)(void (*)(void))table_rows, METH_FASTCALL,
     "A small table's rows for a batch's ids (see cpu_kernels.c)."},
    {"rows_by_id", (PyCFunction)(void (*)(void))rows_by_id, METH_FASTCALL,
     "Gradient rows summed by id into a small table's gradient (see cpu_kernels.c)."},
    {"float_math", (PyCFunction)(void (*)(void))float_math, METH_FASTCALL,
     "The loss passes' vectorised exp, log1p, expm1 and log on float32 values (tests)."},
    {"mixture_forward", (PyCFunction)(void (*)(void))mixture_forward, METH_FASTCALL,
     "Gated sums of expert outputs per row (mix_experts; see cpu_kernels.c)."},
    {"mixture_backward", (PyCFunction)(void (*)(void))mixture_backward, METH_FASTCALL,
     "The gated sums' gradients for the gates and the experts (see cpu_kernels.c)."},
    {"bias_act", (PyCFunction)(void (*)(void))bias_act, METH_FASTCALL,
     "An affine map's bias and ReLU on its product, in place (see cpu_kernels.c)."},
    {"bias_act_backward", (PyCFunction)(void (*)(void))bias_act_backward, METH_FASTCALL,
     "ReLU's backward and the bias gradient in one pass (see cpu_kernels.c)."},
    {"tower_logits", (PyCFunction)(void (*)(void))tower_logits, METH_FASTCALL,
     "The task towers' logit layer (see cpu_kernels.c)."},
    {"tower_logits_backward", (PyCFunction)(void (*)(void))tower_logits_backward, METH_FASTCALL,
     "The logit layer's and the last hidden layer's ReLU backward in one pass (see cpu_kernels.c)."},
    {"lookup_plan", (PyCFunction)(void (*)(void))lookup_plan, METH_FASTCALL,
     "Which thread updates each feature's rows in rowwise_adagrad_update (tests)."},
    {"take_rows", (PyCFunction)(void (*)(void))take_rows, METH_FASTCALL,
     "Rows of arrays gathered in a new order: the reader's shuffle (see cpu_kernels.c)."},
    {"take_lists", (PyCFunction)(void (*)(void))take_lists, METH_FASTCALL,
     "A list column's rows gathered in a new order (see cpu_kernels.c)."},
    {"metric_pairs", (PyCFunction)(void (*)(void))metric_pairs, METH_FASTCALL,
     "An evaluation batch's binary views added to the metrics' sums and AUC histograms (see cpu_kernels.c)."},
    {"hist_aucs", (PyCFunction)(void (*)(void))hist_aucs, METH_FASTCALL,
     "The AUCs and their error bounds of an evaluation's histograms (see cpu_kernels.c)."},
    {"set_one_thread", set_one_thread, METH_O,
     "1: every kernel on the calling thread; 0: the lookup on its OpenMP team (dlrm_mtl/native.py)."},
    {"openmp_threads", openmp_threads, METH_NOARGS,
     "The team the lookup kernels use on this thread; 0 without OpenMP (tests)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_kernels",
                                    "Fused host kernels of dlrm_mtl (float32, CPU).", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__cpu_kernels(void) { return PyModule_Create(&module); }
