/* NF4 dequantisation on the CPU in one pass: the "nf4" path of lora/nf4.py's NF4Tensor.dequantize.
 *
 * The same arithmetic as lora/nf4.py's torch code (and bitsandbytes' dequantize_4bit), value for value:
 *     out[b·bs + j] = round_to_dtype(level[code(b, j)] · absmax[b])      (the product in fp32)
 * where the codes come two a byte, the first value in the high nibble. Per block, the 16 products
 * level[k] · absmax[b] are computed once (the same fp32 multiply, so the same values), and every value of
 * the block is a lookup into them. The torch code needs three passes over memory (bytes → indices, gather,
 * scale); this reads the packed bytes once and writes the output once.
 *
 * A call fills a tile of `rows` rows, each of `blocks` whole blocks of bs values (bs a multiple of 32, as
 * every block size bitsandbytes accepts is): row i reads its bytes at packed + i·packed_stride, its absmax
 * values at absmax + i·absmax_stride and writes at out + i·out_stride (strides in elements), so a tile of
 * columns of a weight is dequantised in place, and a whole weight is rows = nb, blocks = 1. The caller
 * does a short last block. Rows are split between `threads` OpenMP threads (cpu/build.py: torch's own pool).
 * With AVX-512 (compiled with -march=native on a CPU that has it) 32 values a step: 16 bytes are widened
 * to 16 int32, split into high and low nibbles, looked up with one permute each in a register holding the
 * 16 products, and interleaved back into value order. Elsewhere, plain C that the compiler vectorises.
 */
#include "kernels.h"                         /* to_bf16: fp32 → bf16, rounding to nearest even */

#define FOR_EACH_BLOCK                                                                                  \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if(threads > 1)")                   \
    for (int64_t i = 0; i < rows; i++)                                                                  \
        for (int64_t c = 0; c < blocks; c++)

void nf4_dequantize_f32(const uint8_t *packed, int64_t packed_stride, const float *absmax_rows,
                        int64_t absmax_stride, const float *level, float *out, int64_t out_stride,
                        int64_t rows, int64_t blocks, int64_t bs, int32_t threads) {
    FOR_EACH_BLOCK {
        const uint8_t *p = packed + i * packed_stride + c * (bs / 2);   /* [bs/2] bytes of the block */
        const float *absmax = absmax_rows + i * absmax_stride + c;       /* its absmax */
        float *o = out + i * out_stride + c * bs;                        /* its [bs] values */
#if defined(__AVX512F__)
        const __m512 table = _mm512_mul_ps(_mm512_loadu_ps(level), _mm512_set1_ps(*absmax));   /* [16] */
        const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        for (int64_t j = 0; j < bs / 2; j += 16) {
            __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + j)));     /* [16] */
            __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);   /* values 2j, 2j+2, … */
            __m512 lo = _mm512_permutexvar_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15)), table);
            _mm512_storeu_ps(o + 2 * j, _mm512_permutex2var_ps(hi, first, lo));        /* hi0 lo0 hi1 lo1 … */
            _mm512_storeu_ps(o + 2 * j + 16, _mm512_permutex2var_ps(hi, second, lo));
        }
#else
        float table[16];
        for (int k = 0; k < 16; k++) table[k] = level[k] * *absmax;
        for (int64_t j = 0; j < bs / 2; j++) {
            o[2 * j] = table[p[j] >> 4];
            o[2 * j + 1] = table[p[j] & 15];
        }
#endif
    }
}

void nf4_dequantize_bf16(const uint8_t *packed, int64_t packed_stride, const float *absmax_rows,
                         int64_t absmax_stride, const float *level, uint16_t *out, int64_t out_stride,
                         int64_t rows, int64_t blocks, int64_t bs, int32_t threads) {
    FOR_EACH_BLOCK {
        const uint8_t *p = packed + i * packed_stride + c * (bs / 2);
        const float *absmax = absmax_rows + i * absmax_stride + c;
        uint16_t *o = out + i * out_stride + c * bs;
#if defined(__AVX512F__)
        /* the 16 products, rounded to bf16 by the integer rule of to_bf16, kept in 32-bit lanes */
        __m512i u = _mm512_castps_si512(_mm512_mul_ps(_mm512_loadu_ps(level), _mm512_set1_ps(*absmax)));
        __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(u, 16),
                                                                                    _mm512_set1_epi32(1)));
        const __m512i table = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);                  /* [16] */
        for (int64_t j = 0; j < bs / 2; j += 16) {
            __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + j)));
            __m512i hi = _mm512_permutexvar_epi32(_mm512_srli_epi32(bytes, 4), table);
            __m512i lo = _mm512_permutexvar_epi32(_mm512_and_si512(bytes, _mm512_set1_epi32(15)), table);
            /* lane k = hi_k | lo_k << 16 is the pair (hi_k, lo_k) of little-endian uint16: value order */
            __m512i pairs = _mm512_or_si512(hi, _mm512_slli_epi32(lo, 16));
            _mm512_storeu_si512((void *)(o + 2 * j), pairs);
        }
#else
        uint16_t table[16];
        for (int k = 0; k < 16; k++) table[k] = to_bf16(level[k] * *absmax);
        for (int64_t j = 0; j < bs / 2; j++) {
            o[2 * j] = table[p[j] >> 4];
            o[2 * j + 1] = table[p[j] & 15];
        }
#endif
    }
}
