// Paged decode attention for CPU: one query token per sequence, read straight from the
// block-paged KV cache (no gathered copy), float32 math, vectorized with ATen's Vectorized.
//
//   q            [B, Hq, D] (any strides)     bf16 / fp16 / fp32
//   kv_cache     [2, num_blocks, block_size, Hk, D]  (K then V), bf16 / fp16 / fp32, or
//                [2, num_blocks, block_size, Hk, D + 2] int8: each head's row of a token is
//                quantized on its own, D int8 values then their scale as fp16 (2 bytes), so
//                x = q * scale; scores and probabilities take the scale, not each element
//   block_tables [B, >= ceil(len / block_size)] int64, row b = sequence b's blocks
//   seq_lens     [B] int64, context length (the query is the token at seq_len - 1)
//   window       keys at positions >= seq_len - window only; < 0 means no window
//
// Work is split into (sequence, partition of the context) items so that one long
// sequence still spreads over every thread (split-K, as flash-decoding does); each item
// keeps its partial softmax (max, sum) and unnormalized output, and when a sequence has
// several partitions a second pass merges them. Grouped query heads (Hq = G * Hk) share
// each K/V load; for the common shapes the group's queries and outputs are held in vector
// registers.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "kernels.h"

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

template <typename T>
inline Vec load_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else if constexpr (std::is_same_v<T, int8_t>) {  // sign-extend to int32, convert
#if defined(CPU_CAPABILITY_AVX512)
    return Vec(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
#elif defined(CPU_CAPABILITY_AVX2)
    return Vec(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
#else
    alignas(64) float tmp[Vec::size()];
    for (int i = 0; i < Vec::size(); ++i) tmp[i] = static_cast<float>(p[i]);
    return Vec::loadu(tmp);
#endif
  } else {
    Vec out;
    at::vec::load_to_float<T>(p, out);
    return out;
  }
}

constexpr int64_t kInt8ScaleBytes = 2;  // an int8 cache row ends with its scale as fp16

// An int8 cache row's scale (the fp16 after its D values); 1 for float caches.
template <typename KT>
inline float row_scale(const KT* row, int64_t D) {
  if constexpr (std::is_same_v<KT, int8_t>) {
    uint16_t bits;
    std::memcpy(&bits, row + D, sizeof(bits));
#if defined(__F16C__)
    return _cvtsh_ss(bits);
#else
    return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
#endif
  } else {
    return 1.f;
  }
}

// Where one item's inputs and outputs live.
template <typename KT>
struct Item {
  const KT* keys;        // this sequence's K cache base (token t of block blk at blk * BS + t % BS)
  const KT* values;
  const int64_t* table;  // its block table
  int64_t block_size, token_stride, row, t0, t1;  // row: elements per head (D, or D + 2 for int8)
  const float* q;        // [Hq, D], pre-scaled
  float* scores;         // [Hq, part] scratch
  int64_t part;
  float* out;            // [Hq, D] unnormalized output
  float* max;            // [Hq]
  float* sum;            // [Hq]

  const KT* key(int64_t t) const { return keys + (table[t / block_size] * block_size + t % block_size) * token_stride; }
  const KT* value(int64_t t) const { return values + (table[t / block_size] * block_size + t % block_size) * token_stride; }
};

// exp(s - max) in place over each head's scores; records max and sum.
template <typename KT>
void softmax_numerators(const Item<KT>& it, int64_t Hq) {
  const int64_t n = it.t1 - it.t0;
  for (int64_t hq = 0; hq < Hq; ++hq) {
    float* s = it.scores + hq * it.part;
    const float m = at::vec::reduce_all<float>([](Vec x, Vec y) { return at::vec::maximum(x, y); }, s, n);
    at::vec::map([m](Vec x) { return (x - Vec(m)).exp_u20(); }, s, s, n);
    it.max[hq] = m;
    it.sum[hq] = at::vec::reduce_all<float>([](Vec x, Vec y) { return x + y; }, s, n);
  }
}

// The common shapes: the group size G and head size NV * Vec::size() known at compile time,
// so a head's query rows and output accumulators live in vector registers. Tokens are taken
// a block at a time and every head is done before the next block: the block's K (or V) is
// then read from DRAM once and reused from L1 by the other heads.
template <typename KT, int G, int NV>
void attend_fixed(const Item<KT>& it, int64_t Hk) {
  constexpr int64_t D = NV * Vec::size();
  const int64_t BS = it.block_size;
  for (int64_t c0 = it.t0; c0 < it.t1; c0 = (c0 / BS + 1) * BS) {
    const int64_t c1 = std::min(it.t1, (c0 / BS + 1) * BS);
    const KT* block = it.key(c0) - (c0 % BS) * it.token_stride;
    for (int64_t h = 0; h < Hk; ++h) {
      Vec qv[G][NV];
      for (int g = 0; g < G; ++g)
        for (int j = 0; j < NV; ++j) qv[g][j] = Vec::loadu(it.q + (h * G + g) * D + j * Vec::size());
      float* scores = it.scores + h * G * it.part;
      for (int64_t t = c0; t < c1; ++t) {
        const KT* key = block + (t % BS) * it.token_stride + h * it.row;
        Vec acc[G];
        for (int j = 0; j < NV; ++j) {
          const Vec kv = load_float(key + j * Vec::size());
          for (int g = 0; g < G; ++g) acc[g] = j == 0 ? qv[g][0] * kv : at::vec::fmadd(qv[g][j], kv, acc[g]);
        }
        const float ks = row_scale(key, D);
        for (int g = 0; g < G; ++g) scores[g * it.part + (t - it.t0)] = acc[g].reduce_add() * ks;
      }
    }
  }
  softmax_numerators(it, Hk * G);
  std::fill(it.out, it.out + Hk * G * D, 0.f);
  for (int64_t c0 = it.t0; c0 < it.t1; c0 = (c0 / BS + 1) * BS) {
    const int64_t c1 = std::min(it.t1, (c0 / BS + 1) * BS);
    const KT* block = it.value(c0) - (c0 % BS) * it.token_stride;
    for (int64_t h = 0; h < Hk; ++h) {
      float* out = it.out + h * G * D;
      Vec ov[G][NV];
      for (int g = 0; g < G; ++g)
        for (int j = 0; j < NV; ++j) ov[g][j] = Vec::loadu(out + g * D + j * Vec::size());
      const float* probs = it.scores + h * G * it.part;
      for (int64_t t = c0; t < c1; ++t) {
        const KT* value = block + (t % BS) * it.token_stride + h * it.row;
        const float vs = row_scale(value, D);
        Vec p[G];
        for (int g = 0; g < G; ++g) p[g] = Vec(probs[g * it.part + (t - it.t0)] * vs);
        for (int j = 0; j < NV; ++j) {
          const Vec vv = load_float(value + j * Vec::size());
          for (int g = 0; g < G; ++g) ov[g][j] = at::vec::fmadd(p[g], vv, ov[g][j]);
        }
      }
      for (int g = 0; g < G; ++g)
        for (int j = 0; j < NV; ++j) ov[g][j].store(out + g * D + j * Vec::size());
    }
  }
}

// Any other shape (head sizes without a fixed kernel: 80, 96, 256, ..., large groups): loops
// over D, heads in turn, 16 floats at a time with a scalar tail for the last D % 16.
template <typename KT>
void attend_generic(const Item<KT>& it, int64_t Hk, int64_t G, int64_t D) {
  const int64_t V = Vec::size(), vd = D - D % V;
  for (int64_t t = it.t0; t < it.t1; ++t) {
    const KT* key = it.key(t);
    for (int64_t hq = 0; hq < Hk * G; ++hq) {
      const KT* k = key + (hq / G) * it.row;
      const float* q = it.q + hq * D;
      Vec acc(0.f);
      for (int64_t d = 0; d < vd; d += V) acc = at::vec::fmadd(Vec::loadu(q + d), load_float(k + d), acc);
      float s = acc.reduce_add();
      for (int64_t d = vd; d < D; ++d) s += q[d] * static_cast<float>(k[d]);
      it.scores[hq * it.part + t - it.t0] = s * row_scale(k, D);
    }
  }
  softmax_numerators(it, Hk * G);
  std::fill(it.out, it.out + Hk * G * D, 0.f);
  for (int64_t t = it.t0; t < it.t1; ++t) {
    const KT* value = it.value(t);
    for (int64_t hq = 0; hq < Hk * G; ++hq) {
      const KT* v = value + (hq / G) * it.row;
      const float p = it.scores[hq * it.part + t - it.t0] * row_scale(v, D);
      float* out = it.out + hq * D;
      for (int64_t d = 0; d < vd; d += V) at::vec::fmadd(Vec(p), load_float(v + d), Vec::loadu(out + d)).store(out + d);
      for (int64_t d = vd; d < D; ++d) out[d] += p * static_cast<float>(v[d]);
    }
  }
}

template <typename KT>
using AttendFn = void (*)(const Item<KT>&, int64_t);

template <typename KT, int NV>
AttendFn<KT> pick_group(int64_t G) {
  switch (G) {
    case 1: return &attend_fixed<KT, 1, NV>;
    case 2: return &attend_fixed<KT, 2, NV>;
    case 3: return &attend_fixed<KT, 3, NV>;
    case 4: return &attend_fixed<KT, 4, NV>;
    case 5: return &attend_fixed<KT, 5, NV>;
    case 6: return &attend_fixed<KT, 6, NV>;
    case 7: return &attend_fixed<KT, 7, NV>;
    case 8: return &attend_fixed<KT, 8, NV>;
    default: return nullptr;
  }
}

template <typename KT>
AttendFn<KT> pick_fixed(int64_t G, int64_t D) {
  if (D == 4 * Vec::size()) return pick_group<KT, 4>(G);
  if (D == 8 * Vec::size()) return pick_group<KT, 8>(G);
  return nullptr;
}

// dst[i] = src[i] * scale as float, for a row of n elements (src contiguous).
template <typename T>
void row_to_float(const T* src, int64_t n, float scale, float* dst) {
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) (load_float(src + i) * Vec(scale)).store(dst + i);
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]) * scale;
}

