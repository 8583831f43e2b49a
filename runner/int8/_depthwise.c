/* int8 depthwise 1-D convolution for x86 CPUs with AVX2 but without VNNI (runner/int8/depthwise.py).
 *
 * There, oneDNN's int8 depthwise kernel widens every u8 input and s8 weight to 32 bits and multiplies
 * one tap at a time (vpmaddwd of a value and a zero): 8 multiply-adds per instruction, no faster than
 * fp32. QuartzNet's depthwise convs (kernels 33-87) then take a third of the int8 time for a tenth of
 * the work. Here two taps go into each 32-bit lane as a pair of int16 (inputs zero-extended, weights
 * sign-extended), so one vpmaddwd does 16 exact multiply-adds into int32 (no saturation for any u8
 * input), and each weight register serves several outputs.
 *
 * Layout: input u8 [N][T][C] and output u8 [N][To][C] (channels last, as torch's quantized convolutions leave
 * them); weights s8 [C][K] packed once by dw_pack; any K, stride S, dilation D and zero padding P on both sides
 * (torch's Conv1d), C a multiple of 8. Padding is filled with the input zero point, and `comp` (zero point x the
 * sum of each channel's weights) is taken off, so padded taps add exactly 0. Requantization as oneDNN does it:
 * fp32 (acc - comp) * mul + add, rounded to nearest even, saturated to [0, 255]. Parallel over (item,
 * 8-channel block) with OpenMP: loaded after torch, the library binds to torch's own libgomp, so it
 * shares torch's threads. */
#include <stdint.h>
#include <stdlib.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#include <omp.h>

#define OUTPUTS 6 /* outputs per weight load: 6 accumulators + weights + temporaries fit 16 registers */

__attribute__((target("avx2,fma"))) static inline void store8(uint8_t *dst, __m256i acc, __m256i comp, __m256 mul,
                                                              __m256 add) {
    __m256i r = _mm256_cvtps_epi32(_mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc, comp)), mul, add));
    __m128i h = _mm_packs_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storel_epi64((__m128i *)dst, _mm_packus_epi16(h, h));
}

/* The outputs of one block of 8 channels from its tap pairs: output t sums pairs[t * S + 2 j D] x weights j. S
 * and D are constants where the caller passes them so (stride 1, dilation 1: the inner loop QuartzNet's and
 * Citrinet's convs spend their time in). */
__attribute__((target("avx2,fma"), always_inline)) static inline void taps(const int32_t *pairs, const int32_t *wb,
                                                                           int J, int To, int S, int D, int C,
                                                                           __m256i cz, __m256 m, __m256 a,
                                                                           uint8_t *out) {
    int t = 0;
    for (; t + OUTPUTS <= To; t += OUTPUTS) {
        __m256i acc[OUTPUTS];
        for (int u = 0; u < OUTPUTS; u++) acc[u] = _mm256_setzero_si256();
        const int32_t *q = pairs + (size_t)t * S * 8;
        for (int j = 0; j < J; j++, q += 16 * D) {
            const __m256i wj = _mm256_loadu_si256((const __m256i *)(wb + j * 8));
            for (int u = 0; u < OUTPUTS; u++)
                acc[u] = _mm256_add_epi32(
                    acc[u], _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)(q + 8 * S * u)), wj));
        }
        for (int u = 0; u < OUTPUTS; u++) store8(out + (size_t)(t + u) * C, acc[u], cz, m, a);
    }
    for (; t < To; t++) {
        __m256i acc = _mm256_setzero_si256();
        const int32_t *q = pairs + (size_t)t * S * 8;
        for (int j = 0; j < J; j++, q += 16 * D)
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)q),
                                                          _mm256_loadu_si256((const __m256i *)(wb + j * 8))));
        store8(out + (size_t)t * C, acc, cz, m, a);
    }
}

/* Padded rows a block's outputs read: pairs 0 .. (To - 1) S + 2 (J - 1) D. */
static size_t pair_rows(int To, int K, int S, int D) {
    return (size_t)(To - 1) * S + (size_t)((K + 1) / 2 - 1) * 2 * D + 1;
}

