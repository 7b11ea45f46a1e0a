// Causal attention of prompt chunks over a paged bf16 KV cache, on AVX-512 BF16: a tile of
// queries against a tile of keys at a time, with flash attention's running softmax.
//
//   q       [T, Hq, D] bf16 (unit stride along D; any other strides: views of the fused QKV)
//   cache   [2, num_blocks, block_size, Hk, D] bf16 (K then V), the chunk's own K/V already written
//   tables  [P, >= ceil(len / block_size)] int64, row p = chunk p's blocks
//   spans   [P, 3] int64, chunk p = (its first row in q, its n new tokens, its context length len):
//           query j of the chunk is the token at position len - n + j and sees the keys
//           max(0, pos + 1 - window) .. pos (window < 0: no window)
//   out     [T, Hq, D] bf16: the chunks' rows are written, the others left as they are
//
// The decode kernel (paged_attention.cpp) attends a prompt a token at a time, a horizontal sum
// per score and the output in memory: ~60-100 GFLOP/s, as SDPA is. Here both products run on
// vdpbf16ps (bf16 pairs, exact products, float sums): the scores of up to 8 query rows against
// 32 keys over the head's pairs (the key tile transposed once to [D/2][32 keys] pairs), and the
// probabilities times V a pair of keys at a time (the value tile interleaved once to
// [16 key pairs][D][2]). The running max and sum per row rescale the output. Probabilities are
// rounded to bf16 for V, as flash attention does, and the row's sum is of the rounded values,
// so the weights that multiply V are the ones that normalize it. Teacher-forced against
// float32 weights this path agrees as closely as the decode kernel's rows and SDPA do
// (docs/performance.md).
//
// Work items are (chunk, KV head, tile of query tokens): a tile's query rows are its tokens
// times the head's G grouped query heads (about 64 rows), which share each key tile. Items
// are spread over threads by their number of keys times rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kKeys = 32;   // keys per tile: two vectors of scores
constexpr int64_t kRows = 64;   // query rows (tokens x grouped heads) per item, about
constexpr int64_t kMaxHeadDim = 512;

#if defined(__AVX512BF16__)

using Vec = at::vec::Vectorized<float>;

// Scores of R query rows (bf16 rows, pairs broadcast) against a transposed key tile
// kp [pairs][32] (each a key's bf16 pair), times scale, into s [R][32].
template <int R>
inline void tile_scores(const uint16_t* const* q, const uint32_t* kp, int64_t pairs, float scale, float* s) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kp + p * kKeys);
    const __m512bh k1 = (__m512bh)_mm512_loadu_si512(kp + p * kKeys + 16);
    for (int r = 0; r < R; ++r) {
      int32_t bits;
      std::memcpy(&bits, q[r] + 2 * p, sizeof bits);
      const __m512bh qb = (__m512bh)_mm512_set1_epi32(bits);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], qb, k0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], qb, k1);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(s + r * kKeys, _mm512_mul_ps(acc[r][0], sc));
    _mm512_storeu_ps(s + r * kKeys + 16, _mm512_mul_ps(acc[r][1], sc));
  }
}

// o[r] = o[r] * alpha[r] + sum over the tile's keys of p[r][i] v[i], for R rows and C vectors
// of the head (starting at column c0): p [R][32] bf16 probabilities, taken a pair of keys at a
// time against vp [key pairs][D][2], the pair's values interleaved.
template <int R, int C>
inline void tile_values(float* o, int64_t D, const uint16_t* p, const float* alpha, const uint16_t* vp,
                        int64_t key_pairs, int64_t c0) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_mul_ps(_mm512_loadu_ps(o + r * D + c0 + 16 * c), a);
  }
  for (int64_t i = 0; i < key_pairs; ++i) {
    __m512bh vv[C];
    for (int c = 0; c < C; ++c) vv[c] = (__m512bh)_mm512_loadu_si512(vp + 2 * (i * D + c0 + 16 * c));
    for (int r = 0; r < R; ++r) {
      int32_t bits;
      std::memcpy(&bits, p + r * kKeys + 2 * i, sizeof bits);
      const __m512bh pb = (__m512bh)_mm512_set1_epi32(bits);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pb, vv[c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(o + r * D + c0 + 16 * c, acc[r][c]);
}

template <int C>
void values_rows(float* o, int64_t D, const uint16_t* p, const float* alpha, const uint16_t* vp, int64_t key_pairs,
                 int64_t c0, int64_t rows) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) tile_values<4, C>(o + r * D, D, p + r * kKeys, alpha + r, vp, key_pairs, c0);
  switch (rows - r) {
    case 3: tile_values<3, C>(o + r * D, D, p + r * kKeys, alpha + r, vp, key_pairs, c0); break;
    case 2: tile_values<2, C>(o + r * D, D, p + r * kKeys, alpha + r, vp, key_pairs, c0); break;
    case 1: tile_values<1, C>(o + r * D, D, p + r * kKeys, alpha + r, vp, key_pairs, c0); break;
    default: break;
  }
}

