/* Four passes of a LLaMA block in one sweep each on the CPU: RMSNorm, rotary embeddings and SwiGLU's gate,
 * forward and ∂x, and causal attention's softmax in backward. The autograd Functions of cpu/block.py call
 * them (built by cpu/build.py); model/llama.py's plain code (for attention: SDPA's own backward) is the
 * reference they are held to (tests/cpu/test_block_kernels.py).
 *
 * Arithmetic in fp32, as torch's: bf16 values are widened (a shift), results rounded to nearest even.
 * RMSNorm rounds where the torch code rounds (x̂ to the input dtype, then w ⊙ x̂), so the values differ from
 * torch's only where the fp32 sum of squares, added in another order, differs in its last bits. Rotary
 * rounds once where torch rounds three times (x·cos, rot(x)·sin, their sum): within one bf16 rounding of it.
 * SwiGLU rounds once where torch rounds twice; its e^x and 1/x are within 2 fp32 ulps (kernels.h).
 *
 * Rows (or (b, t) pairs) are split between `threads` OpenMP threads (cpu/build.py: torch's own pool).
 */
#include "kernels.h"                         /* from_bf16, to_bf16, exp_poly, the 16-lane forms */

#define LANES 16                                   /* partial sums: lets the compiler vectorise the reduction */

/* ---- RMSNorm: r = 1 / sqrt(mean(x²) + eps), y = w ⊙ round(x r) ---------------------------------------- */

#define RMSNORM_FORWARD(NAME, T, LOAD, STORE)                                                            \
    void NAME(const T *x, const T *w, T *y, float *r, int64_t rows, int64_t D, float eps, int32_t threads) { \
        _Pragma("omp parallel for schedule(static) num_threads(threads) if(threads > 1)")               \
        for (int64_t i = 0; i < rows; i++) {                                                            \
            const T *xi = x + i * D;                                                                    \
            T *yi = y + i * D;                                                                          \
            float acc[LANES] = {0};                                                                     \
            int64_t j = 0;                                                                              \
            for (; j + LANES <= D; j += LANES)                                                          \
                for (int l = 0; l < LANES; l++) acc[l] += LOAD(xi[j + l]) * LOAD(xi[j + l]);            \
            float ss = 0;                                                                               \
            for (int l = 0; l < LANES; l++) ss += acc[l];                                               \
            for (; j < D; j++) ss += LOAD(xi[j]) * LOAD(xi[j]);                                         \
            const float ri = 1.0f / sqrtf(ss / (float)D + eps);                                         \
            r[i] = ri;                                                                                  \
            for (j = 0; j < D; j++) yi[j] = STORE(LOAD(w[j]) * LOAD(STORE(LOAD(xi[j]) * ri)));          \
        }                                                                                               \
    }

/* ∂x = r (g − x̂ mean(g x̂)) = r g − r³ x Σ(g x) / D, with g = round(∂y ⊙ w) (as the torch code) */
#define RMSNORM_BACKWARD(NAME, T, LOAD, STORE)                                                           \
    void NAME(const T *x, const T *w, const float *r, const T *gy, T *gx, int64_t rows, int64_t D,        \
              int32_t threads) {                                                                        \
        _Pragma("omp parallel for schedule(static) num_threads(threads) if(threads > 1)")               \
        for (int64_t i = 0; i < rows; i++) {                                                            \
            const T *xi = x + i * D, *gi = gy + i * D;                                                  \
            T *oi = gx + i * D;                                                                         \
            float acc[LANES] = {0};                                                                     \
            int64_t j = 0;                                                                              \
            for (; j + LANES <= D; j += LANES)                                                          \
                for (int l = 0; l < LANES; l++)                                                         \
                    acc[l] += LOAD(STORE(LOAD(gi[j + l]) * LOAD(w[j + l]))) * LOAD(xi[j + l]);          \
            float gxs = 0;                                                                              \
            for (int l = 0; l < LANES; l++) gxs += acc[l];                                              \
            for (; j < D; j++) gxs += LOAD(STORE(LOAD(gi[j]) * LOAD(w[j]))) * LOAD(xi[j]);              \
            const float ri = r[i], c = ri * ri * gxs / (float)(-D);                                     \
            for (j = 0; j < D; j++)                                                                     \
                oi[j] = STORE((LOAD(STORE(LOAD(gi[j]) * LOAD(w[j]))) + LOAD(xi[j]) * c) * ri);          \
        }                                                                                               \
    }