/* One item, one block of 8 channels starting at c0. pairs: scratch of pair_rows(..) x 8 int32. */
__attribute__((target("avx2,fma"))) static void block(const uint8_t *x, int T, int C, int K, int S, int D, int P,
                                                       int To, int c0, const int32_t *w, const float *mul,
                                                       const float *add, const int32_t *comp, int32_t *pairs,
                                                       uint8_t *out, int zx) {
    const int J = (K + 1) / 2, rows = (int)pair_rows(To, K, S, D);
    /* pairs[s][c] = (x[s][c], x[s+D][c]) as two int16, in padded time: padded row s is input row s - P, the
     * zero point outside [0, T) */
    const __m128i zero_point = _mm_set1_epi16((short)zx);
#define ROW(src) \
    ((src) >= 0 && (src) < T ? _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(x + (size_t)(src) * C + c0))) \
                             : zero_point)
    for (int s = 0; s < rows; s++) {
        const __m128i first = ROW(s - P), second = ROW(s + D - P);
        __m256i both = _mm256_set_m128i(_mm_unpackhi_epi16(first, second), _mm_unpacklo_epi16(first, second));
        _mm256_storeu_si256((__m256i *)(pairs + (size_t)s * 8), both);
    }
#undef ROW
    const __m256 m = _mm256_loadu_ps(mul + c0), a = _mm256_loadu_ps(add + c0);
    const __m256i cz = _mm256_loadu_si256((const __m256i *)(comp + c0));
    const int32_t *wb = w + (size_t)(c0 / 8) * J * 8;
    if (S == 1 && D == 1)
        taps(pairs, wb, J, To, 1, 1, C, cz, m, a, out + c0);
    else
        taps(pairs, wb, J, To, S, D, C, cz, m, a, out + c0);
}

int dw_available(void) { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

/* w: s8 [C][K] -> packed [C/8][(K+1)/2][8] int32 of (w[c][2j], w[c][2j+1]) int16 pairs (0 past K). */
void dw_pack(const int8_t *w, int C, int K, int32_t *packed) {
    const int J = (K + 1) / 2;
    for (int cb = 0; cb < C / 8; cb++)
        for (int j = 0; j < J; j++)
            for (int i = 0; i < 8; i++) {
                const int c = cb * 8 + i;
                const int16_t lo = w[c * K + 2 * j], hi = (2 * j + 1 < K) ? w[c * K + 2 * j + 1] : 0;
                packed[((size_t)cb * J + j) * 8 + i] = (int32_t)(((uint32_t)(uint16_t)hi << 16) | (uint16_t)lo);
            }
}

/* x u8 [N][T][C] -> out u8 [N][To][C], To = (T + 2P - D (K - 1) - 1) / S + 1 >= 1 (the caller's). Returns 0,
 * or -1 when scratch memory could not be had (nothing written then is to be trusted). */
int dw_forward(const uint8_t *x, int N, int T, int C, int K, int S, int D, int P, int To, const int32_t *w,
               const float *mul, const float *add, const int32_t *comp, uint8_t *out, int zx, int threads) {
    const int blocks = N * (C / 8), cblocks = C / 8;
    const size_t scratch = pair_rows(To, K, S, D) * 8 * sizeof(int32_t);
    int failed = 0;
    if (threads > blocks) threads = blocks;
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int32_t *pairs = malloc(scratch);
        if (!pairs) {
            failed = 1;
        } else {
            const int n = omp_get_num_threads(), i = omp_get_thread_num();
            const int per = (blocks + n - 1) / n, first = i * per, last = first + per < blocks ? first + per : blocks;
            for (int b = first; b < last; b++) {
                const int item = b / cblocks, c0 = (b % cblocks) * 8;
                block(x + (size_t)item * T * C, T, C, K, S, D, P, To, c0, w, mul, add, comp, pairs,
                      out + (size_t)item * To * C, zx);
            }
            free(pairs);
        }
    }
    return failed ? -1 : 0;
}

#else /* not x86: the engine's own depthwise convolutions run (depthwise.py never calls these) */
int dw_available(void) { return 0; }
void dw_pack(const int8_t *w, int C, int K, int32_t *packed) { (void)w, (void)C, (void)K, (void)packed; }
int dw_forward(const uint8_t *x, int N, int T, int C, int K, int S, int D, int P, int To, const int32_t *w,
               const float *mul, const float *add, const int32_t *comp, uint8_t *out, int zx, int threads) {
    return -1;
}
#endif