void scores_rows(const uint16_t* const* q, const uint32_t* kp, int64_t pairs, float scale, float* s, int64_t rows) {
  int64_t r = 0;
  for (; r + 8 <= rows; r += 8) tile_scores<8>(q + r, kp, pairs, scale, s + r * kKeys);
  switch (rows - r) {
    case 7: tile_scores<7>(q + r, kp, pairs, scale, s + r * kKeys); break;
    case 6: tile_scores<6>(q + r, kp, pairs, scale, s + r * kKeys); break;
    case 5: tile_scores<5>(q + r, kp, pairs, scale, s + r * kKeys); break;
    case 4: tile_scores<4>(q + r, kp, pairs, scale, s + r * kKeys); break;
    case 3: tile_scores<3>(q + r, kp, pairs, scale, s + r * kKeys); break;
    case 2: tile_scores<2>(q + r, kp, pairs, scale, s + r * kKeys); break;
    case 1: tile_scores<1>(q + r, kp, pairs, scale, s + r * kKeys); break;
    default: break;
  }
}

// One work item's buffers, per thread.
struct Scratch {
  std::vector<uint32_t> kp;        // [D/2][32] the key tile's pairs, transposed
  std::vector<uint16_t> vp;        // [16 key pairs][D][2] the value tile, pairs of keys interleaved
  std::vector<float> s;            // [rows][32] scores
  std::vector<uint16_t> p;         // [rows][32] probabilities in bf16
  std::vector<float> o;            // [rows][D] unnormalized outputs
  std::vector<float> max, sum, alpha;
  std::vector<const uint16_t*> q;  // each row's query
  Scratch(int64_t rows, int64_t D)
      : kp(D / 2 * kKeys), vp(kKeys * D), s(rows * kKeys), p(rows * kKeys), o(rows * D), max(rows), sum(rows),
        alpha(rows), q(rows) {}
};

struct Shape {
  int64_t G, D, BS, token_stride;  // token_stride: elements per cache token (Hk * D)
  const uint16_t* keys;                      // the cache's K half, then V at + values
  int64_t values;
  float scale;
  int64_t window;
};