RMSNORM_FORWARD(rmsnorm_forward_f32, float, F32, F32)
RMSNORM_FORWARD(rmsnorm_forward_bf16, uint16_t, from_bf16, to_bf16)
RMSNORM_BACKWARD(rmsnorm_backward_f32, float, F32, F32)
RMSNORM_BACKWARD(rmsnorm_backward_bf16, uint16_t, from_bf16, to_bf16)

/* ---- rotary, rotate-half layout: dims i and i + Dh/2 form a pair rotated by angle(t, i) ----------------
 *     out₁ = x₁ cos − x₂ sin        out₂ = x₂ cos + x₁ sin           (sign = +1: forward)
 * and ∂x is the rotation by −angle (sign = −1). x is read at x + b·sxb + t·sxt + h·sxh, out written at
 * out + b·sob + t·sot + h·soh (element strides; the last dim contiguous in both), so the kernel also moves
 * [B, T, H, Dh] (a projection's output) to [B, H, T, Dh] (attention's layout) and back. cos and sin are
 * [B, T, Dh] contiguous (both halves equal, as rotary_cos_sin makes them). */
#define ROTARY(NAME, T, LOAD, STORE)                                                                     \
    void NAME(const T *x, int64_t sxb, int64_t sxt, int64_t sxh, T *out, int64_t sob, int64_t sot,       \
              int64_t soh, const T *cos, const T *sin, int64_t B, int64_t Tn, int64_t H, int64_t Dh,      \
              float sign, int32_t threads) {                                                             \
        const int64_t half = Dh / 2;                                                                     \
        _Pragma("omp parallel for schedule(static) num_threads(threads) if(threads > 1)")                \
        for (int64_t p = 0; p < B * Tn; p++) {                                                           \
            const int64_t b = p / Tn, t = p % Tn;                                                        \
            const T *c = cos + p * Dh, *s = sin + p * Dh;                                                \
            for (int64_t h = 0; h < H; h++) {                                                            \
                const T *xi = x + b * sxb + t * sxt + h * sxh;                                           \
                T *oi = out + b * sob + t * sot + h * soh;                                               \
                for (int64_t j = 0; j < half; j++) {                                                     \
                    const float x1 = LOAD(xi[j]), x2 = LOAD(xi[j + half]);                               \
                    const float cj = LOAD(c[j]), sj = sign * LOAD(s[j]);                                 \
                    oi[j] = STORE(x1 * cj - x2 * sj);                                                    \
                    oi[j + half] = STORE(x2 * cj + x1 * sj);                                             \
                }                                                                                        \
            }                                                                                            \
        }                                                                                                \
    }

ROTARY(rotary_f32, float, F32, F32)
ROTARY(rotary_bf16, uint16_t, from_bf16, to_bf16)

/* ---- SwiGLU's gate: out = silu(g) ⊙ u, silu(g) = g σ(g), σ(g) = 1 / (1 + e^−g) ------------------------ */

#if defined(__AVX512F__)
#define GLU_FORWARD_16(S)                                                                                \
    const __m512 gv = load16_##S(g + i), one = _mm512_set1_ps(1.0f);                                      \
    const __m512 s = recip16(_mm512_add_ps(one, exp_poly16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));     \
    store16_##S(out + i, _mm512_mul_ps(_mm512_mul_ps(gv, s), load16_##S(u + i)));

