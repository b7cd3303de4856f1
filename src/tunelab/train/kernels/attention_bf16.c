/* Causal attention forward for bf16 on x86 CPUs with AVX512-BF16 (no gradients): evaluation and prefill.

   out = softmax(q k^T * scale + causal mask) v, for the query heads of one key/value head at a time (grouped-query
   attention: k and v are read once for the whole group). Scores are bf16 x bf16 products summed in fp32 (vdpbf16ps),
   the softmax is fp32, the probabilities meet v in bf16 with fp32 sums: the precision of torch's flash kernel and of
   tunelab's blocked attention (attention.py), in one pass that keeps a block's scores in the cache.

   Built by kernels.py with the system C compiler the first time it is needed, and called through ctypes (which
   releases the GIL). One call runs on the calling thread only. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))
#define ROWS 8  /* query rows per score block: 8 rows x 2 key tiles = 16 accumulators */

/* exp(x) for x <= 0, fp32, ~1e-7 relative (Cephes' polynomial after x = n ln2 + r); exp(-inf) = 0. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* k [keys, dim] -> tiles of 16 keys, each [dim / 2][16 keys][2]: one load gives a dimension pair of 16 keys. */
static void pack_keys(const uint16_t *k, uint16_t *kp, int64_t keys, int64_t dim, int64_t tiles) {
    memset(kp, 0, (size_t)tiles * 16 * dim * sizeof(uint16_t));
    for (int64_t t = 0; t < keys; t++) {
        uint16_t *tile = kp + (t / 16) * 16 * dim;
        for (int64_t d = 0; d < dim; d += 2) {
            uint16_t *dst = tile + (d / 2) * 32 + (t % 16) * 2;
            dst[0] = k[t * dim + d];
            dst[1] = k[t * dim + d + 1];
        }
    }
}

/* v [keys, dim] -> [keys / 2][dim][2]: one load gives 16 dimensions of a pair of keys. */
static void pack_values(const uint16_t *v, uint16_t *vp, int64_t keys, int64_t dim, int64_t pairs) {
    memset(vp, 0, (size_t)pairs * 2 * dim * sizeof(uint16_t));
    for (int64_t t = 0; t < keys; t++) {
        uint16_t *dst = vp + (t / 2) * 2 * dim + (t % 2);
        for (int64_t d = 0; d < dim; d++) dst[2 * d] = v[t * dim + d];
    }
}

static inline __m512 pair(const uint16_t *p) { /* broadcast two adjacent bf16 values to every 32-bit lane */
    int32_t bits;
    memcpy(&bits, p, 4);
    return _mm512_castsi512_ps(_mm512_set1_epi32(bits));
}

/* Scores of ROWS query rows (q: ROWS x DIM) against key tiles [0, tiles): s[r][key] (row stride `stride`). */
INLINE void scores(const uint16_t *q, const uint16_t *kp, float *s, int64_t tiles, int64_t stride,
                          float scale, const int DIM) {
    for (int64_t t = 0; t < tiles; t += 2) {
        const int two = t + 1 < tiles;
        __m512 acc[ROWS][2];
        for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        const uint16_t *k0 = kp + t * 16 * DIM, *k1 = k0 + 16 * DIM;
        for (int p = 0; p < DIM / 2; p++) {
            __m512bh a = (__m512bh)_mm512_loadu_si512(k0 + p * 32);
            __m512bh b = two ? (__m512bh)_mm512_loadu_si512(k1 + p * 32) : a;
            for (int r = 0; r < ROWS; r++) {
                __m512bh x = (__m512bh)pair(q + r * DIM + 2 * p);
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, a);
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, b);
            }
        }
        __m512 sc = _mm512_set1_ps(scale);
        for (int r = 0; r < ROWS; r++) {
            _mm512_storeu_ps(s + r * stride + t * 16, _mm512_mul_ps(acc[r][0], sc));
            if (two) _mm512_storeu_ps(s + r * stride + t * 16 + 16, _mm512_mul_ps(acc[r][1], sc));
        }
    }
}

/* In place: s[0:n] -> exp(s - max) for the first `n` keys, 0 after them up to `padded`, as bf16 into pb; returns the
   sum of the exps of the values as they are rounded to bf16 (so the weights that meet v sum to 1 after the division). */
static inline float softmax_row(float *s, uint16_t *pb, int64_t n, int64_t padded) {
    __m512 mx = _mm512_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + i));
    float m = _mm512_reduce_max_ps(mx);
    for (; i < n; i++) m = s[i] > m ? s[i] : m;
    __m512 vm = _mm512_set1_ps(m), sum = _mm512_setzero_ps();
    for (i = 0; i < padded; i += 32) {
        __mmask16 l0 = i >= n ? 0 : (n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1));
        __mmask16 l1 = i + 16 >= n ? 0 : (n - i - 16 >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i - 16)) - 1));
        __m512 e0 = _mm512_maskz_mov_ps(l0, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(l0, s + i), vm)));
        __m512 e1 = _mm512_maskz_mov_ps(l1, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(l1, s + i + 16), vm)));
        __m512bh b = _mm512_cvtne2ps_pbh(e1, e0);  /* e0 in the low half */
        _mm512_storeu_si512(pb + i, (__m512i)b);
        /* the sum of what meets v: the bf16 values widened back */
        __m512i w = (__m512i)b;
        __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(w)), 16));
        __m512 hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(w, 1)), 16));
        sum = _mm512_add_ps(sum, _mm512_add_ps(lo, hi));
    }
    return _mm512_reduce_add_ps(sum);
}