template <typename QT, typename KT>
void decode_kernel(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_tables,
                   const at::Tensor& seq_lens, double scale, int64_t window, at::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t NB = kv_cache.size(1), BS = kv_cache.size(2), Hk = kv_cache.size(3), R = kv_cache.size(4);
  const int64_t G = Hq / Hk;
  const KT* kp = kv_cache.data_ptr<KT>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();

  // First visible key of each sequence; its context span.
  std::vector<int64_t> first(B);
  int64_t longest = 0, total = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = lens[b];
    TORCH_CHECK(len >= 1, "paged_decode_attention: seq_len must be >= 1");
    TORCH_CHECK((len + BS - 1) / BS <= block_tables.size(1), "paged_decode_attention: block table too short");
    first[b] = (window >= 0 && len > window) ? len - window : 0;
    longest = std::max(longest, len - first[b]);
    total += len - first[b];
  }
  // Partition length: enough items to keep every thread busy, short enough that a partition's
  // K and V stay in L2 across the heads, long enough to amortize the merge.
  const int64_t threads = at::get_num_threads();
  int64_t part = (total + 4 * threads - 1) / (4 * threads);
  part = std::clamp<int64_t>((part + 31) / 32 * 32, 64, 512);
  const int64_t parts = (longest + part - 1) / part;

  // With one partition per sequence an item writes its normalized output directly; otherwise
  // it leaves its partials (max, sum, unnormalized output) for the merge below.
  std::vector<float> pmax, psum, pout;
  if (parts > 1) {
    pmax.assign(B * parts * Hq, -std::numeric_limits<float>::infinity());
    psum.assign(B * parts * Hq, 0.f);
    pout.assign(B * parts * Hq * D, 0.f);
  }
  const QT* qp = q.data_ptr<QT>();
  const int64_t s0 = q.stride(0), s1 = q.stride(1), s2 = q.stride(2);  // q may be a view of the fused QKV
  QT* op = out.data_ptr<QT>();
  const AttendFn<KT> fixed = pick_fixed<KT>(G, D);

  // An item is one partition of one sequence, all heads. Items differ in length (a prompt's
  // tokens attended one per row have contexts 1..n), so each thread takes a run of items of
  // about equal total length rather than an equal count.
  const int64_t items = B * parts;
  std::vector<int64_t> cost(items + 1, 0);  // cost[i]: the length of items before i
  for (int64_t item = 0; item < items; ++item) {
    const int64_t b = item / parts, t0 = first[b] + (item % parts) * part;
    cost[item + 1] = cost[item] + std::max<int64_t>(0, std::min(t0 + part, lens[b]) - t0);
  }
  const int64_t runs = std::min(threads, items);
  std::vector<int64_t> bound(runs + 1, items);
  for (int64_t r = 0; r < runs; ++r)
    bound[r] = std::lower_bound(cost.begin(), cost.end() - 1, cost[items] * r / runs) - cost.begin();
  at::parallel_for(0, runs, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> scores(Hq * part), qf(Hq * D), own_out(Hq * D), own_max(Hq), own_sum(Hq);
    for (int64_t item = bound[r0]; item < bound[r1]; ++item) {
      const int64_t b = item / parts, pi = item % parts;
      const int64_t t0 = first[b] + pi * part;
      const int64_t t1 = std::min(t0 + part, lens[b]);
      if (t0 >= t1) continue;  // a shorter sequence's empty partition: its partials stay empty
      for (int64_t hq = 0; hq < Hq; ++hq) {
        const QT* row = qp + b * s0 + hq * s1;
        if (s2 == 1) {
          row_to_float(row, D, static_cast<float>(scale), &qf[hq * D]);
        } else {
          for (int64_t d = 0; d < D; ++d) qf[hq * D + d] = static_cast<float>(row[d * s2]) * static_cast<float>(scale);
        }
      }
      float *o = own_out.data(), *m = own_max.data(), *s = own_sum.data();
      if (parts > 1) {
        const int64_t base = (b * parts + pi) * Hq;
        o = &pout[base * D], m = &pmax[base], s = &psum[base];
      }
      const Item<KT> it{kp, kp + NB * BS * Hk * R, tables + b * block_tables.stride(0), BS, Hk * R, R, t0, t1,
                        qf.data(), scores.data(), part, o, m, s};
      if (fixed != nullptr) {
        fixed(it, Hk);
      } else {
        attend_generic(it, Hk, G, D);
      }
      if (parts == 1) {
        QT* dst = op + b * Hq * D;
        for (int64_t hq = 0; hq < Hq; ++hq) {
          const float inv = 1.f / s[hq];
          for (int64_t d = 0; d < D; ++d) dst[hq * D + d] = static_cast<QT>(o[hq * D + d] * inv);
        }
      }
    }
  });
  if (parts == 1) return;

  // Merge the partitions of each (sequence, query head).
  at::parallel_for(0, B * Hq, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hq, hq = bh % Hq;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t pi = 0; pi < parts; ++pi) m = std::max(m, pmax[(b * parts + pi) * Hq + hq]);
      std::fill(row.begin(), row.end(), 0.f);
      float denom = 0.f;
      for (int64_t pi = 0; pi < parts; ++pi) {
        const int64_t idx = (b * parts + pi) * Hq + hq;
        if (psum[idx] == 0.f) continue;  // an empty partition of a shorter sequence
        const float w = std::exp(pmax[idx] - m);
        denom += w * psum[idx];
        const float* src = &pout[idx * D];
        for (int64_t d = 0; d < D; ++d) row[d] += w * src[d];
      }
      QT* dst = op + bh * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<QT>(row[d] / denom);
    }
  });
}

