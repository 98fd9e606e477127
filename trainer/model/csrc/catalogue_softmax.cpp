// The catalogue-wide products and softmax of trainer/logpartition.py, on CPU with bf16 (AVX-512
// BF16). Built by trainer/cpu_kernels.py with -mavx512f -mavx512bw -mavx512vl -mavx512dq
// -mavx512bf16.
//
//   scores(q, items, out):                  out [R, W] = q [R, D] . E^T, rounded to bf16
//   softmax_rows_and_transpose(s, p, p_t):  p [R, W] = softmax of s's rows, p_t [W, R] = p^T
//                                           (p_t's padding columns up to its stride: zeros)
//   log_partition_block(q, items, paired, p_t, lse, expected):
//       per block of 32 rows, in a thread's buffer that stays in cache: the scores, their softmax
//       p, p^T into p_t, lse [R] = each row's log-sum-exp and expected [R, D'] = p . E (float32);
//       neither the scores nor p are written to memory
//
// The numbers: the scores are float32 sums over the pairs of D, in order, rounded to nearest even
// bf16 (oneDNN's AVX-512 product gives the same bits; its AMX one sums in another order), the
// softmax is torch's on those bf16 scores to bf16 rounding, the transpose is exact, and expected
// is the float32 sum of p . E. trainer/kernel_check.py checks all of it against float64 where it
// is loaded. Measured at Beauty's shapes (1,570 x 12,102, D 64, 2 threads): the score
// product ~1.6x faster than oneDNN's (whose K = 64 product runs at ~2/3 of the machine's bf16
// rate); the product that needs the transpose (softmax^T . (w q)) runs ~1.5x slower on a
// transposed view than on p_t.
//
// Operand layouts (trainer/cpu_kernels.py): `items` [T, D/2, 16] int32, T = ceil(W / 16) tiles,
// word [t, k, l] = the bf16 pair E[16 t + l, 2k : 2k + 2] (pack_items); `paired` [ceil(W / 2), D']
// int32, D' = D rounded up to 16, word [j, d] = the bf16 pair (E[2j, d], E[2j + 1, d])
// (pair_items); zeros past W and D. One 64-byte load gives 16 items' (or dims') pair, the operand
// of vdpbf16ps.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kBlockRows = 32;   // rows per block: the transpose writes 32 bf16 = 64 bytes
constexpr int kTileRows = 8;         // the product's register tile: 8 rows x 3 x 16 items,
constexpr int kTileVectors = 3;      //   24 float32 accumulators of the 32 registers
constexpr int64_t kChunkTiles = 48;  // 768 items (96 KB packed at D = 64) stay in L2 per chunk
constexpr int64_t kChunkPairs = 256;  // of expected = p . E: 512 items (64 KB at D = 64)

