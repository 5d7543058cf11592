/* Dense products from packed sign bits: y[r][o] = H * sum_i s[o][i] * x[r][i], s = +-1.

Built by packed.py (gcc -O3 -march=native -fopenmp) into a cache folder at first use and called
through ctypes. A weight is one bit in memory and in every load: a byte of 8 bits is broadcast to
8 lanes and each lane's bit shifted into the float sign position, so that XOR-ing it into x gives
+-x and the product is additions only (no multiplication by a weight, the paper's point).

Bit layout (packed.py writes it): row o of the weights is bytes bits[o*row_bytes ...], np.packbits
order (input 8g+k is bit 7-k of byte g), a set bit meaning s = -1, each row padded with zero bits
to whole groups of 8 inputs, and 4 readable bytes after the last row (the broadcast reads a 32-bit
word). x rows are zero-padded to 8*n_groups floats, so the padding bits never count.

Without AVX2 (another CPU, or another compiler's flags) the same sums run as plain C.
*/
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define ROW_TILE 4  /* x rows per register tile */
#define CHUNK 64    /* outputs per work item */
#define K_BLOCK 128 /* groups of 8 inputs per pass: a row tile's x (16 KB) and a chunk's bits
                       (8 KB) stay in L1 together; measured 1.5-2x at batch 16 against no blocking */

#ifdef __AVX2__
static inline float hsum(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The 8 sign masks of byte g, lane k taking bit 7-k. */
static inline __m256 signs(const uint8_t *p, __m256i shift, __m256i top)
{
    int32_t w;
    memcpy(&w, p, 4);
    return _mm256_castsi256_ps(_mm256_and_si256(_mm256_sllv_epi32(_mm256_set1_epi32(w), shift),
                                                top));
}

/* An R x C register tile: R rows of x against C weight rows, all groups. Fixed sizes so that gcc
   unrolls the loops and keeps the R*C accumulators in registers (16 ymm on AVX2). */
#define TILE(R, C)                                                                            \
    static void tile_##R##_##C(const float *x, long xs, const uint8_t *b, long bs, long ng,    \
                               float H, float *y, long ys, int add)                           \
    {                                                                                          \
        const __m256i shift = _mm256_setr_epi32(24, 25, 26, 27, 28, 29, 30, 31);               \
        const __m256i top = _mm256_set1_epi32((int32_t)0x80000000u);                            \
        __m256 acc[R][C];                                                                      \
        for (int r = 0; r < R; r++)                                                            \
            for (int c = 0; c < C; c++)                                                        \
                acc[r][c] = _mm256_setzero_ps();                                               \
        for (long g = 0; g < ng; g++) {                                                        \
            __m256 m[C];                                                                       \
            for (int c = 0; c < C; c++)                                                        \
                m[c] = signs(b + c * bs + g, shift, top);                                      \
            for (int r = 0; r < R; r++) {                                                      \
                __m256 xv = _mm256_loadu_ps(x + r * xs + 8 * g);                               \
                for (int c = 0; c < C; c++)                                                    \
                    acc[r][c] = _mm256_add_ps(acc[r][c], _mm256_xor_ps(xv, m[c]));             \
            }                                                                                  \
        }                                                                                      \
        for (int r = 0; r < R; r++)                                                            \
            for (int c = 0; c < C; c++)                                                        \
                y[r * ys + c] = (add ? y[r * ys + c] : 0.f) + H * hsum(acc[r][c]);             \
    }
TILE(4, 2)
TILE(4, 1)
TILE(1, 1)

/* Batch 1 has no x rows to share a byte's expansion with: a byte's 8 masks come from a table of
   all 256 (8 KB, in L1), one load instead of a broadcast, a shift and an AND. */
static __m256 mask_table[256];

__attribute__((constructor)) static void fill_mask_table(void)
{
    const __m256i shift = _mm256_setr_epi32(24, 25, 26, 27, 28, 29, 30, 31);
    const __m256i top = _mm256_set1_epi32((int32_t)0x80000000u);
    for (int v = 0; v < 256; v++) {
        uint8_t w[4] = {(uint8_t)v, 0, 0, 0};
        mask_table[v] = signs(w, shift, top);
    }
}

