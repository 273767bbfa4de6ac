/* Two passes of a LLaMA block in one sweep each on the CPU: RMSNorm (forward, ∂x) and rotary embeddings
 * (forward, ∂x). The fast path of model/llama.py's RMSNormFunction and RotaryFunction; the torch code there is
 * the reference (tests/test_block_kernels.py), built by c_build.py, called by model/block_cpu.py.
 *
 * Arithmetic in fp32, as torch's: bf16 values are widened (a shift), results rounded to nearest even.
 * RMSNorm rounds where the torch code rounds (x̂ to the input dtype, then w ⊙ x̂), so the values differ from
 * torch's only where the fp32 sum of squares, added in another order, differs in its last bits. Rotary
 * rounds once where torch rounds three times (x·cos, rot(x)·sin, their sum): within one bf16 rounding of it.
 *
 * Rows (or (b, t) pairs) are split between `threads` OpenMP threads (c_build.py: torch's own pool).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

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

#define F32(v) (v)

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