// exp(x) for 16 floats: 2^n * 2^f with x * log2(e) = n + f, |f| <= 1/2 (degree-6 polynomial,
// ~1e-7 relative); inputs below -87 give exp(-87) ~ 1.6e-38; NaN stays NaN.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);  // returns x where x is NaN
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 y = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.693147180559945309f));
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// 16 bf16 values (lanes outside `mask` read as 0) as floats
inline __m512 load16(const at::BFloat16* src, __mmask16 mask) {
  const __m256i raw = _mm256_maskz_loadu_epi16(mask, src);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// 16 floats as bf16, rounded to nearest even (torch's rounding)
inline __m256i to_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

// The columns of a row of W values: 16 * full + the lanes of `tail`.
struct Width {
  int64_t width, full;
  __mmask16 tail;
  explicit Width(int64_t w) : width(w), full(w / 16), tail(static_cast<__mmask16>((1u << (w % 16)) - 1)) {}
  int64_t tiles() const { return full + (tail ? 1 : 0); }
};

// The largest of a row's W bf16 values (NaN ignored: it makes the row NaN in row_exp).
float row_max(const at::BFloat16* s, const Width& w) {
  __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
  int64_t i = 0;
  for (; i + 4 <= w.full; i += 4) {  // four chains: the max's latency does not bind
    m0 = _mm512_max_ps(load16(s + 16 * i, 0xFFFF), m0);
    m1 = _mm512_max_ps(load16(s + 16 * i + 16, 0xFFFF), m1);
    m2 = _mm512_max_ps(load16(s + 16 * i + 32, 0xFFFF), m2);
    m3 = _mm512_max_ps(load16(s + 16 * i + 48, 0xFFFF), m3);
  }
  for (; i < w.full; ++i) m0 = _mm512_max_ps(load16(s + 16 * i, 0xFFFF), m0);
  if (w.tail) m0 = _mm512_mask_max_ps(m0, w.tail, load16(s + 16 * w.full, w.tail), m0);
  return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
}

// One row: buffer[0, W) = exp(s - top), returns their sum.
float row_exp(const at::BFloat16* s, const Width& w, float top_value, float* buffer) {
  const __m512 top = _mm512_set1_ps(top_value);
  __m512 a0 = _mm512_setzero_ps(), a1 = a0;
  int64_t i = 0;
  for (; i + 2 <= w.full; i += 2) {
    const __m512 e0 = exp16(_mm512_sub_ps(load16(s + 16 * i, 0xFFFF), top));
    const __m512 e1 = exp16(_mm512_sub_ps(load16(s + 16 * i + 16, 0xFFFF), top));
    _mm512_storeu_ps(buffer + 16 * i, e0);
    _mm512_storeu_ps(buffer + 16 * i + 16, e1);
    a0 = _mm512_add_ps(a0, e0);
    a1 = _mm512_add_ps(a1, e1);
  }
  for (; i < w.full; ++i) {
    const __m512 e = exp16(_mm512_sub_ps(load16(s + 16 * i, 0xFFFF), top));
    _mm512_storeu_ps(buffer + 16 * i, e);
    a0 = _mm512_add_ps(a0, e);
  }
  if (w.tail) {
    const __m512 e = _mm512_maskz_mov_ps(w.tail, exp16(_mm512_sub_ps(load16(s + 16 * w.full, w.tail), top)));
    _mm512_storeu_ps(buffer + 16 * w.full, e);
    a0 = _mm512_add_ps(a0, e);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

// One row's softmax: dst = bf16(buffer * scale).
void write_row(const float* buffer, float scale_value, const Width& w, at::BFloat16* dst) {
  const __m512 scale = _mm512_set1_ps(scale_value);
  for (int64_t c = 0; c < w.full; ++c)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16 * c),
                        to_bf16(_mm512_mul_ps(_mm512_loadu_ps(buffer + 16 * c), scale)));
  if (w.tail)
    _mm256_mask_storeu_epi16(dst + 16 * w.full, w.tail,
                             to_bf16(_mm512_mul_ps(_mm512_loadu_ps(buffer + 16 * w.full), scale)));
}

// A 16 x 16 bf16 tile: rows[0..15] (16 values each) -> cols[j] = the 16 rows' values at column j.
void transpose16(const __m256i* rows, __m256i* cols) {
  __m512i w[8], t[8], u[8];
  for (int k = 0; k < 8; ++k)  // rows 2k and 2k + 1 as one 32-bit word per column
    w[k] = _mm512_or_si512(_mm512_cvtepu16_epi32(rows[2 * k]),
                           _mm512_slli_epi32(_mm512_cvtepu16_epi32(rows[2 * k + 1]), 16));
  for (int k = 0; k < 4; ++k) {
    t[2 * k] = _mm512_unpacklo_epi32(w[2 * k], w[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_epi32(w[2 * k], w[2 * k + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // u[j] 128-bit lane L: column 4L + j, words 4h .. 4h + 3
    u[4 * h + 0] = _mm512_unpacklo_epi64(t[4 * h + 0], t[4 * h + 2]);
    u[4 * h + 1] = _mm512_unpackhi_epi64(t[4 * h + 0], t[4 * h + 2]);
    u[4 * h + 2] = _mm512_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]);
    u[4 * h + 3] = _mm512_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]);
  }
  for (int j = 0; j < 4; ++j) {  // lanes (u[j] L, u[4 + j] L) side by side: column 4L + j
    __m512i lo = _mm512_shuffle_i32x4(u[j], u[4 + j], _MM_SHUFFLE(1, 0, 1, 0));
    __m512i hi = _mm512_shuffle_i32x4(u[j], u[4 + j], _MM_SHUFFLE(3, 2, 3, 2));
    lo = _mm512_shuffle_i32x4(lo, lo, _MM_SHUFFLE(3, 1, 2, 0));
    hi = _mm512_shuffle_i32x4(hi, hi, _MM_SHUFFLE(3, 1, 2, 0));
    cols[j] = _mm512_castsi512_si256(lo);
    cols[4 + j] = _mm512_extracti64x4_epi64(lo, 1);
    cols[8 + j] = _mm512_castsi512_si256(hi);
    cols[12 + j] = _mm512_extracti64x4_epi64(hi, 1);
  }
}

// A block's `count` rows of probs (count <= 32, row stride ps) to as many columns of probs_t
// (64-byte aligned), in 32 x 16 tiles transposed in registers, written as whole 64-byte lines
// streamed past the cache. A last block of fewer than 32 rows writes zeros in the rest of its
// line: the padding columns of probs_t, which a consumer may read. (oneDNN's AMX matmul reads a
// K tail as a whole tile up to the row stride and relies on the other operand's zeros; NaN or Inf
// left there from a reused buffer made 0 * NaN = NaN in the table's gradient.)
void transpose_block(const at::BFloat16* probs, int64_t ps, int64_t count, const Width& w,
                     at::BFloat16* probs_t, int64_t ts) {
  __m256i tile[32], cols[2][16];
  for (int64_t c = 0; c < w.tiles(); ++c) {
    const __mmask16 mask = c < w.full ? static_cast<__mmask16>(0xFFFF) : w.tail;
    for (int64_t r = 0; r < 32; ++r)
      tile[r] = r < count ? _mm256_maskz_loadu_epi16(mask, probs + r * ps + 16 * c)
                          : _mm256_setzero_si256();
    transpose16(tile, cols[0]);
    transpose16(tile + 16, cols[1]);
    const int64_t valid = std::min<int64_t>(16, w.width - 16 * c);
    for (int64_t j = 0; j < valid; ++j) {
      const __m512i line = _mm512_inserti64x4(_mm512_castsi256_si512(cols[0][j]), cols[1][j], 1);
      _mm512_stream_si512(reinterpret_cast<__m512i*>(probs_t + (16 * c + j) * ts), line);
    }
  }
}

// The register tile of both products: acc[r][v] += sum over k in [k0, k1) of the bf16 pair
// pair_a(r, k) (broadcast) times the 16 bf16 pairs at pairs_b(v, k) (one 64-byte load), in order of k.
template <int RB, int VECTORS, typename PairA, typename PairsB>
inline void dot_pairs(__m512 (&acc)[RB][VECTORS], int64_t k0, int64_t k1, PairA pair_a, PairsB pairs_b) {
  for (int64_t k = k0; k < k1; ++k) {
    __m512i b[VECTORS];
#pragma GCC unroll 3
    for (int v = 0; v < VECTORS; ++v) b[v] = _mm512_loadu_si512(pairs_b(v, k));
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      const __m512i a = _mm512_set1_epi32(pair_a(r, k));
#pragma GCC unroll 3
      for (int v = 0; v < VECTORS; ++v)
        acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)a, (__m512bh)b[v]);
    }
  }
}

