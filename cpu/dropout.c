/* Dropout's keep/drop decision as a pure function of (seed, element index): the kernel of cpu/dropout.py.
 *
 * Element i of a tensor (flattened, row-major) is kept when its 16-bit uniform u(seed, i) ≥ threshold, with
 * threshold = round(p · 2¹⁶), so P(drop) = threshold / 2¹⁶. Four elements share one 64-bit hash:
 *     h(g) = mix64(seed + (g + 1) · γ),  g = ⌊i / 4⌋,  γ = 0x9E3779B97F4A7C15 (2⁶⁴ / golden ratio)
 *     u(seed, i) = bits [16 (i mod 4), 16 (i mod 4) + 16) of h(g)
 * where mix64 is SplitMix64's output function (Steele, Lea & Flood 2014; the finaliser of MurmurHash3 with
 * Stafford's constants). Nothing is drawn or stored per element: forward, checkpoint recomputation and backward
 * all get the same mask from the same seed. cpu/dropout.py holds the same formula in torch ops (the reference
 * every result is tested against, and the path on other devices).
 *
 * dropout_select_16 / _32 copy the n elements of `in` to `out` where kept and write zero where dropped, on raw
 * 16- or 32-bit patterns (bf16 / fp32: no arithmetic, so no rounding); out may be in (in place).
 * With AVX-512 (BW, DQ), 8 hashes a step: their 512 bits are, read as 32 little-endian uint16, the uniforms of
 * 32 consecutive elements in order, so one unsigned compare gives the 32-bit keep mask of a masked load.
 */
#include <stdint.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define VECTOR 1
#endif

static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

#define GAMMA 0x9E3779B97F4A7C15ull

#if VECTOR
static inline __m512i mix64_x8(__m512i z) {
    z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 30)), _mm512_set1_epi64(0xBF58476D1CE4E5B9ull));
    z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 27)), _mm512_set1_epi64(0x94D049BB133111EBull));
    return _mm512_xor_si512(z, _mm512_srli_epi64(z, 31));
}

/* the keep mask of the 32 elements of hash groups g .. g + 7 */
static inline __mmask32 keep32(uint64_t seed, uint64_t g, __m512i threshold) {
    const __m512i lane = _mm512_setr_epi64(1, 2, 3, 4, 5, 6, 7, 8);
    __m512i z = _mm512_add_epi64(_mm512_set1_epi64(seed),
                                 _mm512_mullo_epi64(_mm512_add_epi64(_mm512_set1_epi64(g), lane), _mm512_set1_epi64(GAMMA)));
    return _mm512_cmpge_epu16_mask(mix64_x8(z), threshold);
}

static int64_t vector_part_16(const uint16_t *in, uint16_t *out, uint64_t g0, int64_t n, uint64_t seed, uint32_t t) {
    const __m512i threshold = _mm512_set1_epi16((short)t);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32)
        _mm512_storeu_si512(out + i, _mm512_maskz_loadu_epi16(keep32(seed, g0 + i / 4, threshold), in + i));
    return i;
}

static int64_t vector_part_32(const uint32_t *in, uint32_t *out, uint64_t g0, int64_t n, uint64_t seed, uint32_t t) {
    const __m512i threshold = _mm512_set1_epi16((short)t);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __mmask32 k = keep32(seed, g0 + i / 4, threshold);
        _mm512_storeu_si512(out + i, _mm512_maskz_loadu_epi32((__mmask16)k, in + i));
        _mm512_storeu_si512(out + i + 16, _mm512_maskz_loadu_epi32((__mmask16)(k >> 16), in + i + 16));
    }
    return i;
}
#define VECTOR_PART(BITS, in, out, g0, n, seed, t) vector_part_##BITS(in, out, g0, n, seed, t)
#else
#define VECTOR_PART(BITS, in, out, g0, n, seed, t) 0
#endif

/* elements [start, start + n) of the tensor (in, out pointing at element start); the plain loop does
 * elements [done, n) of the range, hash groups from g0 */
#define SELECT_RANGE(NAME, BITS, T)                                                                      \
    static void NAME(const T *in, T *out, int64_t start, int64_t n, uint64_t seed, uint32_t threshold) {   \
        const uint64_t g0 = (uint64_t)start / 4;                                                          \
        const int64_t done = VECTOR_PART(BITS, in, out, g0, n, seed, threshold);   /* a multiple of 4 */  \
        const int64_t groups = n / 4;                                                                     \
        for (int64_t g = done / 4; g < groups; g++) {                                                     \
            uint64_t h = mix64(seed + (g0 + (uint64_t)g + 1) * GAMMA);                                    \
            for (int l = 0; l < 4; l++) {                                                                 \
                uint32_t u = (uint32_t)(h >> (16 * l)) & 0xFFFFu;                                         \
                out[4 * g + l] = u >= threshold ? in[4 * g + l] : (T)0;                                   \
            }                                                                                             \
        }                                                                                                 \
        if (n % 4) {                                                   /* a short last group */           \
            uint64_t h = mix64(seed + (g0 + (uint64_t)groups + 1) * GAMMA);                               \
            for (int l = 0; l < n % 4; l++) {                                                             \
                uint32_t u = (uint32_t)(h >> (16 * l)) & 0xFFFFu;                                         \
                out[4 * groups + l] = u >= threshold ? in[4 * groups + l] : (T)0;                         \
            }                                                                                             \
        }                                                                                                 \
    }

SELECT_RANGE(select_range_16, 16, uint16_t)
SELECT_RANGE(select_range_32, 32, uint32_t)

/* the whole tensor of n elements, in `threads` parts on OpenMP threads (cpu/build.py: torch's own pool), the
 * parts' edges on multiples of 32 elements (whole hash groups, whole vector steps) */
#define DROPOUT_SELECT(NAME, RANGE, T)                                                                   \
    void NAME(const T *in, T *out, int64_t n, uint64_t seed, uint32_t threshold, int32_t threads) {        \
        _Pragma("omp parallel for schedule(static) num_threads(threads) if(threads > 1)")                \
        for (int32_t part = 0; part < threads; part++) {                                                 \
            const int64_t lo = n * part / threads / 32 * 32;                                             \
            const int64_t hi = part + 1 == threads ? n : n * (part + 1) / threads / 32 * 32;             \
            RANGE(in + lo, out + lo, lo, hi - lo, seed, threshold);                                      \
        }                                                                                                \
    }

DROPOUT_SELECT(dropout_select_16, select_range_16, uint16_t)
DROPOUT_SELECT(dropout_select_32, select_range_32, uint32_t)