static void tile_1_8(const float *x, long xs, const uint8_t *b, long bs, long ng, float H,
                     float *y, long ys, int add)
{
    (void)xs, (void)ys;
    __m256 acc[8];
    for (int c = 0; c < 8; c++)
        acc[c] = _mm256_setzero_ps();
    for (long g = 0; g < ng; g++) {
        __m256 xv = _mm256_loadu_ps(x + 8 * g);
        for (int c = 0; c < 8; c++)
            acc[c] = _mm256_add_ps(acc[c], _mm256_xor_ps(xv, mask_table[b[c * bs + g]]));
    }
    for (int c = 0; c < 8; c++)
        y[c] = (add ? y[c] : 0.f) + H * hsum(acc[c]);
}

/* rows x outputs, in the tiles above */
static void block(const float *x, long xs, long rows, const uint8_t *b, long bs, long outs,
                  long ng, float H, float *y, long ys, int add)
{
    long r = 0;
    for (; r + ROW_TILE <= rows; r += ROW_TILE) {
        long o = 0;
        for (; o + 2 <= outs; o += 2)
            tile_4_2(x + r * xs, xs, b + o * bs, bs, ng, H, y + r * ys + o, ys, add);
        for (; o < outs; o++)
            tile_4_1(x + r * xs, xs, b + o * bs, bs, ng, H, y + r * ys + o, ys, add);
    }
    for (; r < rows; r++) {
        long o = 0;
        for (; o + 8 <= outs; o += 8)
            tile_1_8(x + r * xs, xs, b + o * bs, bs, ng, H, y + r * ys + o, ys, add);
        for (; o < outs; o++)
            tile_1_1(x + r * xs, xs, b + o * bs, bs, ng, H, y + r * ys + o, ys, add);
    }
}
#else
static void block(const float *x, long xs, long rows, const uint8_t *b, long bs, long outs,
                  long ng, float H, float *y, long ys, int add)
{
    for (long r = 0; r < rows; r++)
        for (long o = 0; o < outs; o++) {
            float acc = 0.f;
            for (long i = 0; i < 8 * ng; i++) {
                float v = x[r * xs + i];
                acc += (b[o * bs + i / 8] >> (7 - i % 8)) & 1 ? -v : v;
            }
            y[r * ys + o] = (add ? y[r * ys + o] : 0.f) + H * acc;
        }
}
#endif

/* y (rows x n_out, row stride ys) = H * x (rows x 8*n_groups, row stride xs) times the signs.
   Work items are (row tile, chunk of outputs) pairs, row tiles outermost, shared out in order: at
   batch 1 the threads split the outputs, at batch 100 mostly the rows. */
void bc_dense(const float *x, long rows, long xs, const uint8_t *bits, long n_out, long row_bytes,
              long n_groups, float H, float *y, long ys, int threads)
{
    long rt = rows >= ROW_TILE ? ROW_TILE : 1;
    long n_rt = (rows + rt - 1) / rt, n_oc = (n_out + CHUNK - 1) / CHUNK;
    long kb = rt > 1 ? K_BLOCK : n_groups;  /* one x row fits L1 whole; blocking it cost 40% */
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (long item = 0; item < n_rt * n_oc; item++) {
        long r0 = item / n_oc * rt, o0 = item % n_oc * CHUNK;
        long nr = rows - r0 < rt ? rows - r0 : rt, no = n_out - o0 < CHUNK ? n_out - o0 : CHUNK;
        for (long g0 = 0; g0 < n_groups; g0 += kb)
            block(x + r0 * xs + 8 * g0, xs, nr, bits + o0 * row_bytes + g0, row_bytes, no,
                  n_groups - g0 < kb ? n_groups - g0 : kb, H, y + r0 * ys + o0, ys, g0 > 0);
    }
}

/* For the benchmark's floors: `reps` passes of float32 additions over x[0..n) on each thread (8
   independent vector sums, so that the add units, not their latency, set the pace). Over a buffer
   in L1 this is the add rate; over one far larger than the caches, the memory's read bandwidth. */
double bc_sum(const float *x, long n, long reps, int threads)
{
    double total = 0.;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(+ : total)
    for (int t = 0; t < threads; t++) {
        long lo = threads > 1 && n > (1L << 20) ? n / threads * t : 0;
        long hi = threads > 1 && n > (1L << 20) ? lo + n / threads : n;
        float s = 0.f;
#ifdef __AVX2__
        __m256 a[8];
        for (int k = 0; k < 8; k++)
            a[k] = _mm256_setzero_ps();
        for (long rep = 0; rep < reps; rep++)
            for (long i = lo; i + 64 <= hi; i += 64)
                for (int k = 0; k < 8; k++)
                    a[k] = _mm256_add_ps(a[k], _mm256_loadu_ps(x + i + 8 * k));
        for (int k = 0; k < 8; k++)
            s += hsum(a[k]);
#else
        for (long rep = 0; rep < reps; rep++)
            for (long i = lo; i < hi; i++)
                s += x[i];
#endif
        total += s;
    }
    return total;
}

