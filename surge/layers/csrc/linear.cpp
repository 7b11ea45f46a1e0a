// Linear layers on AVX-512 BF16: y = x W^T (+ b), x bf16 [M, K], W bf16 or int4 group-wise.
//
// Made first for the few rows of a decode step, which are bound by reading the weight: each
// weight byte is read once, in a layout made for the dot-product instruction (vdpbf16ps: 16
// float lanes, each += a pair of bf16 products). With many rows the same loop is bound by
// that instruction's throughput and runs at oneDNN's speed (docs/performance.md), so bf16
// weights need no second copy for prefill. Output channels come in blocks of 64 (four
// vectors of 16), the reduction dimension K in pairs:
//
//   bf16  w [N/64, K/2, 64, 2]  bf16     w[b, p, c, j] = W[64b + c, 2p + j]
//   int4  q [N/64, K/2, 64]     uint8    the 128 nibbles of (block b, pair p), see pack_int4
//         s [N/64, K/G, 2, 64]  fp16     W = s[.., 0, c] * nibble + s[.., 1, c]  (scale, min)
//
// A nibble becomes a bf16 without arithmetic: the 16-bit word 0x4300 | q is the bf16 number
// 128 + q, so a group's dot product over the nibbles is sum x (128 + q), and the group's
// scale and min finish it with the group's sum of x: d (dot - 128 sum x) + m sum x.
// linear_int4 with planes = 2 sums two such matrices stacked along N before rounding (GGUF's
// Q8_0 as its high and low nibbles, Int8GroupWeight.planes).
// Rows are taken four at a time (one pass over a block's weights per four rows, which stay in
// L2 between passes); blocks of channels are spread over threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kBlock = 64;  // output channels per block
constexpr int64_t kRows = 4;    // rows per pass over a block

inline float bf16_bits_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

#if defined(__AVX512BF16__)

inline __m512 bf16_to_float(const void* p) {  // 16 bf16 -> 16 float
  __m256i h = _mm256_loadu_si256(static_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline __m512bh pair(const uint16_t* x) {  // x[0], x[1] in every 32-bit lane
  int32_t bits;
  std::memcpy(&bits, x, sizeof bits);
  return (__m512bh)_mm512_set1_epi32(bits);
}

// acc (+ bias) -> bf16 row segment of 64 channels
template <int MB>
inline void store_rows(__m512 (&acc)[MB][4], const uint16_t* bias, uint16_t* out, int64_t ldo) {
  for (int t = 0; t < 4; ++t) {
    __m512 b = bias ? bf16_to_float(bias + 16 * t) : _mm512_setzero_ps();
    for (int m = 0; m < MB; ++m) {
      __m256bh y = _mm512_cvtneps_pbh(_mm512_add_ps(acc[m][t], b));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m * ldo + 16 * t), (__m256i)y);
    }
  }
}

template <int MB>
void bf16_block(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t pairs, const uint16_t* bias,
                uint16_t* out, int64_t ldo) {
  __m512 acc[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int t = 0; t < 4; ++t) acc[m][t] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const uint16_t* wp = w + p * 2 * kBlock;
    __m512bh wt[4];
    for (int t = 0; t < 4; ++t) wt[t] = (__m512bh)_mm512_loadu_si512(wp + 32 * t);
    for (int m = 0; m < MB; ++m) {
      __m512bh xb = pair(x + m * ldx + 2 * p);
      for (int t = 0; t < 4; ++t) acc[m][t] = _mm512_dpbf16_ps(acc[m][t], xb, wt[t]);
    }
  }
  store_rows<MB>(acc, bias, out, ldo);
}

