/* The frozen-lm_head loss's softmax pass on the CPU: the fast path of losses.py's _FrozenHeadTokenLogps.
 *
 * For each row of logits z [V] (bf16 or fp32) and its target y, in fp32, as the torch code does:
 *     m = max z,   s = Σ_v e^(z_v − m),   log p(y) = (z_y − m) − log s
 *     z_v ← round(p_v − [v = y]),   p_v = e^(z_v − m) / s          (∂ log p(y) / ∂z = onehot(y) − p, negated)
 * in place (the last step only with write_grad), in three sweeps over a row that stays in cache (32000 values: 64 KB in bf16), where the torch code
 * makes a widened fp32 copy, a softmax, a scatter and a narrowing copy, each over the whole [C, V] chunk.
 * e^x is exp_poly (kernels.h: within 2 fp32 ulps); s is summed in 16 fp32 lanes (one fp64 sum without AVX-512,
 * where one fp32 sum of 32000 terms drifts by 6e-5); log s is libm's log, once a row. Rows are split between
 * `threads` OpenMP threads (cpu/build.py: torch's own pool).
 */
#include "kernels.h"                            /* from_bf16, to_bf16, exp_poly, the 16-lane forms */

#if defined(__AVX512F__)
#define VECTOR 1
#else
#define VECTOR 0
#endif

#define TOKEN_LOGP_GRAD(NAME, S, T, LOAD, STORE)                                                         \
    void NAME(T *z, const int64_t *y, float *logp, int64_t rows, int64_t V, int32_t write_grad,          \
              int32_t threads) {                                                                         \
        _Pragma("omp parallel for schedule(static) num_threads(threads) if(threads > 1)")                \
        for (int64_t i = 0; i < rows; i++) {                                                             \
            T *zi = z + i * V;                                                                           \
            const int64_t target = y[i];                                                                 \
            float m = -INFINITY;                                                                         \
            double s = 0.0;                          /* the scalar tail (all of V without AVX-512) in fp64 */ \
            int64_t v = 0;                                                                               \
            VECTOR_MAX(S)                                                                                \
            for (; v < V; v++) m = fmaxf(m, LOAD(zi[v]));                                                \
            v = 0;                                                                                       \
            VECTOR_SUM(S)                                                                                \
            for (; v < V; v++) s += exp_poly(LOAD(zi[v]) - m);                                           \
            const float zy = LOAD(zi[target]), inv = (float)(1.0 / s);                                   \
            logp[i] = (zy - m) - (float)log(s);                                                          \
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