/* ---- BinaryNet: XNOR + popcount on packed activation bits (docs/inference.md, "XNOR path") ----

x and w rows are words of 64 sign bits (a set bit meaning -1, input 64k + j at bit j of word k:
np.packbits(bitorder="little") viewed as little-endian uint64, zero bits past the last input
in both), so d = popcount(x XOR w) counts the
products equal to -1 and the +-1 dot product is n - 2d. Three paths give the same integers:
portable C, AVX2 (popcount by a 16-entry nibble table, Mula's vpshufb method) and AVX-512
VPOPCNTDQ (vpopcntq); the AVX ones are compiled with target attributes whatever -march says and
chosen at run time by bc_xnor_paths() and packed.py. */

#define X_CHUNK 64 /* outputs per work item: one word of output bits, no two items share it */

/* d[r * ds + c] = popcount(x_r XOR w_c) for R rows of x and C rows of w, nw words each. */
typedef void (*counts_fn)(const uint64_t *x, long xs, long rows, const uint64_t *w, long ws,
                          long outs, long nw, int32_t *d, long ds);

__attribute__((optimize("no-tree-vectorize"))) static void
counts_portable(const uint64_t *x, long xs, long rows, const uint64_t *w, long ws, long outs,
                long nw, int32_t *d, long ds)
{
    for (long r = 0; r < rows; r++)
        for (long c = 0; c < outs; c++) {
            long n = 0;
            for (long i = 0; i < nw; i++)
                n += __builtin_popcountll(x[r * xs + i] ^ w[c * ws + i]);
            d[r * ds + c] = (int32_t)n;
        }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define AVX2_FN __attribute__((target("avx2,popcnt")))
#define AVX512_FN __attribute__((target("avx512f,avx512vpopcntdq,popcnt")))

/* popcount of each 64-bit lane of v: per-byte counts from the nibble table, summed by vpsadbw */
AVX2_FN static inline __m256i popcnt256(__m256i v)
{
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f);
    __m256i n = _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_and_si256(v, low)),
                                _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4),
                                                                          low)));
    return _mm256_sad_epu8(n, _mm256_setzero_si256());
}

AVX2_FN static inline long hsum256(__m256i v)
{
    return _mm256_extract_epi64(v, 0) + _mm256_extract_epi64(v, 1) + _mm256_extract_epi64(v, 2) +
           _mm256_extract_epi64(v, 3);
}

/* An R x C register tile over 4-word steps, the last nw % 4 words in scalar popcounts. */
#define XTILE2(R, C)                                                                          \
    AVX2_FN static void xtile2_##R##_##C(const uint64_t *x, long xs, const uint64_t *w,       \
                                         long ws, long nw, int32_t *d, long ds)               \
    {                                                                                         \
        __m256i acc[R][C];                                                                    \
        for (int r = 0; r < R; r++)                                                           \
            for (int c = 0; c < C; c++)                                                       \
                acc[r][c] = _mm256_setzero_si256();                                           \
        long i = 0;                                                                           \
        for (; i + 4 <= nw; i += 4) {                                                         \
            __m256i wv[C];                                                                    \
            for (int c = 0; c < C; c++)                                                       \
                wv[c] = _mm256_loadu_si256((const __m256i *)(w + c * ws + i));                \
            for (int r = 0; r < R; r++) {                                                     \
                __m256i xv = _mm256_loadu_si256((const __m256i *)(x + r * xs + i));           \
                for (int c = 0; c < C; c++)                                                   \
                    acc[r][c] = _mm256_add_epi64(acc[r][c],                                   \
                                                 popcnt256(_mm256_xor_si256(xv, wv[c])));     \
            }                                                                                 \
        }                                                                                     \
        for (int r = 0; r < R; r++)                                                           \
            for (int c = 0; c < C; c++) {                                                     \
                long n = hsum256(acc[r][c]);                                                  \
                for (long j = i; j < nw; j++)                                                 \
                    n += __builtin_popcountll(x[r * xs + j] ^ w[c * ws + j]);                 \
                d[r * ds + c] = (int32_t)n;                                                   \
            }                                                                                 \
    }
XTILE2(4, 2)
XTILE2(1, 4)
XTILE2(1, 1)