// xs: [MB rows][groups] sums of x over each group. With planes = 2 the block's output is the
// sum of two int4 planes (GGUF's Q8_0 as high and low nibbles), `plane_q` / `plane_s`
// elements apart, accumulated in float before the one rounding to bf16.
template <int MB>
void int4_block(const uint16_t* x, int64_t ldx, const float* xs, int64_t groups, const uint8_t* q,
                const uint16_t* s, int64_t group_pairs, int64_t planes, int64_t plane_q, int64_t plane_s,
                const uint16_t* bias, uint16_t* out, int64_t ldo) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i exp128 = _mm512_set1_epi8(0x43);
  __m512 acc[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int t = 0; t < 4; ++t) acc[m][t] = _mm512_setzero_ps();
  for (int64_t gp = 0; gp < planes * groups; ++gp) {
    const int64_t g = gp % groups;
    const uint8_t* qp = q + (gp / groups) * plane_q;
    const uint16_t* sp = s + (gp / groups) * plane_s;
    __m512 dot[MB][4];
    for (int m = 0; m < MB; ++m)
      for (int t = 0; t < 4; ++t) dot[m][t] = _mm512_setzero_ps();
    const uint8_t* qg = qp + g * group_pairs * kBlock;
    const int64_t k0 = g * group_pairs * 2;
    for (int64_t p = 0; p < group_pairs; ++p) {
      __m512i v = _mm512_loadu_si512(qg + p * kBlock);
      __m512i lo = _mm512_and_si512(v, low4);
      __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      __m512bh wt[4] = {(__m512bh)_mm512_unpacklo_epi8(lo, exp128), (__m512bh)_mm512_unpackhi_epi8(lo, exp128),
                        (__m512bh)_mm512_unpacklo_epi8(hi, exp128), (__m512bh)_mm512_unpackhi_epi8(hi, exp128)};
      for (int m = 0; m < MB; ++m) {
        __m512bh xb = pair(x + m * ldx + k0 + 2 * p);
        for (int t = 0; t < 4; ++t) dot[m][t] = _mm512_dpbf16_ps(dot[m][t], xb, wt[t]);
      }
    }
    const uint16_t* sg = sp + g * 2 * kBlock;
    for (int t = 0; t < 4; ++t) {
      __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sg + 16 * t)));
      __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sg + kBlock + 16 * t)));
      for (int m = 0; m < MB; ++m) {
        const float sum = xs[m * groups + g];
        __m512 centred = _mm512_sub_ps(dot[m][t], _mm512_set1_ps(128.0f * sum));
        acc[m][t] = _mm512_fmadd_ps(d, centred, _mm512_fmadd_ps(mn, _mm512_set1_ps(sum), acc[m][t]));
      }
    }
  }
  store_rows<MB>(acc, bias, out, ldo);
}

template <typename Fn>
void for_row_chunks(int64_t rows, Fn&& fn) {
  for (int64_t m0 = 0; m0 < rows; m0 += kRows) {
    switch (std::min(kRows, rows - m0)) {
      case 1: fn(m0, std::integral_constant<int, 1>{}); break;
      case 2: fn(m0, std::integral_constant<int, 2>{}); break;
      case 3: fn(m0, std::integral_constant<int, 3>{}); break;
      default: fn(m0, std::integral_constant<int, 4>{}); break;
    }
  }
}

#if defined(__AVX512VNNI__)

// Static W8A8 for few rows: u8 input codes (x + 128) times int8 weights with vpdpbusd (per
// 32-bit lane: 4 u8 x s8 products summed into int32), weights in blocks of 64 channels by
// quads of K, [N/64, K/4, 64, 4], so one 4-byte broadcast of the codes feeds 64 channels.
// Epilogue: y = (acc - 128 rowsum(q)) * input_scale scale[n] + bias, rounded once to the output.
template <int MB>
void w8a8_block(const uint8_t* x, int64_t ldx, const int8_t* w, int64_t quads, const float* comp,
                const int32_t* corr, const float* bias, void* out, bool out_bf16, int64_t ldo) {
  __m512i acc[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int t = 0; t < 4; ++t) acc[m][t] = _mm512_setzero_si512();
  for (int64_t p = 0; p < quads; ++p) {
    const int8_t* wp = w + p * 4 * kBlock;
    __m512i wt[4];
    for (int t = 0; t < 4; ++t) wt[t] = _mm512_loadu_si512(wp + 64 * t);
    for (int m = 0; m < MB; ++m) {
      int32_t bits;
      std::memcpy(&bits, x + m * ldx + 4 * p, sizeof bits);
      const __m512i xb = _mm512_set1_epi32(bits);
      for (int t = 0; t < 4; ++t) acc[m][t] = _mm512_dpbusd_epi32(acc[m][t], xb, wt[t]);
    }
  }
  for (int t = 0; t < 4; ++t) {
    const __m512 c = _mm512_loadu_ps(comp + 16 * t);
    const __m512i k = _mm512_loadu_si512(corr + 16 * t);
    const __m512 b = bias ? _mm512_loadu_ps(bias + 16 * t) : _mm512_setzero_ps();
    for (int m = 0; m < MB; ++m) {
      const __m512 y = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[m][t], k)), c, b);
      if (out_bf16) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + m * ldo + 16 * t),
                            (__m256i)_mm512_cvtneps_pbh(y));
      } else {
        _mm512_storeu_ps(static_cast<float*>(out) + m * ldo + 16 * t, y);
      }
    }
  }
}

#endif  // __AVX512VNNI__

#endif  // __AVX512BF16__