// Calls f with a value of the C++ type of a float32 / bfloat16 / float16 dtype.
template <typename F>
void dispatch_float(at::ScalarType type, F&& f) {
  switch (type) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_CHECK(false, "paged_decode_attention: unsupported dtype ", type);
  }
}

// The same for a cache, which may also be int8 (rows with their scale).
template <typename F>
void dispatch_cache(at::ScalarType type, F&& f) {
  if (type == at::kChar) return f(int8_t{});
  dispatch_float(type, f);
}

// Head size of a cache: its last dimension less an int8 row's scale bytes.
int64_t cache_head_dim(const at::Tensor& kv_cache) {
  return kv_cache.size(4) - (kv_cache.scalar_type() == at::kChar ? kInt8ScaleBytes : 0);
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_tables,
                                  const at::Tensor& seq_lens, double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3, "paged_decode_attention: q must be [B, Hq, D]");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.is_contiguous(),
              "paged_decode_attention: kv_cache must be contiguous [2, blocks, block_size, Hk, D]");
  TORCH_CHECK(cache_head_dim(kv_cache) == q.size(2), "paged_decode_attention: head sizes differ");
  TORCH_CHECK(q.size(1) % kv_cache.size(3) == 0, "paged_decode_attention: query heads must be a multiple of KV heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.dim() == 2 && block_tables.stride(1) == 1,
              "paged_decode_attention: block_tables must be int64 [B, blocks] with contiguous rows");
  TORCH_CHECK(seq_lens.scalar_type() == at::kLong && seq_lens.is_contiguous() && seq_lens.numel() == q.size(0),
              "paged_decode_attention: seq_lens must be int64 [B]");
  TORCH_CHECK(block_tables.size(0) == q.size(0), "paged_decode_attention: one block table row per sequence");
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  if (q.size(0) == 0) return out;
  dispatch_float(q.scalar_type(), [&](auto q_tag) {
    dispatch_cache(kv_cache.scalar_type(), [&](auto kv_tag) {
      decode_kernel<decltype(q_tag), decltype(kv_tag)>(q, kv_cache, block_tables, seq_lens, scale, window, out);
    });
  });
  return out;
}