/* The 8 lane sums of a0..a7 as 8 int32, by a transposition tree: 21 instructions instead of 8
   reductions of about 7, which at a conv's 18-word rows (3 steps of the 4 x 4 tile) cost more
   than the popcounts. */
AVX512_FN static inline __m256i sum8(__m512i a0, __m512i a1, __m512i a2, __m512i a3, __m512i a4,
                                     __m512i a5, __m512i a6, __m512i a7)
{
    /* by value: an address taken of the accumulators would keep them in memory, not registers */
    const __m512i a[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
    __m512i u[4], v[2];
    for (int i = 0; i < 4; i++) /* 128-bit lane L of u[i]: the pair sums of a[2i], a[2i+1] */
        u[i] = _mm512_add_epi64(_mm512_unpacklo_epi64(a[2 * i], a[2 * i + 1]),
                                _mm512_unpackhi_epi64(a[2 * i], a[2 * i + 1]));
    for (int j = 0; j < 2; j++)
        v[j] = _mm512_add_epi64(_mm512_shuffle_i64x2(u[2 * j], u[2 * j + 1], 0x88),
                                _mm512_shuffle_i64x2(u[2 * j], u[2 * j + 1], 0xdd));
    return _mm512_cvtepi64_epi32(_mm512_add_epi64(_mm512_shuffle_i64x2(v[0], v[1], 0x88),
                                                  _mm512_shuffle_i64x2(v[0], v[1], 0xdd)));
}

/* The same tiles in 8-word steps with vpopcntq; the last nw % 8 words by a masked load. */
#define ACC(i, R, C) acc[(i) / (C) % (R)][(i) % (C)] /* the modulo keeps dead code in bounds */
#define XTILE512(R, C)                                                                        \
    AVX512_FN static void xtile512_##R##_##C(const uint64_t *x, long xs, const uint64_t *w,   \
                                             long ws, long nw, int32_t *d, long ds)           \
    {                                                                                         \
        __m512i acc[R][C];                                                                    \
        for (int r = 0; r < R; r++)                                                           \
            for (int c = 0; c < C; c++)                                                       \
                acc[r][c] = _mm512_setzero_si512();                                           \
        for (long i = 0; i < nw; i += 8) {                                                    \
            __mmask8 m = nw - i >= 8 ? 0xff : (__mmask8)((1u << (nw - i)) - 1);               \
            __m512i wv[C];                                                                    \
            for (int c = 0; c < C; c++)                                                       \
                wv[c] = _mm512_maskz_loadu_epi64(m, w + c * ws + i);                          \
            for (int r = 0; r < R; r++) {                                                     \
                __m512i xv = _mm512_maskz_loadu_epi64(m, x + r * xs + i);                     \
                for (int c = 0; c < C; c++)                                                   \
                    acc[r][c] = _mm512_add_epi64(acc[r][c],                                   \
                                                 _mm512_popcnt_epi64(_mm512_xor_si512(xv,     \
                                                                                      wv[c]))); \
            }                                                                                 \
        }                                                                                     \
        if (R * C == 1) {                                                                     \
            d[0] = (int32_t)_mm512_reduce_add_epi64(acc[0][0]);                               \
            return;                                                                           \
        }                                                                                     \
        for (int k = 0; k < R * C; k += 8) { /* 8 sums = R / C rows of C outputs */            \
            __m256i s = sum8(ACC(k, R, C), ACC(k + 1, R, C), ACC(k + 2, R, C), ACC(k + 3, R, C), \
                             ACC(k + 4, R, C), ACC(k + 5, R, C), ACC(k + 6, R, C),            \
                             ACC(k + 7, R, C));                                               \
            for (int j = 0; j < 8; j += C)                                                    \
                _mm_storeu_si128((__m128i *)(d + ((k + j) / C) * ds), j < 4 ?                  \
                                 _mm256_castsi256_si128(s) : _mm256_extracti128_si256(s, 1));  \
            if (C == 8)                                                                       \
                _mm_storeu_si128((__m128i *)(d + (k / C) * ds + 4),                           \
                                 _mm256_extracti128_si256(s, 1));                             \
        }                                                                                     \
    }
XTILE512(4, 4)
XTILE512(1, 8)
XTILE512(1, 1)

/* rows x outs in an ISA's tiles: 4 x C4 at batch >= 4, 1 x C1 for the rows left, 1 x 1 for the
   outputs left */