// One register tile of the product: rows [0, RB) of q (as bf16 pairs, `pairs` per row) times
// VECTORS tiles of 16 packed items from `items` -> bf16 scores at out[r * ld + 16 * (tile + v)]
// (whole tiles: `out` has room up to the packed width); the row maxima of the items below
// `width` are folded into max[0, RB) when max is not null.
template <int RB, int VECTORS>
inline void product_tile(const int32_t* q, int64_t pairs, const int32_t* items, int64_t tile,
                         int64_t width, at::BFloat16* out, int64_t ld, __m512* max) {
  __m512 acc[RB][VECTORS];
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 3
    for (int v = 0; v < VECTORS; ++v) acc[r][v] = _mm512_setzero_ps();
  const int32_t* b_at = items + tile * pairs * 16;
  dot_pairs<RB, VECTORS>(
      acc, 0, pairs, [&](int r, int64_t k) { return q[r * pairs + k]; },
      [&](int v, int64_t k) { return b_at + (v * pairs + k) * 16; });
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 3
    for (int v = 0; v < VECTORS; ++v) {
      const int64_t col = 16 * (tile + v);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * ld + col), to_bf16(acc[r][v]));
      if (max == nullptr || col >= width) continue;
      // the max of the rounded scores is the rounded max (rounding is monotonic)
      const __mmask16 valid = col + 16 <= width ? 0xFFFF : static_cast<__mmask16>((1u << (width - col)) - 1);
      max[r] = _mm512_mask_max_ps(max[r], valid, acc[r][v], max[r]);  // NaN ignored
    }
}

