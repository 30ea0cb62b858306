/* dlrm_mtl._cpu_kernels: fused host kernels for per-step work on small tensors.
 *
 * On a CPU, a training step spends much of its time outside the GEMMs in dozens of ATen
 * operators on [B, T]-sized tensors (B = batch, T = tasks), each of which costs a dispatch
 * (5-20 us here) for a few microseconds of arithmetic. The functions here do such a chain in
 * one pass over the rows. They take raw pointers and sizes (Python ints, from
 * Tensor.data_ptr()), work on contiguous float32 CPU memory only, and release the GIL while
 * they run. dlrm_mtl/native.py wraps them and says when they apply; every caller keeps its
 * ATen path (GPU, float64, and builds without this module), and tests compare the two.
 *
 * Built by setup.py (setuptools) at install time; plain C99, no Torch headers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

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

static int get_ptr(PyObject *o, void **out) {
    *out = PyLong_AsVoidPtr(o);
    return (*out == NULL && PyErr_Occurred()) ? -1 : 0;
}

static int get_size(PyObject *o, Py_ssize_t *out) {
    *out = PyLong_AsSsize_t(o);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

/* term_means_forward(z, y, r, lam, B, T, K, src, is_entire, log_prob, negated,
 *                    per, D, sig_pos, sig_neg, colsum) -> None
 * z [B,T], y [B,K], r [B,K], lam [B] or 0, src int64 [K], is_entire uint8 [K],
 * log_prob [(negated ? 2T : T), K]; outputs per [K], D [B,K], sig_pos, sig_neg [B,T];
 * colsum: double scratch [K]. */
static PyObject *term_means_forward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 16) {
        PyErr_SetString(PyExc_TypeError, "term_means_forward takes 16 arguments");
        return NULL;
    }
    void *p[16];
    Py_ssize_t B, T, K, negated;
    for (int i = 0; i < 4; i++)
        if (get_ptr(args[i], &p[i])) return NULL;
    if (get_size(args[4], &B) || get_size(args[5], &T) || get_size(args[6], &K)) return NULL;
    for (int i = 7; i < 10; i++)
        if (get_ptr(args[i], &p[i])) return NULL;
    if (get_size(args[10], &negated)) return NULL;
    for (int i = 11; i < 16; i++)
        if (get_ptr(args[i], &p[i])) return NULL;
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
    Py_BEGIN_ALLOW_THREADS
    double acc[64];
    float lsp[64], lsn[64], l1p[64];
    for (Py_ssize_t k = 0; k < K; k++) {
        colsum[k] = 0.0;
        acc[k] = 0.0;
    }
    for (Py_ssize_t b = 0; b < B; b++)
        for (Py_ssize_t k = 0; k < K; k++) colsum[k] += r[b * K + k];
    float inv[64];
    for (Py_ssize_t k = 0; k < K; k++) inv[k] = (float)(1.0 / (colsum[k] > 1e-12 ? colsum[k] : 1e-12));
    for (Py_ssize_t b = 0; b < B; b++) {
        const float *zb = z + b * T;
        float *spb = sp + b * T, *snb = sn + b * T;
        for (Py_ssize_t t = 0; t < T; t++) {
            float v = zb[t];
            float e = expf(-fabsf(v));
            float l = log1pf(e);
            float s1 = 1.0f / (1.0f + e);  /* sigma(|z|) */
            float s0 = e * s1;             /* sigma(-|z|) */
            l1p[t] = l;
            lsp[t] = fminf(v, 0.0f) - l;
            lsn[t] = fminf(-v, 0.0f) - l;
            spb[t] = v >= 0.0f ? s1 : s0;
            snb[t] = v >= 0.0f ? s0 : s1;
        }
        const float lb = lam ? lam[b] : 1.0f;
        for (Py_ssize_t k = 0; k < K; k++) {
            const float yk = y[b * K + k];
            const float c = r[b * K + k] * lb * inv[k];
            float loss, d;
            if (is_entire[k]) {
                float lp = 0.0f;
                for (Py_ssize_t t = 0; t < T; t++) lp += lsp[t] * log_prob[t * K + k];
                if (negated)
                    for (Py_ssize_t t = 0; t < T; t++) lp += lsn[t] * log_prob[(T + t) * K + k];
                const float lpc = fminf(lp, -1e-30f);
                const float em = expm1f(lpc); /* P - 1, < 0 */
                loss = -(yk * lpc + (1.0f - yk) * logf(-em));
                const float ratio = lp > -1e-30f ? 0.0f : (em + 1.0f) / -em;
                d = ratio * (1.0f - yk) - yk;
            } else {
                const Py_ssize_t i = (Py_ssize_t)src[k];
                const float v = zb[i];
                loss = fmaxf(v, 0.0f) - v * yk + l1p[i];
                d = spb[i] - yk;
            }
            acc[k] += (double)(c * loss);
            D[b * K + k] = d * c;
        }
    }
    for (Py_ssize_t k = 0; k < K; k++) per[k] = (float)acc[k];
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
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
    Py_BEGIN_ALLOW_THREADS
    float w[64];
    for (Py_ssize_t b = 0; b < B; b++) {
        for (Py_ssize_t k = 0; k < K; k++) w[k] = D[b * K + k] * g[k];
        for (Py_ssize_t t = 0; t < T; t++) {
            float s = 0.0f, pp = 0.0f, pn = 0.0f;
            for (Py_ssize_t k = 0; k < K; k++) {
                const float *m = M + k * 3 * T;
                s += w[k] * m[t];
                pp += w[k] * m[T + t];
                pn += w[k] * m[2 * T + t];
            }
            out[b * T + t] = s + pp * sn[b * T + t] - pn * sp[b * T + t];
        }
    }
    Py_END_ALLOW_THREADS
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

static PyMethodDef methods[] = {
    {"term_means_forward", (PyCFunction)(void (*)(void))term_means_forward, METH_FASTCALL,
     "Fused TermMeans forward on float32 CPU memory (see cpu_kernels.c)."},
    {"term_means_backward", (PyCFunction)(void (*)(void))term_means_backward, METH_FASTCALL,
     "Fused TermMeans backward on float32 CPU memory (see cpu_kernels.c)."},
    {"shift_ids", (PyCFunction)(void (*)(void))shift_ids, METH_FASTCALL,
     "Each feature's ids shifted by its table's first row (see cpu_kernels.c)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_kernels",
                                    "Fused host kernels of dlrm_mtl (float32, CPU).", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__cpu_kernels(void) { return PyModule_Create(&module); }