#define COUNTS(NAME, ATTR, TILE4, C4, TILE1, C1, TILE11)                                      \
    ATTR static void NAME(const uint64_t *x, long xs, long rows, const uint64_t *w, long ws,  \
                          long outs, long nw, int32_t *d, long ds)                            \
    {                                                                                         \
        long r = 0;                                                                           \
        for (; r + 4 <= rows; r += 4) {                                                       \
            long c = 0;                                                                       \
            for (; c + C4 <= outs; c += C4)                                                   \
                TILE4(x + r * xs, xs, w + c * ws, ws, nw, d + r * ds + c, ds);                \
            for (; c < outs; c++)                                                             \
                for (long k = 0; k < 4; k++)                                                  \
                    TILE11(x + (r + k) * xs, xs, w + c * ws, ws, nw, d + (r + k) * ds + c, ds); \
        }                                                                                     \
        for (; r < rows; r++) {                                                               \
            long c = 0;                                                                       \
            for (; c + C1 <= outs; c += C1)                                                   \
                TILE1(x + r * xs, xs, w + c * ws, ws, nw, d + r * ds + c, ds);                \
            for (; c < outs; c++)                                                             \
                TILE11(x + r * xs, xs, w + c * ws, ws, nw, d + r * ds + c, ds);               \
        }                                                                                     \
    }
COUNTS(counts_avx2, AVX2_FN, xtile2_4_2, 2, xtile2_1_4, 4, xtile2_1_1)
COUNTS(counts_avx512, AVX512_FN, xtile512_4_4, 4, xtile512_1_8, 8, xtile512_1_1)
#endif

/* For the benchmark's floor: popcount(x XOR key) summed over x[0..n) (n a multiple of 32 words),
   `reps` passes on each thread, 8 independent accumulators so that the popcount units, not an
   add's latency, set the pace; over a buffer in L1, the bits per second of the path's popcount. */
__attribute__((optimize("no-tree-vectorize"))) static long popsum_portable(const uint64_t *x,
                                                                           long n, long reps)
{
    long a[8] = {0};
    for (long rep = 0; rep < reps; rep++)
        for (long i = 0; i < n; i += 8)
            for (int k = 0; k < 8; k++)
                a[k] += __builtin_popcountll(x[i + k] ^ (uint64_t)rep);
    return a[0] + a[1] + a[2] + a[3] + a[4] + a[5] + a[6] + a[7];
}

#if defined(__x86_64__) && defined(__GNUC__)
AVX2_FN static long popsum_avx2(const uint64_t *x, long n, long reps)
{
    __m256i a[8];
    for (int k = 0; k < 8; k++)
        a[k] = _mm256_setzero_si256();
    for (long rep = 0; rep < reps; rep++) {
        __m256i key = _mm256_set1_epi64x(rep);
        for (long i = 0; i < n; i += 32)
            for (int k = 0; k < 8; k++)
                a[k] = _mm256_add_epi64(a[k], popcnt256(_mm256_xor_si256(
                                                  _mm256_loadu_si256((const void *)(x + i + 4 * k)),
                                                  key)));
    }
    long s = 0;
    for (int k = 0; k < 8; k++)
        s += hsum256(a[k]);
    return s;
}

AVX512_FN static long popsum_avx512(const uint64_t *x, long n, long reps)
{
    __m512i a[4];
    for (int k = 0; k < 4; k++)
        a[k] = _mm512_setzero_si512();
    for (long rep = 0; rep < reps; rep++) {
        __m512i key = _mm512_set1_epi64(rep);
        for (long i = 0; i < n; i += 32)
            for (int k = 0; k < 4; k++)
                a[k] = _mm512_add_epi64(a[k], _mm512_popcnt_epi64(_mm512_xor_si512(
                                                  _mm512_loadu_si512(x + i + 8 * k), key)));
    }
    long s = 0;
    for (int k = 0; k < 4; k++)
        s += _mm512_reduce_add_epi64(a[k]);
    return s;
}
#endif

long bc_popsum(const uint64_t *x, long n, long reps, int threads, int path)
{
    long total = 0;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(+ : total)
    for (int t = 0; t < threads; t++) {
#if defined(__x86_64__) && defined(__GNUC__)
        if (path == 2) {
            total += popsum_avx512(x, n, reps);
            continue;
        }
        if (path == 1) {
            total += popsum_avx2(x, n, reps);
            continue;
        }
#endif
        total += popsum_portable(x, n, reps);
    }
    return total;
}