// Scores of `count` rows of q (count <= 32) against all packed items: out [count, ld] bf16 with
// ld >= 16 * tiles; chunks of items stay in L2 while every row tile passes over them.
void product_block(const int32_t* q, int64_t pairs, int64_t count, const int32_t* items,
                   int64_t tiles, int64_t width, at::BFloat16* out, int64_t ld, __m512* max) {
  for (int64_t t0 = 0; t0 < tiles; t0 += kChunkTiles) {
    const int64_t t1 = std::min(tiles, t0 + kChunkTiles);
    int64_t r = 0;
    for (; r + kTileRows <= count; r += kTileRows) {
      __m512* m = max ? max + r : nullptr;
      int64_t t = t0;
      for (; t + kTileVectors <= t1; t += kTileVectors)
        product_tile<kTileRows, kTileVectors>(q + r * pairs, pairs, items, t, width, out + r * ld, ld, m);
      for (; t < t1; ++t)
        product_tile<kTileRows, 1>(q + r * pairs, pairs, items, t, width, out + r * ld, ld, m);
    }
    for (; r + 2 <= count; r += 2)  // the block's last rows (fewer than 8): two at a time
      for (int64_t t = t0; t < t1; ++t)
        product_tile<2, 1>(q + r * pairs, pairs, items, t, width, out + r * ld, ld, max ? max + r : nullptr);
    if (r < count)
      for (int64_t t = t0; t < t1; ++t)
        product_tile<1, 1>(q + r * pairs, pairs, items, t, width, out + r * ld, ld, max ? max + r : nullptr);
  }
}

// One register tile of expected = p . E: rows [0, RB) of a block's softmax (row stride ld, read as
// bf16 pairs of items) times VECTORS x 16 dims of `paired` from dim `dim0`, over the item pairs
// [j0, j1); float32 sums carried in and out through acc_io (row stride dims).
template <int RB, int VECTORS>
inline void expected_tile(const at::BFloat16* probs, int64_t ld, const int32_t* paired, int64_t dims,
                          int64_t dim0, int64_t j0, int64_t j1, float* acc_io) {
  __m512 acc[RB][VECTORS];
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < VECTORS; ++v) acc[r][v] = _mm512_loadu_ps(acc_io + r * dims + dim0 + 16 * v);
  dot_pairs<RB, VECTORS>(
      acc, j0, j1, [&](int r, int64_t j) { return reinterpret_cast<const int32_t*>(probs + r * ld)[j]; },
      [&](int v, int64_t j) { return paired + j * dims + dim0 + 16 * v; });
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < VECTORS; ++v) _mm512_storeu_ps(acc_io + r * dims + dim0 + 16 * v, acc[r][v]);
}

// expected [count, dims] = a block's softmax [count, 2 * item_pairs] (bf16, row stride ld) . E,
// E paired by items ([item_pairs, dims] int32); chunks of item pairs stay in L2 while every row
// tile passes over them.
void expected_block(const at::BFloat16* probs, int64_t ld, int64_t count, const int32_t* paired,
                    int64_t item_pairs, int64_t dims, float* expected) {
  std::fill_n(expected, count * dims, 0.0f);
  for (int64_t j0 = 0; j0 < item_pairs; j0 += kChunkPairs) {
    const int64_t j1 = std::min(item_pairs, j0 + kChunkPairs);
    for (int64_t d = 0; d < dims; d += 32) {
      const bool two = d + 32 <= dims;
      int64_t r = 0;
      for (; r + kTileRows <= count; r += kTileRows)
        two ? expected_tile<kTileRows, 2>(probs + r * ld, ld, paired, dims, d, j0, j1, expected + r * dims)
            : expected_tile<kTileRows, 1>(probs + r * ld, ld, paired, dims, d, j0, j1, expected + r * dims);
      for (; r < count; ++r)
        two ? expected_tile<1, 2>(probs + r * ld, ld, paired, dims, d, j0, j1, expected + r * dims)
            : expected_tile<1, 1>(probs + r * ld, ld, paired, dims, d, j0, j1, expected + r * dims);
    }
  }
}

// A thread's scratch of at least n elements, kept between calls: the pool's threads persist, and
// a fresh allocation of the block's ~0.8 MB on every call is paid in page faults.
template <typename T>
T* thread_scratch(size_t n) {
  thread_local std::vector<T> scratch;
  if (scratch.size() < n) scratch.resize(n);
  return scratch.data();
}

void check_bf16_cpu(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16, what, ": a bfloat16 CPU tensor");
}