/* out rows = (pb rows x v) / sums, for `rows` rows over key pairs [0, pairs). Inlined with a constant DIM, so the
   accumulators (GROUP rows x DIM / 16 vectors: 16 of them) live in registers. */
INLINE void weighted_values(const uint16_t *pb, int64_t pstride, const uint16_t *vp, int64_t pairs,
                                   const float *sums, uint16_t *out, int rows, const int DIM) {
    const int GROUP = 256 / DIM;
    for (int r0 = 0; r0 < rows; r0 += GROUP) {
        const int nr = rows - r0 < GROUP ? rows - r0 : GROUP;
        __m512 acc[4][8];
        for (int r = 0; r < GROUP; r++)
            for (int c = 0; c < DIM / 16; c++) acc[r][c] = _mm512_setzero_ps();
        for (int64_t j = 0; j < pairs; j++) {
            __m512bh vv[8];
            for (int c = 0; c < DIM / 16; c++) vv[c] = (__m512bh)_mm512_loadu_si512(vp + j * 2 * DIM + c * 32);
            for (int r = 0; r < GROUP; r++) {
                __m512bh x = (__m512bh)pair(pb + (r0 + r) * pstride + 2 * j);
                for (int c = 0; c < DIM / 16; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], x, vv[c]);
            }
        }
        for (int r = 0; r < nr; r++) {
            __m512 inv = _mm512_set1_ps(1.0f / sums[r0 + r]);
            for (int c = 0; c < DIM / 16; c += 2) {
                __m512 a = _mm512_mul_ps(acc[r][c], inv), b = _mm512_mul_ps(acc[r][c + 1], inv);
                _mm512_storeu_si512(out + (r0 + r) * DIM + c * 16, (__m512i)_mm512_cvtne2ps_pbh(b, a));
            }
        }
    }
}

INLINE int run(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, int64_t n, int64_t group,
                      int64_t length, int64_t keys, int causal, float scale, const int DIM) {
    const int64_t tiles = (keys + 15) / 16, padded = tiles * 16 + 16, pairs_all = (keys + 1) / 2;
    const int64_t offset = keys - length;  /* keys of a cached prefix before the queries' own */
    uint16_t *kp = aligned_alloc(64, (size_t)(tiles + 1) * 16 * DIM * 2 + 64);
    uint16_t *vp = aligned_alloc(64, (size_t)(pairs_all + 1) * 2 * DIM * 2 + 64);
    float *s = aligned_alloc(64, (size_t)ROWS * padded * 4);
    uint16_t *pb = aligned_alloc(64, (size_t)ROWS * padded * 2 + 64);
    if (!kp || !vp || !s || !pb) {
        free(kp), free(vp), free(s), free(pb);
        return 1;
    }
    float sums[ROWS];
    uint16_t tail[ROWS * 128];
    for (int64_t h = 0; h < n; h++) {
        const uint16_t *kh = k + h * keys * DIM, *vh = v + h * keys * DIM;
        pack_keys(kh, kp, keys, DIM, tiles);
        pack_values(vh, vp, keys, DIM, pairs_all);
        for (int64_t g = 0; g < group; g++) {
            const uint16_t *qg = q + (h * group + g) * length * DIM;
            uint16_t *og = out + (h * group + g) * length * DIM;
            for (int64_t i0 = 0; i0 < length; i0 += ROWS) {
                const int rows = length - i0 < ROWS ? (int)(length - i0) : ROWS;
                const int64_t seen = causal ? offset + i0 + rows : keys;  /* keys the block's last row sees */
                const int64_t t = (seen + 15) / 16;
                const uint16_t *qb = qg + i0 * DIM;
                if (rows < ROWS) {  /* the last block of a head: its rows, then zeros */
                    memset(tail, 0, sizeof tail);
                    memcpy(tail, qb, (size_t)rows * DIM * 2);
                    memset(pb + rows * padded, 0, (size_t)(ROWS - rows) * padded * 2);
                    qb = tail;
                }
                scores(qb, kp, s, t, padded, scale, DIM);
                int64_t most = 0;
                for (int r = 0; r < rows; r++) {
                    const int64_t valid = causal ? offset + i0 + r + 1 : keys;
                    const int64_t span = (valid + 31) / 32 * 32;
                    sums[r] = softmax_row(s + r * padded, pb + r * padded, valid, span);
                    most = span > most ? span : most;
                }
                /* rows that see fewer keys were zeroed only up to their own span */
                for (int r = 0; r < rows; r++) {
                    const int64_t valid = causal ? offset + i0 + r + 1 : keys;
                    const int64_t span = (valid + 31) / 32 * 32;
                    memset(pb + r * padded + span, 0, (size_t)(most - span) * 2);
                }
                int64_t pairs = (seen + 1) / 2;
                if (pairs > pairs_all) pairs = pairs_all;
                weighted_values(pb, padded, vp, pairs, sums, og + i0 * DIM, rows, DIM);
            }
        }
    }
    free(kp), free(vp), free(s), free(pb);
    return 0;
}

/* q [n, group, length, dim], k and v [n, keys, dim] (keys >= length; the first keys - length are a cached prefix
   every query sees), out [n, group, length, dim]; all contiguous bf16. Returns 0, or 1 when out of memory, 2 for an
   unsupported head size (64 and 128 are built). */
int tunelab_attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, int64_t n,
                           int64_t group, int64_t length, int64_t keys, int64_t dim, int causal, float scale) {
    if (dim == 64) return run(q, k, v, out, n, group, length, keys, causal, scale, 64);
    if (dim == 128) return run(q, k, v, out, n, group, length, keys, causal, scale, 128);
    return 2;
}