#define GLU_BACKWARD_16(S)                                                                               \
    const __m512 gv = load16_##S(g + i), dy = load16_##S(gy + i), one = _mm512_set1_ps(1.0f);            \
    const __m512 s = recip16(_mm512_add_ps(one, exp_poly16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));     \
    const __m512 t = _mm512_fmadd_ps(gv, _mm512_sub_ps(one, s), one);                                     \
    store16_##S(gg + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(dy, load16_##S(u + i)), s), t));         \
    store16_##S(gu + i, _mm512_mul_ps(_mm512_mul_ps(dy, gv), s));

/* one chunk [lo, hi) of the n values per thread, in steps of 16 lanes, then one by one */
#define CHUNKS(n, BODY16, BODY1, S)                                                                      \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if(threads > 1)")                    \
    for (int64_t c = 0; c < threads; c++) {                                                              \
        const int64_t lo = n * c / threads / 16 * 16, hi = c + 1 == threads ? n : n * (c + 1) / threads / 16 * 16; \
        int64_t i = lo;                                                                                  \
        for (; i + 16 <= hi; i += 16) { BODY16(S) }                                                      \
        for (; i < hi; i++) { BODY1 }                                                                    \
    }
#else
#define CHUNKS(n, BODY16, BODY1, S)                                                                      \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if(threads > 1)")                    \
    for (int64_t i = 0; i < n; i++) { BODY1 }
#endif

static inline float silu_times(float g, float u) { return g * (1.0f / (1.0f + exp_poly(-g))) * u; }

/* ∂g = ∂y u σ(g) (1 + g (1 − σ(g))),  ∂u = ∂y g σ(g) */
static inline void swiglu_grads(float g, float u, float dy, float *dg, float *du) {
    const float s = 1.0f / (1.0f + exp_poly(-g));
    *dg = dy * u * s * (1.0f + g * (1.0f - s));
    *du = dy * g * s;
}

#define SWIGLU_FORWARD(NAME, S, T, LOAD, STORE)                                                          \
    void NAME(const T *g, const T *u, T *out, int64_t n, int32_t threads) {                              \
        CHUNKS(n, GLU_FORWARD_16, { out[i] = STORE(silu_times(LOAD(g[i]), LOAD(u[i]))); }, S)             \
    }

#define SWIGLU_BACKWARD(NAME, S, T, LOAD, STORE)                                                         \
    void NAME(const T *g, const T *u, const T *gy, T *gg, T *gu, int64_t n, int32_t threads) {           \
        CHUNKS(n, GLU_BACKWARD_16, {                                                                     \
            float dg; float du;                                                                          \
            swiglu_grads(LOAD(g[i]), LOAD(u[i]), LOAD(gy[i]), &dg, &du);                                 \
            gg[i] = STORE(dg);                                                                           \
            gu[i] = STORE(du);                                                                           \
        }, S)                                                                                            \
    }

SWIGLU_FORWARD(swiglu_forward_f32, f32, float, F32, F32)
SWIGLU_FORWARD(swiglu_forward_bf16, bf16, uint16_t, from_bf16, to_bf16)
SWIGLU_BACKWARD(swiglu_backward_f32, f32, float, F32, F32)
SWIGLU_BACKWARD(swiglu_backward_bf16, bf16, uint16_t, from_bf16, to_bf16)

/* ---- causal attention's softmax, backward: from the scores and ∂P, the probabilities and ∂scores ---------
 * For each row (one query t of one head; rows = heads · T, row r is query r mod T) and its keys j ≤ t:
 *     p_j = softmax_j(scale · s_j)          D = Σ_j p_j ∂p_j          ∂s_j = scale · p_j (∂p_j − D)
 * (the softmax's Jacobian applied to ∂p), and p_j = ∂s_j = 0 for the masked keys j > t. s = q kᵀ and ∂p =
 * ∂y vᵀ come in fp32 [rows, T]; s is overwritten with p (fp32) on the way. P and dS, in the compute dtype,
 * may be s and dp themselves (fp32: each value is read before it is written). */