// Query tokens [j0, j1) of one chunk, KV head h.
void attend_item(const Shape& sh, const uint16_t* q, int64_t qs0, int64_t qs1, uint16_t* out, int64_t os0,
                 int64_t os1, const int64_t* table, int64_t n, int64_t len, int64_t h, int64_t j0, int64_t j1,
                 Scratch& w) {
  const int64_t G = sh.G, D = sh.D, pairs = D / 2, rows = (j1 - j0) * G;
  const int64_t first_pos = len - n + j0, last_pos = len - n + j1 - 1;
  const int64_t k_lo = sh.window >= 0 ? std::max<int64_t>(0, first_pos + 1 - sh.window) : 0;
  const int64_t k_hi = last_pos + 1;
  for (int64_t m = 0; m < rows; ++m) {
    w.q[m] = q + (j0 + m / G) * qs0 + (h * G + m % G) * qs1;
    w.max[m] = -std::numeric_limits<float>::infinity();
    w.sum[m] = 0.f;
  }
  std::fill(w.o.begin(), w.o.begin() + rows * D, 0.f);
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t k0 = k_lo; k0 < k_hi; k0 += kKeys) {
    const int64_t kt = std::min(kKeys, k_hi - k0);
    // the tile's keys transposed to pairs; its values interleaved a pair of keys at a time
    const int64_t key_pairs = (kt + 1) / 2;
    const uint16_t* key_row[kKeys];
    for (int64_t i = 0; i < kKeys; ++i) {
      if (i >= kt) {
        key_row[i] = nullptr;
        for (int64_t p = 0; p < pairs; ++p) w.kp[p * kKeys + i] = 0;
        continue;
      }
      const int64_t t = k0 + i;
      key_row[i] = sh.keys + (table[t / sh.BS] * sh.BS + t % sh.BS) * sh.token_stride + h * D;
      const uint32_t* kw = reinterpret_cast<const uint32_t*>(key_row[i]);
      for (int64_t p = 0; p < pairs; ++p) w.kp[p * kKeys + i] = kw[p];
    }
    for (int64_t i = 0; i < key_pairs; ++i) {
      const uint16_t* v0 = key_row[2 * i] + sh.values;
      const uint16_t* v1 = key_row[2 * i + 1] ? key_row[2 * i + 1] + sh.values : nullptr;
      uint16_t* dst = w.vp.data() + 2 * i * D;
      for (int64_t d = 0; d < D; d += 16) {
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0 + d));
        const __m256i b = v1 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v1 + d)) : _mm256_setzero_si256();
        const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
        _mm512_storeu_si512(dst + 2 * d, _mm512_permutexvar_epi16(interleave, both));
      }
    }
    scores_rows(w.q.data(), w.kp.data(), pairs, sh.scale, w.s.data(), rows);
    // mask (causal, window, the tile's end), then the running softmax per row
    for (int64_t m = 0; m < rows; ++m) {
      const int64_t pos = len - n + j0 + m / G;
      const int64_t lo = sh.window >= 0 ? std::max<int64_t>(0, pos + 1 - sh.window) : 0;
      const int64_t hi = std::min(pos + 1, k0 + kt);  // keys [lo, hi) of this row
      float* s = w.s.data() + m * kKeys;
      uint16_t* pm = w.p.data() + m * kKeys;
      if (hi <= std::max(lo, k0)) {  // none of this tile's keys: the row is unchanged
        std::fill(pm, pm + kKeys, 0);
        w.alpha[m] = 1.f;
        continue;
      }
      __mmask16 keep[2];
      __m512 x[2];
      for (int half = 0; half < 2; ++half) {
        const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(k0 + 16 * half)), lane);
        keep[half] = _mm512_cmpge_epi32_mask(idx, _mm512_set1_epi32(static_cast<int32_t>(lo))) &
                     _mm512_cmplt_epi32_mask(idx, _mm512_set1_epi32(static_cast<int32_t>(hi)));
        x[half] = _mm512_mask_mov_ps(neg_inf, keep[half], _mm512_loadu_ps(s + 16 * half));
      }
      const float tile_max = _mm512_reduce_max_ps(_mm512_max_ps(x[0], x[1]));
      const float new_max = std::max(w.max[m], tile_max);
      w.alpha[m] = std::exp(w.max[m] - new_max);  // 0 for a row's first keys (max -inf)
      w.max[m] = new_max;
      const __m512 shift = _mm512_set1_ps(new_max);
      __m512 e[2];
      for (int half = 0; half < 2; ++half) {
        // masked lanes get exp of a finite stand-in, then zero
        const __m512 centred = _mm512_mask_sub_ps(_mm512_set1_ps(-100.f), keep[half], x[half], shift);
        e[half] = _mm512_maskz_mov_ps(keep[half], __m512(Vec(centred).exp_u20()));
      }
      // rounded to bf16 for the products with V; the row's sum is of the rounded values, so the
      // weights that multiply V are the ones that normalize it
      const __m512i rounded = (__m512i)_mm512_cvtne2ps_pbh(e[1], e[0]);
      _mm512_storeu_si512(pm, rounded);
      const __m512 lo16 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(rounded)), 16));
      const __m512 hi16 = _mm512_castsi512_ps(
          _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(rounded, 1)), 16));
      w.sum[m] = w.sum[m] * w.alpha[m] + _mm512_reduce_add_ps(_mm512_add_ps(lo16, hi16));
    }
    // o = o alpha + p v, four vectors of the head at a time (D is a multiple of 32)
    for (int64_t c0 = 0; c0 < D; c0 += 64) {
      if (D - c0 >= 64) {
        values_rows<4>(w.o.data(), D, w.p.data(), w.alpha.data(), w.vp.data(), key_pairs, c0, rows);
      } else {
        values_rows<2>(w.o.data(), D, w.p.data(), w.alpha.data(), w.vp.data(), key_pairs, c0, rows);
      }
    }
  }
  for (int64_t m = 0; m < rows; ++m) {
    uint16_t* dst = out + (j0 + m / G) * os0 + (h * G + m % G) * os1;
    const __m512 inv = _mm512_set1_ps(1.f / w.sum[m]);
    const float* o = w.o.data() + m * D;
    for (int64_t d = 0; d < D; d += 16) {
      const __m256bh y = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(o + d), inv));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), (__m256i)y);
    }
  }
}

#endif  // __AVX512BF16__