/* Bit 0 portable, bit 1 AVX2, bit 2 AVX-512 VPOPCNTDQ: the paths this CPU can run. */
int bc_xnor_paths(void)
{
    int paths = 1;
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt"))
        paths |= 2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq"))
        paths |= 4;
#endif
    return paths;
}

/* The output word of 64 units from their counts d and thresholds t: bit j = (d[j] > t[j]). */
static uint64_t bits_portable(const int32_t *d, const int32_t *t)
{
    uint64_t word = 0;
    for (int j = 0; j < 64; j++)
        word |= (uint64_t)(d[j] > t[j]) << j;
    return word;
}

#if defined(__x86_64__) && defined(__GNUC__)
AVX2_FN static uint64_t bits_avx2(const int32_t *d, const int32_t *t)
{
    uint64_t word = 0;
    for (int k = 0; k < 8; k++) {
        __m256i gt = _mm256_cmpgt_epi32(_mm256_loadu_si256((const __m256i *)(d + 8 * k)),
                                        _mm256_loadu_si256((const __m256i *)(t + 8 * k)));
        word |= (uint64_t)(uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(gt)) << (8 * k);
    }
    return word;
}

AVX512_FN static uint64_t bits_avx512(const int32_t *d, const int32_t *t)
{
    uint64_t word = 0;
    for (int k = 0; k < 4; k++)
        word |= (uint64_t)_mm512_cmpgt_epi32_mask(_mm512_loadu_si512(d + 16 * k),
                                                  _mm512_loadu_si512(t + 16 * k)) << (16 * k);
    return word;
}
#endif

/* One binary layer on packed bits. For each row r of x (rows x nw words, stride xs) and output o
   (w: n_out x nw words, stride ws), d = popcount(x_r XOR w_o). With counts != NULL: counts[r *
   n_out + o] = d (the last layer, whose batch norm gives the scores). Otherwise the output bit,
   set for -1, is (d > thr[cfg * ts + o]) XOR bit o of flip, cfg = row_cfg ? row_cfg[r] : 0 (a
   convolution's border class, whose zero padding moves the threshold); thr rows padded to ts, a
   multiple of 64; out: rows x ow words, bit j of word k for output 64k + j, zero past n_out.
   path: 0 portable, 1 AVX2, 2 AVX-512 (the caller checks bc_xnor_paths). Work items: (row tile,
   64 outputs) pairs, as in bc_dense. */
void bc_xnor(const uint64_t *x, long rows, long xs, const uint64_t *w, long n_out, long ws,
             long nw, const int32_t *thr, long ts, const uint64_t *flip, const int32_t *row_cfg,
             uint64_t *out, long ow, int32_t *counts, int threads, int path)
{
    counts_fn f = counts_portable;
    uint64_t (*bits)(const int32_t *, const int32_t *) = bits_portable;
#if defined(__x86_64__) && defined(__GNUC__)
    if (path == 1)
        f = counts_avx2, bits = bits_avx2;
    else if (path == 2)
        f = counts_avx512, bits = bits_avx512;
#endif
    long rt = rows >= 4 ? 4 : 1;
    long n_rt = (rows + rt - 1) / rt, n_oc = (n_out + X_CHUNK - 1) / X_CHUNK;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (long item = 0; item < n_rt * n_oc; item++) {
        long r0 = item / n_oc * rt, o0 = item % n_oc * X_CHUNK;
        long nr = rows - r0 < rt ? rows - r0 : rt, no = n_out - o0 < X_CHUNK ? n_out - o0 : X_CHUNK;
        if (counts) {
            f(x + r0 * xs, xs, nr, w + o0 * ws, ws, no, nw, counts + r0 * n_out + o0, n_out);
            continue;
        }
        int32_t d[4 * X_CHUNK];
        if (no < X_CHUNK)
            memset(d, 0, sizeof d);
        f(x + r0 * xs, xs, nr, w + o0 * ws, ws, no, nw, d, X_CHUNK);
        uint64_t valid = no < X_CHUNK ? (1ULL << no) - 1 : ~0ULL;
        for (long r = 0; r < nr; r++) {
            const int32_t *t = thr + (row_cfg ? row_cfg[r0 + r] : 0) * ts + o0;
            out[(r0 + r) * ow + o0 / X_CHUNK] = (bits(d + r * X_CHUNK, t) ^ flip[o0 / X_CHUNK]) &
                                                valid;
        }
    }
}

int bc_avx2(void)
{
#ifdef __AVX2__
    return 1;
#else
    return 0;
#endif
}
