// The softmax between the catalogue-wide products of trainer/logpartition.py, on CPU with bf16:
// probs [R, W] = row-wise softmax of scores [R, W], and probs_t [W, R] = probs transposed, in one
// pass over the scores, in about the time of torch's softmax alone; the product that needs the
// transposed matrix (softmax^T . (w q)) runs ~1.5x slower on a transposed view than on probs_t.
// Built by trainer/cpu_kernels.py with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

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

// One row: buffer[0, W) = exp(s - max s), returns 1 / sum of them. W = 16 * full + tail bits.
float row_exp(const at::BFloat16* s, int64_t full, __mmask16 tail, float* buffer) {
  __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
  int64_t i = 0;
  for (; i + 4 <= full; i += 4) {  // four chains: the max's latency does not bind
    m0 = _mm512_max_ps(load16(s + 16 * i, 0xFFFF), m0);
    m1 = _mm512_max_ps(load16(s + 16 * i + 16, 0xFFFF), m1);
    m2 = _mm512_max_ps(load16(s + 16 * i + 32, 0xFFFF), m2);
    m3 = _mm512_max_ps(load16(s + 16 * i + 48, 0xFFFF), m3);
  }
  for (; i < full; ++i) m0 = _mm512_max_ps(load16(s + 16 * i, 0xFFFF), m0);
  if (tail) m0 = _mm512_mask_max_ps(m0, tail, load16(s + 16 * full, tail), m0);
  m0 = _mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3));
  const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(m0));
  __m512 a0 = _mm512_setzero_ps(), a1 = a0;
  for (i = 0; i + 2 <= full; i += 2) {
    const __m512 e0 = exp16(_mm512_sub_ps(load16(s + 16 * i, 0xFFFF), top));
    const __m512 e1 = exp16(_mm512_sub_ps(load16(s + 16 * i + 16, 0xFFFF), top));
    _mm512_storeu_ps(buffer + 16 * i, e0);
    _mm512_storeu_ps(buffer + 16 * i + 16, e1);
    a0 = _mm512_add_ps(a0, e0);
    a1 = _mm512_add_ps(a1, e1);
  }
  for (; i < full; ++i) {
    const __m512 e = exp16(_mm512_sub_ps(load16(s + 16 * i, 0xFFFF), top));
    _mm512_storeu_ps(buffer + 16 * i, e);
    a0 = _mm512_add_ps(a0, e);
  }
  if (tail) {
    const __m512 e = _mm512_maskz_mov_ps(tail, exp16(_mm512_sub_ps(load16(s + 16 * full, tail), top)));
    _mm512_storeu_ps(buffer + 16 * full, e);
    a0 = _mm512_add_ps(a0, e);
  }
  return 1.0f / _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
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

}  // namespace

// Blocks of 32 rows: each row's softmax goes to probs; then the block's rows, in 32 x 16 tiles
// transposed in registers, go to probs_t as whole 64-byte lines (streamed past the cache).
void softmax_rows_and_transpose(const torch::Tensor& scores, torch::Tensor& probs,
                                torch::Tensor& probs_t) {
  TORCH_CHECK(scores.device().is_cpu() && probs.device().is_cpu() && probs_t.device().is_cpu(),
              "softmax_rows_and_transpose: CPU tensors only");
  TORCH_CHECK(scores.scalar_type() == at::kBFloat16 && probs.scalar_type() == at::kBFloat16 &&
                  probs_t.scalar_type() == at::kBFloat16,
              "softmax_rows_and_transpose: bfloat16 tensors only");
  TORCH_CHECK(scores.dim() == 2 && probs.sizes() == scores.sizes() && probs_t.dim() == 2 &&
                  probs_t.size(0) == scores.size(1) && probs_t.size(1) == scores.size(0),
              "softmax_rows_and_transpose: scores [R, W], probs [R, W], probs_t [W, R]");
  TORCH_CHECK(scores.stride(1) == 1 && probs.stride(1) == 1 && probs_t.stride(1) == 1,
              "softmax_rows_and_transpose: rows must be contiguous");
  TORCH_CHECK(probs_t.stride(0) % 32 == 0 && reinterpret_cast<uintptr_t>(probs_t.data_ptr()) % 64 == 0,
              "softmax_rows_and_transpose: probs_t must start on 64 bytes, rows a multiple of 32 apart");
  const int64_t rows = scores.size(0), width = scores.size(1);
  if (rows == 0 || width == 0) return;
  const int64_t ss = scores.stride(0), ps = probs.stride(0), ts = probs_t.stride(0);
  const at::BFloat16* in = scores.data_ptr<at::BFloat16>();
  at::BFloat16* out = probs.data_ptr<at::BFloat16>();
  at::BFloat16* out_t = probs_t.data_ptr<at::BFloat16>();
  const int64_t full = width / 16, tiles = (width + 15) / 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (width % 16)) - 1);
  at::parallel_for(0, (rows + 31) / 32, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(16 * tiles);
    __m256i tile[32], cols[2][16];
    for (int64_t block = begin; block < end; ++block) {
      const int64_t r0 = 32 * block, count = std::min<int64_t>(32, rows - r0);
      for (int64_t r = r0; r < r0 + count; ++r) {
        const __m512 scale = _mm512_set1_ps(row_exp(in + r * ss, full, tail, buffer.data()));
        at::BFloat16* dst = out + r * ps;
        for (int64_t c = 0; c < full; ++c)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16 * c),
                              to_bf16(_mm512_mul_ps(_mm512_loadu_ps(buffer.data() + 16 * c), scale)));
        if (tail)
          _mm256_mask_storeu_epi16(dst + 16 * full, tail,
                                   to_bf16(_mm512_mul_ps(_mm512_loadu_ps(buffer.data() + 16 * full), scale)));
      }
      const __mmask32 row_mask = count == 32 ? 0xFFFFFFFFu : static_cast<__mmask32>((1u << count) - 1);
      for (int64_t c = 0; c < tiles; ++c) {
        const __mmask16 mask = c < full ? static_cast<__mmask16>(0xFFFF) : tail;
        for (int64_t r = 0; r < 32; ++r)
          tile[r] = r < count ? _mm256_maskz_loadu_epi16(mask, out + (r0 + r) * ps + 16 * c)
                              : _mm256_setzero_si256();
        transpose16(tile, cols[0]);
        transpose16(tile + 16, cols[1]);
        const int64_t valid = std::min<int64_t>(16, width - 16 * c);
        for (int64_t j = 0; j < valid; ++j) {
          const __m512i line = _mm512_inserti64x4(_mm512_castsi256_si512(cols[0][j]), cols[1][j], 1);
          at::BFloat16* dst = out_t + (16 * c + j) * ts + r0;
          if (count == 32)
            _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), line);
          else
            _mm512_mask_storeu_epi16(dst, row_mask, line);
        }
      }
    }
    _mm_sfence();  // the streamed lines are visible before the product reads them
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("softmax_rows_and_transpose", &softmax_rows_and_transpose,
        "probs = row-wise softmax(scores), probs_t = probs transposed (bf16, CPU)");
}