void prefill_attention(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& tables,
                       const at::Tensor& spans, double scale, int64_t window, at::Tensor& out) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kBFloat16 && q.stride(2) == 1,
              "prefill_attention: q must be bf16 [T, Hq, D] with unit stride along D");
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == at::kBFloat16 && out.stride(2) == 1,
              "prefill_attention: out must be bf16 of q's shape with unit stride along D");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.scalar_type() == at::kBFloat16 &&
                  kv_cache.is_contiguous(),
              "prefill_attention: kv_cache must be contiguous bf16 [2, blocks, block_size, Hk, D]");
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t NB = kv_cache.size(1), BS = kv_cache.size(2), Hk = kv_cache.size(3);
  TORCH_CHECK(kv_cache.size(4) == D, "prefill_attention: head sizes differ (q ", D, ", cache ", kv_cache.size(4), ")");
  TORCH_CHECK(D % 32 == 0 && D <= kMaxHeadDim, "prefill_attention: head size ", D,
              " must be a multiple of 32 and at most ", kMaxHeadDim);
  TORCH_CHECK(Hq % Hk == 0, "prefill_attention: query heads must be a multiple of KV heads");
  TORCH_CHECK(spans.dim() == 2 && spans.size(1) == 3 && spans.scalar_type() == at::kLong && spans.is_contiguous(),
              "prefill_attention: spans must be contiguous int64 [P, 3] (row, new tokens, context length)");
  TORCH_CHECK(tables.dim() == 2 && tables.scalar_type() == at::kLong && tables.stride(1) == 1 &&
                  tables.size(0) == spans.size(0),
              "prefill_attention: tables must be int64 [P, blocks] with contiguous rows, one per span");
  const int64_t P = spans.size(0);
  const int64_t* sp = spans.data_ptr<int64_t>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  for (int64_t c = 0; c < P; ++c) {
    const int64_t row = sp[3 * c], n = sp[3 * c + 1], len = sp[3 * c + 2];
    TORCH_CHECK(n >= 1 && len >= n && row >= 0 && row + n <= T, "prefill_attention: span ", c, " (row ", row,
                ", ", n, " new tokens, context ", len, ") does not fit q's ", T, " rows");
    const int64_t used = (len + BS - 1) / BS;
    TORCH_CHECK(used <= tables.size(1), "prefill_attention: block table ", c, " too short for ", len, " tokens");
    for (int64_t b = 0; b < used; ++b)
      TORCH_CHECK(tp[c * tables.stride(0) + b] >= 0 && tp[c * tables.stride(0) + b] < NB,
                  "prefill_attention: block ", tp[c * tables.stride(0) + b], " outside the cache");
  }
  if (P == 0) return;
#if defined(__AVX512BF16__)
  const int64_t G = Hq / Hk, tokens = std::max<int64_t>(1, kRows / G);
  const auto* cache = reinterpret_cast<const uint16_t*>(kv_cache.data_ptr());
  const Shape sh{G, D, BS, Hk * D, cache, NB * BS * Hk * D, static_cast<float>(scale), window};
  // items (chunk, head, query tile) and their cost: keys seen times rows
  struct ItemRef {
    int64_t c, h, j0, j1;
  };
  std::vector<ItemRef> items;
  std::vector<int64_t> cost{0};
  for (int64_t c = 0; c < P; ++c) {
    const int64_t n = sp[3 * c + 1], len = sp[3 * c + 2];
    for (int64_t h = 0; h < Hk; ++h)
      for (int64_t j0 = 0; j0 < n; j0 += tokens) {
        const int64_t j1 = std::min(n, j0 + tokens);
        const int64_t hi = len - n + j1, lo = window >= 0 ? std::max<int64_t>(0, len - n + j0 + 1 - window) : 0;
        items.push_back({c, h, j0, j1});
        cost.push_back(cost.back() + (hi - lo + kKeys) * (j1 - j0));
      }
  }
  const int64_t count = static_cast<int64_t>(items.size());
  const int64_t runs = std::min<int64_t>(at::get_num_threads(), count);
  std::vector<int64_t> bound(runs + 1, count);
  for (int64_t r = 0; r < runs; ++r)
    bound[r] = std::lower_bound(cost.begin(), cost.end() - 1, cost[count] * r / runs) - cost.begin();
  const auto* qp = reinterpret_cast<const uint16_t*>(q.data_ptr());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, runs, 1, [&](int64_t r0, int64_t r1) {
    Scratch w(tokens * G, D);
    for (int64_t i = bound[r0]; i < bound[r1]; ++i) {
      const ItemRef& it = items[i];
      const int64_t row = sp[3 * it.c];
      attend_item(sh, qp + row * q.stride(0), q.stride(0), q.stride(1), op + row * out.stride(0), out.stride(0),
                  out.stride(1), tp + it.c * tables.stride(0), sp[3 * it.c + 1], sp[3 * it.c + 2], it.h, it.j0,
                  it.j1, w);
    }
  });
#else
  TORCH_CHECK(false, "prefill_attention: this build has no AVX-512 BF16");
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(surge_native, m) {
  m.def("prefill_attention(Tensor q, Tensor kv_cache, Tensor tables, Tensor spans, float scale, int window, "
        "Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(surge_native, CPU, m) {
  m.impl("prefill_attention", &prefill_attention);
}