/* s[0, n) ← p = softmax(scale · s); returns D = Σ p ∂p */
static inline float softmax_row(float *s, const float *dp, int64_t n, float scale) {
    int64_t j = 0;
    float m = s[0], z = 0, d = 0;
#if defined(__AVX512F__)
    __m512 mv = _mm512_set1_ps(s[0]);
    for (; j + 16 <= n; j += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + j));
    m = _mm512_reduce_max_ps(mv);
#endif
    for (; j < n; j++) m = s[j] > m ? s[j] : m;
    m *= scale;
    j = 0;
#if defined(__AVX512F__)
    const __m512 sc = _mm512_set1_ps(scale), mm = _mm512_set1_ps(m);
    __m512 zv = _mm512_setzero_ps();
    for (; j + 16 <= n; j += 16) {
        const __m512 e = exp_poly16(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), sc, mm));
        _mm512_storeu_ps(s + j, e);
        zv = _mm512_add_ps(zv, e);
    }
    z = _mm512_reduce_add_ps(zv);
#endif
    for (; j < n; j++) { s[j] = exp_poly(s[j] * scale - m); z += s[j]; }
    const float inv = 1.0f / z;
    j = 0;
#if defined(__AVX512F__)
    const __m512 iv = _mm512_set1_ps(inv);
    __m512 dv = _mm512_setzero_ps();
    for (; j + 16 <= n; j += 16) {
        const __m512 p = _mm512_mul_ps(_mm512_loadu_ps(s + j), iv);
        _mm512_storeu_ps(s + j, p);
        dv = _mm512_fmadd_ps(p, _mm512_loadu_ps(dp + j), dv);
    }
    d = _mm512_reduce_add_ps(dv);
#endif
    for (; j < n; j++) { s[j] *= inv; d += s[j] * dp[j]; }
    return d;
}

#if defined(__AVX512F__)
#define ATTENTION_STORE_16(S)                                                                            \
    const __m512 sc = _mm512_set1_ps(scale), dv = _mm512_set1_ps(d);                                     \
    for (; j + 16 <= n; j += 16) {                                                                       \
        const __m512 p = _mm512_loadu_ps(si + j);                                                        \
        const __m512 g = _mm512_mul_ps(_mm512_mul_ps(sc, p), _mm512_sub_ps(_mm512_loadu_ps(dpi + j), dv)); \
        store16_##S(pi + j, p);                                                                          \
        store16_##S(dsi + j, g);                                                                         \
    }
#else
#define ATTENTION_STORE_16(S)
#endif

#define ATTENTION_SOFTMAX_BACKWARD(NAME, S, T, STORE)                                                    \
    void NAME(float *s, const float *dp, T *P, T *dS, int64_t rows, int64_t Tn, float scale,              \
              int32_t threads) {                                                                         \
        _Pragma("omp parallel for schedule(static) num_threads(threads) if(threads > 1)")                \
        for (int64_t r = 0; r < rows; r++) {                                                             \
            const int64_t n = r % Tn + 1;                                                                \
            float *si = s + r * Tn;                                                                      \
            const float *dpi = dp + r * Tn;                                                              \
            T *pi = P + r * Tn, *dsi = dS + r * Tn;                                                      \
            const float d = softmax_row(si, dpi, n, scale);                                              \
            int64_t j = 0;                                                                               \
            ATTENTION_STORE_16(S)                                                                        \
            for (; j < n; j++) {                                                                         \
                const float p = si[j], g = scale * p * (dpi[j] - d);                                     \
                pi[j] = STORE(p);                                                                        \
                dsi[j] = STORE(g);                                                                       \
            }                                                                                            \
            memset(pi + n, 0, (size_t)(Tn - n) * sizeof(T));        /* 0 in fp32 and bf16: all bits 0 */  \
            memset(dsi + n, 0, (size_t)(Tn - n) * sizeof(T));                                            \
        }                                                                                                \
    }

ATTENTION_SOFTMAX_BACKWARD(attention_softmax_backward_f32, f32, float, F32)
ATTENTION_SOFTMAX_BACKWARD(attention_softmax_backward_bf16, bf16, uint16_t, to_bf16)
