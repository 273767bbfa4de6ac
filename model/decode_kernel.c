/* The projections of batch-1 decoding on the CPU in bf16: y = W x for one token's x, one sweep over W.
 * The fast path of model/llama.py's Linear; torch's F.linear is the reference (tests/test_decode_kernel.py),
 * built by c_build.py, called by model/decode_cpu.py.
 *
 * Why. Decoding one token reads every weight once, so its speed is the rate W streams from memory. torch's
 * bf16 matrix-vector product streams W at ~18 GB/s here (from DRAM), against ~29 for its fp32 one. Here
 * BLOCK rows of W are read side by side (that many memory streams in flight), each 16 bf16 weights widened to
 * fp32 (a shift) and multiplied into 16 fp32 partial sums: 25–28 GB/s. bf16 × bf16 products are exact in
 * fp32; the sums are fp32 in another order than torch's, rounded to bf16 once, as torch rounds its fp32 sum.
 * Only one row of x: with BLOCK × rows partial sums the registers run out, and torch's product is the faster
 * (measured with a loop over rows here: 2 rows 22 vs 21 GB/s, 4 rows 22 vs 13).
 *
 * Blocks of rows of W (outputs) are split between `threads` OpenMP threads (c_build.py: torch's pool). */
#include "../c_kernels.h"                          /* from_bf16, to_bf16, the 16-lane loads */

#define BLOCK 16                                   /* rows of W read side by side (8: 26 GB/s, 4: 23, 24: 26, 32: 23) */

/* y [N] ← W x, W [N, K], x [K]; all bf16, contiguous */
void linear_row_bf16(const uint16_t *x, const uint16_t *W, uint16_t *y, int64_t N, int64_t K, int32_t threads) {
    const int64_t blocks = (N + BLOCK - 1) / BLOCK;
    _Pragma("omp parallel for schedule(static) num_threads(threads) if(threads > 1)")
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n = b * BLOCK, R = N - n < BLOCK ? N - n : BLOCK;
        const uint16_t *w = W + n * K;
        float sums[BLOCK];
        int64_t k = 0;
#if defined(__AVX512F__)
        __m512 acc[BLOCK];
        for (int64_t r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
        for (; k + 16 <= K; k += 16) {
            const __m512 xv = load16_bf16(x + k);
            for (int64_t r = 0; r < R; r++) acc[r] = _mm512_fmadd_ps(load16_bf16(w + r * K + k), xv, acc[r]);
        }
        for (int64_t r = 0; r < R; r++) sums[r] = _mm512_reduce_add_ps(acc[r]);
#else
        for (int64_t r = 0; r < R; r++) sums[r] = 0.0f;
#endif
        for (; k < K; k++) {
            const float xk = from_bf16(x[k]);
            for (int64_t r = 0; r < R; r++) sums[r] += from_bf16(w[r * K + k]) * xk;
        }
        for (int64_t r = 0; r < R; r++) y[n + r] = to_bf16(sums[r]);
    }
}