const uint16_t* bias_ptr(const c10::optional<at::Tensor>& bias, int64_t n) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->is_contiguous() && bias->numel() == n,
              "linear: bias must be a contiguous bf16 vector of ", n);
  return reinterpret_cast<const uint16_t*>(bias->data_ptr());
}

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1,
              "linear: x must be a 2-d bf16 tensor with unit stride along K");
}

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  check_x(x);
  TORCH_CHECK(w.dim() == 3 && w.size(2) == 2 * kBlock && w.scalar_type() == at::kBFloat16 && w.is_contiguous(),
              "linear_bf16: w must be a contiguous bf16 [N/64, K/2, 128] tensor");
  const int64_t rows = x.size(0), pairs = w.size(1), n = w.size(0) * kBlock;
  TORCH_CHECK(x.size(1) == 2 * pairs, "linear_bf16: x has ", x.size(1), " columns, the weight ", 2 * pairs);
  at::Tensor out = at::empty({rows, n}, x.options());
#if defined(__AVX512BF16__)
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  const uint16_t* bp = bias_ptr(bias, n);
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t ldx = x.stride(0);
  at::parallel_for(0, w.size(0), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for_row_chunks(rows, [&](int64_t m0, auto mb) {
        bf16_block<decltype(mb)::value>(xp + m0 * ldx, ldx, wp + b * pairs * 2 * kBlock, pairs,
                                        bp ? bp + b * kBlock : nullptr, op + m0 * n + b * kBlock, n);
      });
    }
  });
#else
  TORCH_CHECK(false, "linear_bf16: this build has no AVX-512 BF16");
#endif
  return out;
}

at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, int64_t group_size,
                       const c10::optional<at::Tensor>& bias, int64_t planes) {
  check_x(x);
  TORCH_CHECK(q.dim() == 3 && q.size(2) == kBlock && q.scalar_type() == at::kByte && q.is_contiguous(),
              "linear_int4: q must be a contiguous uint8 [N/64, K/2, 64] tensor");
  TORCH_CHECK((planes == 1 || planes == 2) && q.size(0) % planes == 0, "linear_int4: planes must be 1 or 2 and divide ",
              "the blocks");
  const int64_t rows = x.size(0), pairs = q.size(1), k = 2 * pairs, blocks = q.size(0) / planes, n = blocks * kBlock;
  TORCH_CHECK(group_size > 0 && group_size % 2 == 0 && k % group_size == 0,
              "linear_int4: group size ", group_size, " must be even and divide K = ", k);
  const int64_t groups = k / group_size;
  TORCH_CHECK(s.dim() == 4 && s.size(0) == q.size(0) && s.size(1) == groups && s.size(2) == 2 &&
                  s.size(3) == kBlock && s.scalar_type() == at::kHalf && s.is_contiguous(),
              "linear_int4: s must be a contiguous fp16 [N/64, K/G, 2, 64] tensor");
  TORCH_CHECK(x.size(1) == k, "linear_int4: x has ", x.size(1), " columns, the weight ", k);
  at::Tensor out = at::empty({rows, n}, x.options());
#if defined(__AVX512BF16__)
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* qp = q.data_ptr<uint8_t>();
  const auto* sp = reinterpret_cast<const uint16_t*>(s.data_ptr());
  const uint16_t* bp = bias_ptr(bias, n);
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t ldx = x.stride(0);
  std::vector<float> xs(rows * groups, 0.0f);  // sums of x over each group, once for all threads
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t kk = 0; kk < k; ++kk) xs[m * groups + kk / group_size] += bf16_bits_to_float(xp[m * ldx + kk]);
  const float* xsp = xs.data();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for_row_chunks(rows, [&](int64_t m0, auto mb) {
        int4_block<decltype(mb)::value>(xp + m0 * ldx, ldx, xsp + m0 * groups, groups, qp + b * pairs * kBlock,
                                        sp + b * groups * 2 * kBlock, group_size / 2, planes,
                                        blocks * pairs * kBlock, blocks * groups * 2 * kBlock, bp ? bp + b * kBlock : nullptr, op + m0 * n + b * kBlock, n);
      });
    }
  });
#else
  TORCH_CHECK(false, "linear_int4: this build has no AVX-512 BF16");
#endif
  return out;
}