void check_transpose_buffer(const torch::Tensor& probs_t) {
  check_bf16_cpu(probs_t, "probs_t");
  TORCH_CHECK(probs_t.dim() == 2 && probs_t.stride(1) == 1, "probs_t must be [W, R], rows contiguous");
  TORCH_CHECK(probs_t.stride(0) % 32 == 0 && probs_t.stride(0) >= probs_t.size(1) &&
                  reinterpret_cast<uintptr_t>(probs_t.data_ptr()) % 64 == 0,
              "probs_t must start on 64 bytes, rows a multiple of 32 apart");
}

void check_transpose(const torch::Tensor& probs, const torch::Tensor& probs_t) {
  check_bf16_cpu(probs, "probs");
  check_transpose_buffer(probs_t);
  TORCH_CHECK(probs.dim() == 2 && probs_t.size(0) == probs.size(1) && probs_t.size(1) == probs.size(0),
              "probs [R, W] and probs_t [W, R]");
  TORCH_CHECK(probs.stride(1) == 1, "rows must be contiguous");
}

// q [R, D] bf16 contiguous, D even; items [T, D/2, 16] int32 with 16 T >= width.
void check_product(const torch::Tensor& q, const torch::Tensor& items, int64_t width) {
  check_bf16_cpu(q, "q");
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.size(1) % 2 == 0, "q must be [R, D] contiguous, D even");
  TORCH_CHECK(items.device().is_cpu() && items.scalar_type() == at::kInt && items.dim() == 3 &&
                  items.is_contiguous() && items.size(1) == q.size(1) / 2 && items.size(2) == 16 &&
                  16 * items.size(0) >= width,
              "items must be the packed table [ceil(W / 16), D / 2, 16] int32 (cpu_kernels.pack_items)");
}

}  // namespace

void scores(const torch::Tensor& q, const torch::Tensor& items, torch::Tensor& out) {
  check_bf16_cpu(out, "out");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == q.size(0) && out.stride(1) == 1, "out must be [R, W], rows contiguous");
  check_product(q, items, out.size(1));
  const int64_t rows = q.size(0), pairs = q.size(1) / 2, width = out.size(1), ld = out.stride(0);
  const int64_t tiles = (width + 15) / 16, whole = width / 16;  // whole: tiles that fit in `out`
  const int32_t* q_pairs = reinterpret_cast<const int32_t*>(q.data_ptr<at::BFloat16>());
  at::BFloat16* dst = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, (rows + kBlockRows - 1) / kBlockRows, 1, [&](int64_t begin, int64_t end) {
    std::vector<at::BFloat16> last_tile(kBlockRows * 16);  // whole tiles past `width` land here
    for (int64_t block = begin; block < end; ++block) {
      const int64_t r0 = kBlockRows * block, count = std::min(kBlockRows, rows - r0);
      product_block(q_pairs + r0 * pairs, pairs, count, items.data_ptr<int32_t>(), whole, width,
                    dst + r0 * ld, ld, nullptr);
      if (whole == tiles) continue;
      for (int64_t r = 0; r < count; ++r)  // the last, partial tile through a scratch row
        product_tile<1, 1>(q_pairs + (r0 + r) * pairs, pairs, items.data_ptr<int32_t>() + whole * pairs * 16,
                           0, width, last_tile.data() + r * 16, 16, nullptr);
      for (int64_t r = 0; r < count; ++r)
        std::copy_n(last_tile.data() + r * 16, width - 16 * whole, dst + (r0 + r) * ld + 16 * whole);
    }
  });
}

void softmax_rows_and_transpose(const torch::Tensor& scores, torch::Tensor& probs, torch::Tensor& probs_t) {
  check_bf16_cpu(scores, "scores");
  check_transpose(probs, probs_t);
  TORCH_CHECK(scores.dim() == 2 && scores.sizes() == probs.sizes() && scores.stride(1) == 1,
              "scores [R, W] like probs, rows contiguous");
  const int64_t rows = scores.size(0), ss = scores.stride(0), ps = probs.stride(0), ts = probs_t.stride(0);
  const Width w(scores.size(1));
  if (rows == 0 || w.width == 0) return;
  const at::BFloat16* in = scores.data_ptr<at::BFloat16>();
  at::BFloat16* out = probs.data_ptr<at::BFloat16>();
  at::BFloat16* out_t = probs_t.data_ptr<at::BFloat16>();
  at::parallel_for(0, (rows + kBlockRows - 1) / kBlockRows, 1, [&](int64_t begin, int64_t end) {
    float* buffer = thread_scratch<float>(16 * w.tiles());
    for (int64_t block = begin; block < end; ++block) {
      const int64_t r0 = kBlockRows * block, count = std::min(kBlockRows, rows - r0);
      for (int64_t r = r0; r < r0 + count; ++r) {
        const float sum = row_exp(in + r * ss, w, row_max(in + r * ss, w), buffer);
        write_row(buffer, 1.0f / sum, w, out + r * ps);
      }
      transpose_block(out + r0 * ps, ps, count, w, out_t + r0, ts);
    }
    _mm_sfence();  // the streamed lines are visible before the product reads them
  });
}

