/* RMSNorm in one sweep each way on the CPU: forward, and ∂x in backward. cpu/rmsnorm.py's autograd Function
 * calls them (built by cpu/build.py); model/llama.py's RMSNorm is the reference they are held to
 * (tests/cpu/test_block_kernels.py).
 *
 * Arithmetic in fp32, as torch's: bf16 values are widened (a shift), results rounded to nearest even.
 * The kernels round where the torch code rounds (x̂ to the input dtype, then w ⊙ x̂), so the values differ from
 * torch's only where the fp32 sum of squares, added in another order, differs in its last bits.
 *
 * Rows are split between `threads` OpenMP threads (cpu/build.py: torch's own pool).
 */
#include "kernels.h"                         /* from_bf16, to_bf16 */

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