at::Tensor linear_w8a8(const at::Tensor& codes, const at::Tensor& w, const at::Tensor& comp, const at::Tensor& corr,
                       const c10::optional<at::Tensor>& bias, bool out_bf16) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.stride(1) == 1,
              "linear_w8a8: codes must be a 2-d uint8 tensor with unit stride along K");
  TORCH_CHECK(w.dim() == 3 && w.size(2) == 4 * kBlock && w.scalar_type() == at::kChar && w.is_contiguous(),
              "linear_w8a8: w must be a contiguous int8 [N/64, K/4, 256] tensor");
  const int64_t rows = codes.size(0), quads = w.size(1), n = w.size(0) * kBlock;
  TORCH_CHECK(codes.size(1) == 4 * quads, "linear_w8a8: codes have ", codes.size(1), " columns, the weight ", 4 * quads);
  TORCH_CHECK(comp.scalar_type() == at::kFloat && comp.is_contiguous() && comp.numel() == n &&
                  corr.scalar_type() == at::kInt && corr.is_contiguous() && corr.numel() == n,
              "linear_w8a8: comp must be float32 [N] and corr int32 [N]");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n),
              "linear_w8a8: bias must be a contiguous float32 vector of ", n);
  at::Tensor out = at::empty({rows, n}, codes.options().dtype(out_bf16 ? at::kBFloat16 : at::kFloat));
#if defined(__AVX512BF16__) && defined(__AVX512VNNI__)
  const uint8_t* xp = codes.data_ptr<uint8_t>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* cp = comp.data_ptr<float>();
  const int32_t* kp = corr.data_ptr<int32_t>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  char* op = static_cast<char*>(out.data_ptr());
  const int64_t ldx = codes.stride(0), elem = out.element_size();
  at::parallel_for(0, w.size(0), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for_row_chunks(rows, [&](int64_t m0, auto mb) {
        w8a8_block<decltype(mb)::value>(xp + m0 * ldx, ldx, wp + b * quads * 4 * kBlock, quads, cp + b * kBlock,
                                        kp + b * kBlock, bp ? bp + b * kBlock : nullptr,
                                        op + (m0 * n + b * kBlock) * elem, out_bf16, n);
      });
    }
  });
#else
  TORCH_CHECK(false, "linear_w8a8: this build has no AVX-512 VNNI and BF16");
#endif
  return out;
}

// Static W8A8's input quantizer: u8[m, k] = clamp(round(x[m, k] * inv[k]), -127, 127) + 128, the
// unsigned codes (zero point 128) of oneDNN's u8 x s8 GEMM. Rounds half to even, as torch.round
// (surge/quant/formats.py quantize_activations is the reference). One pass instead of five
// tensor ops: at decode sizes those cost ~15 us per linear, this ~1.
at::Tensor quantize_u8(const at::Tensor& x, const at::Tensor& inv) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "quantize_u8: x must be a bf16 or float32 [M, K] tensor with contiguous rows");
  TORCH_CHECK(inv.dim() == 1 && inv.size(0) == x.size(1) && inv.scalar_type() == at::kFloat && inv.is_contiguous(),
              "quantize_u8: inv must be a contiguous float32 [K] tensor");
  const int64_t rows = x.size(0), k = x.size(1), ldx = x.stride(0);
  at::Tensor out = at::empty({rows, k}, x.options().dtype(at::kByte));
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const auto* xb = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* xf = reinterpret_cast<const float*>(x.data_ptr());
  const float* ip = inv.data_ptr<float>();
  auto* op = out.data_ptr<uint8_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t m = r0; m < r1; ++m) {
      int64_t kk = 0;
#if defined(__AVX512F__)
      const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
      const __m512i zero_point = _mm512_set1_epi32(128);
      for (; kk + 16 <= k; kk += 16) {
        __m512 v = bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(
                              _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + m * ldx + kk))), 16))
                        : _mm512_loadu_ps(xf + m * ldx + kk);
        v = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_loadu_ps(ip + kk)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
        __m512i c = _mm512_add_epi32(_mm512_cvtps_epi32(v), zero_point);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(op + m * k + kk), _mm512_cvtusepi32_epi8(c));
      }
#endif
      for (; kk < k; ++kk) {
        float v = bf16 ? bf16_bits_to_float(xb[m * ldx + kk]) : xf[m * ldx + kk];
        v = std::min(std::max(std::nearbyint(v * ip[kk]), -127.0f), 127.0f);
        op[m * k + kk] = static_cast<uint8_t>(static_cast<int>(v) + 128);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(surge_native, m) {
  m.def("linear_bf16(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor q, Tensor s, int group_size, Tensor? bias, int planes) -> Tensor");
  m.def("quantize_u8(Tensor x, Tensor inv) -> Tensor");
  m.def("linear_w8a8(Tensor codes, Tensor w, Tensor comp, Tensor corr, Tensor? bias, bool out_bf16) -> Tensor");
}

TORCH_LIBRARY_IMPL(surge_native, CPU, m) {
  m.impl("linear_bf16", &linear_bf16);
  m.impl("linear_int4", &linear_int4);
  m.impl("quantize_u8", &quantize_u8);
  m.impl("linear_w8a8", &linear_w8a8);
}