void log_partition_block(const torch::Tensor& q, const torch::Tensor& items, const torch::Tensor& paired,
                         torch::Tensor& probs_t, torch::Tensor& lse, torch::Tensor& expected) {
  check_product(q, items, probs_t.size(0));
  TORCH_CHECK(probs_t.size(1) == q.size(0), "probs_t must be [W, R]");
  check_transpose_buffer(probs_t);
  const int64_t rows = q.size(0), pairs = q.size(1) / 2, ts = probs_t.stride(0);
  const Width w(probs_t.size(0));
  TORCH_CHECK(paired.device().is_cpu() && paired.scalar_type() == at::kInt && paired.dim() == 2 &&
                  paired.is_contiguous() && 2 * paired.size(0) >= w.width && paired.size(1) % 16 == 0,
              "paired must be the table paired by items [ceil(W / 2), D'] int32 (cpu_kernels.pair_items)");
  const int64_t dims = paired.size(1);
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == at::kFloat && lse.dim() == 1 &&
                  lse.size(0) == rows && lse.is_contiguous(),
              "lse must be [R] float32");
  TORCH_CHECK(expected.device().is_cpu() && expected.scalar_type() == at::kFloat && expected.dim() == 2 &&
                  expected.size(0) == rows && expected.size(1) == dims && expected.is_contiguous(),
              "expected must be [R, D'] float32, D' as in paired");
  if (rows == 0 || w.width == 0) return;
  const int64_t tiles = w.tiles(), ld = 16 * tiles;  // ld even: a row's last pair is in the row
  const int32_t* q_pairs = reinterpret_cast<const int32_t*>(q.data_ptr<at::BFloat16>());
  at::BFloat16* out_t = probs_t.data_ptr<at::BFloat16>();
  float* lse_out = lse.data_ptr<float>();
  float* expected_out = expected.data_ptr<float>();
  at::parallel_for(0, (rows + kBlockRows - 1) / kBlockRows, 1, [&](int64_t begin, int64_t end) {
    float* buffer = thread_scratch<float>(ld);
    // the block's scores, then its softmax in place: ~0.8 MB at 12k items, it stays in L2
    at::BFloat16* block = thread_scratch<at::BFloat16>(kBlockRows * ld);
    __m512 max[kBlockRows];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t r0 = kBlockRows * b, count = std::min(kBlockRows, rows - r0);
      std::fill_n(max, kBlockRows, _mm512_set1_ps(-INFINITY));
      product_block(q_pairs + r0 * pairs, pairs, count, items.data_ptr<int32_t>(), tiles, w.width,
                    block, ld, max);
      for (int64_t r = 0; r < count; ++r) {
        at::BFloat16* row = block + r * ld;
        // the bf16 score's max, as the two-pass softmax finds it
        const float top = static_cast<float>(static_cast<at::BFloat16>(_mm512_reduce_max_ps(max[r])));
        const float sum = row_exp(row, w, top, buffer);
        write_row(buffer, 1.0f / sum, w, row);
        std::fill(row + w.width, row + ld, at::BFloat16(0.0f));  // the padding pairs' weight
        lse_out[r0 + r] = top + std::log(sum);
      }
      transpose_block(block, ld, count, w, out_t + r0, ts);
      expected_block(block, ld, count, paired.data_ptr<int32_t>(), (w.width + 1) / 2, dims,
                     expected_out + r0 * dims);
    }
    _mm_sfence();  // the streamed lines are visible before the product reads them
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scores", &scores, "out [R, W] = q . E^T in bf16 (items packed by cpu_kernels.pack_items)");
  m.def("softmax_rows_and_transpose", &softmax_rows_and_transpose,
        "probs = row-wise softmax(scores), probs_t = probs transposed (bf16)");
  m.def("log_partition_block", &log_partition_block,
        "p = softmax(q . E^T) by rows: probs_t = p^T (bf16), lse = log-sum-exp of each row and "
        "expected = p . E (float32), p itself never written");
}