// One head's row into an int8 cache row: scale = max|x| / 127 rounded to fp16, q = round(x / scale).
inline void quantize_row(const float* x, int64_t D, int8_t* dst) {
  float amax = 0.f;
  for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::abs(x[d]));
  const c10::Half h(amax / 127.f);
  const float scale = static_cast<float>(h);
  for (int64_t d = 0; d < D; ++d)
    dst[d] = scale == 0.f ? 0 : static_cast<int8_t>(std::clamp(std::nearbyint(x[d] / scale), -127.f, 127.f));
  std::memcpy(dst + D, &h, sizeof(h));
}

// Stores this step's K and V [T, Hk, D] (any strides, any float dtype) at their cache slots.
template <typename KT>
void write_kv_kernel(const at::Tensor& k, const at::Tensor& v, at::Tensor& kv_cache, const at::Tensor& slot_mapping) {
  const int64_t T = k.size(0), Hk = k.size(1), D = k.size(2), R = kv_cache.size(4);
  const int64_t slots = kv_cache.size(1) * kv_cache.size(2);
  KT* keys = kv_cache.data_ptr<KT>();
  KT* values = keys + slots * Hk * R;
  const int64_t* slot = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(slot[t] >= 0 && slot[t] < slots, "paged_decode_step: slot ", slot[t], " outside the cache");
  dispatch_float(k.scalar_type(), [&](auto tag) {
    using IT = decltype(tag);
    // One head's row at a time: a copy when the dtypes match and rows are contiguous (the usual
    // case: views of the fused QKV output), else converted element by element.
    const auto store = [&](const at::Tensor& src, KT* cache) {
      const IT* p = src.data_ptr<IT>();
      const int64_t st = src.stride(0), sh = src.stride(1), sd = src.stride(2);
      std::vector<float> x(std::is_same_v<KT, int8_t> ? D : 0);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t h = 0; h < Hk; ++h) {
          const IT* row = p + t * st + h * sh;
          KT* dst = cache + (slot[t] * Hk + h) * R;
          if constexpr (std::is_same_v<KT, int8_t>) {
            for (int64_t d = 0; d < D; ++d) x[d] = static_cast<float>(row[d * sd]);
            quantize_row(x.data(), D, dst);
            continue;
          }
          if constexpr (std::is_same_v<IT, KT>) {
            if (sd == 1) {
              std::memcpy(dst, row, D * sizeof(KT));
              continue;
            }
          }
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<KT>(static_cast<float>(row[d * sd]));
        }
    };
    store(k, keys);
    store(v, values);
  });
}

