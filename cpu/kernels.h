/* What the project's C kernels share (cpu/build.py builds them; each includes this file once): bf16 ↔ fp32,
 * an exponential without library calls, and, where the CPU has AVX-512, the same on 16 lanes.
 * Every function here is static inline: each kernel library gets its own copy, and no symbol is exported. */
#ifndef BEZOAR_C_KERNELS_H
#define BEZOAR_C_KERNELS_H
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* ---- bf16: the upper 16 bits of an fp32 ----------------------------------------------------------------- */

static inline float from_bf16(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* round to nearest even (torch's rule); NaN stays NaN */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

#define F32(v) (v)                                  /* the fp32 counterparts of from_bf16 / to_bf16 */

/* ---- e^x without a library call, so that loops over it vectorise ---------------------------------------
 * x = k ln2 + r with k = round(x / ln2), |r| ≤ ln2 / 2 (ln2 in two parts, Cody & Waite 1980, so k ln2 is
 * exact), e^r by its Taylor polynomial of degree 7 (remainder < 2e-8 relative), times 2^k: within 2 fp32 ulps.
 * x is clamped to [−87, 88], where 2^k stays a normal float (e^−87 ≈ 1.6e−38: below that the kernels' uses,
 * a softmax term and σ(g), are as good as 0 to fp32 sums and products). */
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
/* ---- 16 lanes ------------------------------------------------------------------------------------------ */

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

/* 1 / d: the 14-bit estimate (vrcp14ps) and one Newton step, r (2 − d r): within 2 ulps, no divider */
static inline __m512 recip16(__m512 d) {
    const __m512 r = _mm512_rcp14_ps(d);
    return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
}

/* 16 values to and from fp32 lanes; the _bf16 pair widens (a shift) and rounds as to_bf16 does */
static inline __m512 load16_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline void store16_f32(float *p, __m512 v) { _mm512_storeu_ps(p, v); }
static inline __m512 load16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline void store16_bf16(uint16_t *p, __m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                        _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    rounded = _mm512_mask_or_epi32(rounded, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(rounded));
}
#endif
#endif
