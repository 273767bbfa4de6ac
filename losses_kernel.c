/* The frozen-lm_head loss's softmax pass on the CPU: the fast path of losses.py's _FrozenHeadTokenLogps.
 *
 * For each row of logits z [V] (bf16 or fp32) and its target y, in fp32, as the torch code does:
 *     m = max z,   s = Σ_v e^(z_v − m),   log p(y) = (z_y − m) − log s
 *     z_v ← round(p_v − [v = y]),   p_v = e^(z_v − m) / s          (∂ log p(y) / ∂z = onehot(y) − p, negated)
 * in place (the last step only with write_grad), in three sweeps over a row that stays in cache (32000 values: 64 KB in bf16), where the torch code
 * makes a widened fp32 copy, a softmax, a scatter and a narrowing copy, each over the whole [C, V] chunk.
 * e^x is exp_poly (below: within 2 fp32 ulps); log s is libm's logf, once a row. Rows are split between
 * `threads` OpenMP threads (c_build.py: torch's own pool).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline float from_bf16(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t to_bf16(float f) {          /* round to nearest even; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* e^x: x = k ln2 + r with k = round(x / ln2), |r| ≤ ln2 / 2 (ln2 in two parts, Cody & Waite 1980, so k ln2
 * is exact), e^r by its Taylor polynomial of degree 7 (remainder < 2e-8 relative), times 2^k. x is clamped
 * to [−87, 88], where 2^k stays a normal float (e^−87 ≈ 1.6e−38: p below that is 0 to fp32's softmax too). */
static inline float exp_poly(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;   /* round: + 1.5·2²³ − 1.5·2²³ */
    const float r = (x - k * 0.693359375f) - k * -2.12194440e-4f;
    float p = 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = ((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

#if defined(__AVX512F__)
static inline __m512 exp_poly16(__m512 x) {         /* exp_poly on 16 lanes (vscalefps for the 2^k) */
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, k);
}
static inline __m512 load16_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline void store16_f32(float *p, __m512 v) { _mm512_storeu_ps(p, v); }
static inline __m512 load16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline void store16_bf16(uint16_t *p, __m512 v) {   /* to_bf16 on 16 lanes (p − onehot is never NaN) */
    const __m512i u = _mm512_castps_si512(v);
    const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(u, 16),
                                                                                     _mm512_set1_epi32(1)));
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(u, bias), 16)));
}
#define VECTOR 1
#else
#define VECTOR 0
#endif

#define F32(v) (v)

#define TOKEN_LOGP_GRAD(NAME, S, T, LOAD, STORE)                                                         \
    void NAME(T *z, const int64_t *y, float *logp, int64_t rows, int64_t V, int32_t write_grad,          \
              int32_t threads) {                                                                         \
        _Pragma("omp parallel for schedule(static) num_threads(threads) if(threads > 1)")                \
        for (int64_t i = 0; i < rows; i++) {                                                             \
            T *zi = z + i * V;                                                                           \
            const int64_t target = y[i];                                                                 \
            float m = -INFINITY, s = 0.0f;                                                               \
            int64_t v = 0;                                                                               \
            VECTOR_MAX(S)                                                                                \
            for (; v < V; v++) m = fmaxf(m, LOAD(zi[v]));                                                \
            v = 0;                                                                                       \
            VECTOR_SUM(S)                                                                                \
            for (; v < V; v++) s += exp_poly(LOAD(zi[v]) - m);                                           \
            const float zy = LOAD(zi[target]), inv = 1.0f / s;                                           \
            logp[i] = (zy - m) - logf(s);                                                                \
            if (!write_grad) continue;                                                                   \
            v = 0;                                                                                       \
            VECTOR_WRITE(S)                                                                              \
            for (; v < V; v++) zi[v] = STORE(exp_poly(LOAD(zi[v]) - m) * inv);                           \
            zi[target] = STORE(exp_poly(zy - m) * inv - 1.0f);                                           \
        }                                                                                                \
    }

#if VECTOR
#define VECTOR_MAX(S)                                                                                    \
    { __m512 acc = _mm512_set1_ps(-INFINITY);                                                            \
      for (; v + 16 <= V; v += 16) acc = _mm512_max_ps(acc, load16_##S(zi + v));                          \
      m = _mm512_reduce_max_ps(acc); }
#define VECTOR_SUM(S)                                                                                    \
    { __m512 acc = _mm512_setzero_ps(); const __m512 mv = _mm512_set1_ps(m);                             \
      for (; v + 16 <= V; v += 16) acc = _mm512_add_ps(acc, exp_poly16(_mm512_sub_ps(load16_##S(zi + v), mv))); \
      s = _mm512_reduce_add_ps(acc); }
#define VECTOR_WRITE(S)                                                                                  \
    { const __m512 mv = _mm512_set1_ps(m), iv = _mm512_set1_ps(inv);                                     \
      for (; v + 16 <= V; v += 16)                                                                       \
          store16_##S(zi + v, _mm512_mul_ps(exp_poly16(_mm512_sub_ps(load16_##S(zi + v), mv)), iv)); }
#else
#define VECTOR_MAX(S)
#define VECTOR_SUM(S)
#define VECTOR_WRITE(S)
#endif

TOKEN_LOGP_GRAD(token_logp_grad_f32, f32, float, F32, F32)
TOKEN_LOGP_GRAD(token_logp_grad_bf16, bf16, uint16_t, from_bf16, to_bf16)