// A decode step's attention for one layer in one call: write each sequence's new K/V, then
// attend. Under torch.compile this is the whole attention of a decode-only step, with no
// Python between the compiled kernels.
at::Tensor paged_decode_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& kv_cache,
                             const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                             const at::Tensor& seq_lens, double scale, int64_t window) {
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.scalar_type() == v.scalar_type(),
              "paged_decode_step: k and v must be [T, Hk, D] of one dtype");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.is_contiguous() && k.size(1) == kv_cache.size(3) &&
                  k.size(2) == cache_head_dim(kv_cache),
              "paged_decode_step: k and v must match the cache's [Hk, D]");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() &&
                  slot_mapping.numel() == k.size(0),
              "paged_decode_step: slot_mapping must be int64 [T]");
  dispatch_cache(kv_cache.scalar_type(), [&](auto tag) {
    write_kv_kernel<decltype(tag)>(k, v, kv_cache, slot_mapping);
  });
  return paged_decode_attention(q, kv_cache, block_tables, seq_lens, scale, window);
}

}  // namespace

namespace surge_kernels {

at::Tensor paged_decode_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& kv_cache,
                             const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                             const at::Tensor& seq_lens, double scale, int64_t window) {
  return ::paged_decode_step(q, k, v, kv_cache, slot_mapping, block_tables, seq_lens, scale, window);
}

}  // namespace surge_kernels

TORCH_LIBRARY(surge_native, m) {
  m.def("paged_decode_attention(Tensor q, Tensor kv_cache, Tensor block_tables, Tensor seq_lens, float scale, "
        "int window) -> Tensor");
  m.def("paged_decode_step(Tensor q, Tensor k, Tensor v, Tensor(a!) kv_cache, Tensor slot_mapping, "
        "Tensor block_tables, Tensor seq_lens, float scale, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(surge_native, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("paged_decode_step", &paged_decode_step);
}
