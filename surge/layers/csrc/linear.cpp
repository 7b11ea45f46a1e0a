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

#include "kernels.h"

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

// With `part`, a block's accumulators continue from (unless first) and are left in (unless
// last) a float32 [MB][64] buffer: K taken in tiles (linear_quant's many-row path).
template <int MB>
void bf16_block(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t pairs, const uint16_t* bias,
                uint16_t* out, int64_t ldo, float* part = nullptr, bool first = true, bool last = true) {
  __m512 acc[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int t = 0; t < 4; ++t) acc[m][t] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(part + m * kBlock + 16 * t);
  for (int64_t p = 0; p < pairs; ++p) {
    const uint16_t* wp = w + p * 2 * kBlock;
    __m512bh wt[4];
    for (int t = 0; t < 4; ++t) wt[t] = (__m512bh)_mm512_loadu_si512(wp + 32 * t);
    for (int m = 0; m < MB; ++m) {
      __m512bh xb = pair(x + m * ldx + 2 * p);
      for (int t = 0; t < 4; ++t) acc[m][t] = _mm512_dpbf16_ps(acc[m][t], xb, wt[t]);
    }
  }
  if (last) {
    store_rows<MB>(acc, bias, out, ldo);
    return;
  }
  for (int m = 0; m < MB; ++m)
    for (int t = 0; t < 4; ++t) _mm512_storeu_ps(part + m * kBlock + 16 * t, acc[m][t]);
}

#endif  // __AVX512BF16__

// Block-quantized weights: codes of 4, 5 or 6 bits and their scales, one template per format.
//   codes  q  [N/64, K/2, 64] uint8   the low 4 bits of (block b, pair p), laid out as pack_int4's
//          qh [N/64, K/2/R, 64] uint8 5 bits: bit 2j (low nibble) and 2j + 1 (high nibble) of
//                                    byte i hold the fifth bits of pair R r + j, R = 4;
//                                    6 bits: bits 4j..4j+1 and 4j+2..4j+3, R = 2
//   scales (kScalesGroup)   fp16 [N/64, K/G, 2, 64]: W = s[0] code + s[1]              (int4, Q5_0/Q5_1)
//          (kScalesKAsym)   per 256 of K a record of 1280 bytes: fp16 d[64], fp16 -dmin[64],
//                           u8 sc[8][64], u8 m[8][64]: W = d sc code - dmin m, groups of 32  (Q4_K, Q5_K)
//          (kScalesKSym)    per 256 of K a record of 1152 bytes: fp16 d[64], i8 sc[16][64]:
//                           W = d sc (code - 32), groups of 16                              (Q6_K)
//          (kScalesQ8)      fp16 [N/64, K/G, 64]: W = d (code - 128)                          (Q8_0, int8 groups)
// 8-bit codes (code = q + 128) keep their low nibbles in q and their high nibbles in qh, both
// laid out as pack_int4's nibbles (R = 1).
// A group's dot product runs over the codes as bf16 (128 + code, see above); the group's
// scale finishes it: acc += scale (dot - offset sum x) + min sum x, offset 128 (+ 32 for Q6_K).
// 8-bit codes take two products a pair, (128 + low nibble) and (2048 + 16 high nibble), the
// latter the bf16 word 0x4500 | nibble: their sum is code + 2176, offset 2304 (2176 + 128).
enum Scales { kScalesGroup = 0, kScalesKAsym = 1, kScalesKSym = 2, kScalesQ8 = 3 };
enum Kind : int64_t { kInt4 = 0, kQ5 = 1, kQ4K = 2, kQ5K = 3, kQ6K = 4, kQ8 = 5 };

template <int BITS, int SCALES>
struct Format {
  static constexpr int bits = BITS;
  static constexpr int scales = SCALES;
  static constexpr int64_t high_pairs = BITS == 5 ? 4 : BITS == 8 ? 1 : 2;  // pairs per 64-byte record of high bits
  static constexpr int products = BITS == 8 ? 8 : 4;  // bf16 vectors a pair of a block feeds
  static constexpr int64_t k_group = SCALES == kScalesKAsym ? 32 : 16;  // the K formats' fixed groups
  static constexpr int64_t record = SCALES == kScalesKAsym ? 1280 : 1152;  // bytes per 256 of K
  static constexpr float offset = SCALES == kScalesKSym ? 160.0f : SCALES == kScalesQ8 ? 2304.0f : 128.0f;
  static constexpr float zero = SCALES == kScalesKSym ? 32.0f : SCALES == kScalesQ8 ? 128.0f : 0.0f;  // W's zero code
};

#if defined(__AVX512BF16__)

inline __m512 half_to_float(const void* p) {  // 16 fp16 -> 16 float
  return _mm512_cvtph_ps(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
}

// The scale and min of group g for channels 16t..16t+15 of a block; s: the block's scales.
template <class F>
inline void group_scale(const uint8_t* s, int64_t g, int t, __m512& scale, __m512& minimum) {
  if constexpr (F::scales == kScalesGroup) {
    const uint16_t* sg = reinterpret_cast<const uint16_t*>(s) + g * 2 * kBlock;
    scale = half_to_float(sg + 16 * t);
    minimum = half_to_float(sg + kBlock + 16 * t);
  } else if constexpr (F::scales == kScalesQ8) {
    scale = half_to_float(reinterpret_cast<const uint16_t*>(s) + g * kBlock + 16 * t);
    minimum = _mm512_setzero_ps();
  } else {
    constexpr int64_t per = 256 / F::k_group;
    const uint8_t* rec = s + (g / per) * F::record;
    const int64_t gi = g % per;
    const __m512 d = half_to_float(rec + 32 * t);
    if constexpr (F::scales == kScalesKAsym) {
      const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rec + 256 + gi * kBlock + 16 * t));
      const __m128i m = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rec + 768 + gi * kBlock + 16 * t));
      scale = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(sc)));
      minimum = _mm512_mul_ps(half_to_float(rec + 128 + 32 * t), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(m)));
    } else {
      const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rec + 128 + gi * kBlock + 16 * t));
      scale = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc)));
      minimum = _mm512_setzero_ps();
    }
  }
}

// The codes of pair p as four vectors of bf16 (128 + code), channels 16t..16t+15 in vector t
// (8-bit codes: eight, the high nibbles' (2048 + 16 nibble) in vectors 4..7).
template <class F>
inline void pair_codes(const uint8_t* q, const uint8_t* qh, int64_t p, __m512bh (&wt)[F::products]) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i exp128 = _mm512_set1_epi8(0x43);
  const __m512i v = _mm512_loadu_si512(q + p * kBlock);
  __m512i lo = _mm512_and_si512(v, low4);
  __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
  if constexpr (F::bits == 8) {
    const __m512i exp2048 = _mm512_set1_epi8(0x45);
    const __m512i h = _mm512_loadu_si512(qh + p * kBlock);
    const __m512i hlo = _mm512_and_si512(h, low4);
    const __m512i hhi = _mm512_and_si512(_mm512_srli_epi16(h, 4), low4);
    wt[4] = (__m512bh)_mm512_unpacklo_epi8(hlo, exp2048);
    wt[5] = (__m512bh)_mm512_unpackhi_epi8(hlo, exp2048);
    wt[6] = (__m512bh)_mm512_unpacklo_epi8(hhi, exp2048);
    wt[7] = (__m512bh)_mm512_unpackhi_epi8(hhi, exp2048);
  } else if constexpr (F::bits > 4) {  // shifts by whole 16-bit words keep each byte's bits in its byte (masked)
    const int64_t j = p % F::high_pairs;
    const __m512i h = _mm512_srl_epi16(_mm512_loadu_si512(qh + (p / F::high_pairs) * kBlock),
                                       _mm_cvtsi64_si128((F::bits == 5 ? 2 : 4) * j));
    const __m512i mask = _mm512_set1_epi8(F::bits == 5 ? 0x10 : 0x30);
    lo = _mm512_or_si512(lo, _mm512_and_si512(_mm512_slli_epi16(h, 4), mask));
    hi = _mm512_or_si512(hi, _mm512_and_si512(_mm512_slli_epi16(h, F::bits == 5 ? 3 : 2), mask));
  }
  wt[0] = (__m512bh)_mm512_unpacklo_epi8(lo, exp128);
  wt[1] = (__m512bh)_mm512_unpackhi_epi8(lo, exp128);
  wt[2] = (__m512bh)_mm512_unpacklo_epi8(hi, exp128);
  wt[3] = (__m512bh)_mm512_unpackhi_epi8(hi, exp128);
}

// One block of 64 channels for MB rows, from the codes (few rows: each weight byte read once
// per pass). xs: [MB rows][groups] sums of x over each group. With planes = 2 the block's
// output is the sum of two int4 planes (GGUF's Q8_0 as high and low nibbles), plane_q /
// plane_s bytes apart, accumulated in float before the one rounding to bf16.
template <int MB, class F>
void quant_block(const uint16_t* x, int64_t ldx, const float* xs, int64_t groups, int64_t group_pairs,
                 const uint8_t* q, const uint8_t* qh, const uint8_t* s, int64_t planes, int64_t plane_q,
                 int64_t plane_s, const uint16_t* bias, uint16_t* out, int64_t ldo) {
  __m512 acc[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int t = 0; t < 4; ++t) acc[m][t] = _mm512_setzero_ps();
  for (int64_t gp = 0; gp < planes * groups; ++gp) {
    const int64_t g = gp % groups;
    const uint8_t* qp = q + (gp / groups) * plane_q;
    const uint8_t* sp = s + (gp / groups) * plane_s;
    __m512 dot[MB][4];
    for (int m = 0; m < MB; ++m)
      for (int t = 0; t < 4; ++t) dot[m][t] = _mm512_setzero_ps();
    for (int64_t p = g * group_pairs; p < (g + 1) * group_pairs; ++p) {
      __m512bh wt[F::products];
      pair_codes<F>(qp, qh, p, wt);
      for (int m = 0; m < MB; ++m) {
        __m512bh xb = pair(x + m * ldx + 2 * p);
        for (int t = 0; t < F::products; ++t) dot[m][t % 4] = _mm512_dpbf16_ps(dot[m][t % 4], xb, wt[t]);
      }
    }
    for (int t = 0; t < 4; ++t) {
      __m512 scale, minimum;
      group_scale<F>(sp, g, t, scale, minimum);
      for (int m = 0; m < MB; ++m) {
        const float sum = xs[m * groups + g];
        __m512 centred = _mm512_sub_ps(dot[m][t], _mm512_set1_ps(F::offset * sum));
        acc[m][t] = _mm512_fmadd_ps(scale, centred, _mm512_fmadd_ps(minimum, _mm512_set1_ps(sum), acc[m][t]));
      }
    }
  }
  store_rows<MB>(acc, bias, out, ldo);
}

// Pairs [p0, p1) of one block dequantized into bf16 in linear_bf16's layout ([pairs][64][2]):
// W = scale code + min in float (one rounding), rounded once to bf16; planes summed first.
template <class F>
void dequantize_tile(const uint8_t* q, const uint8_t* qh, const uint8_t* s, int64_t group_pairs, int64_t planes,
                     int64_t plane_q, int64_t plane_s, int64_t p0, int64_t p1, uint16_t* tile) {
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i high_half = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  const __m512 offset = _mm512_set1_ps(F::offset);
  __m512 scale[2][4], minimum[2][4];
  for (int64_t p = p0; p < p1; ++p) {
    if (p == p0 || p % group_pairs == 0) {
      for (int64_t plane = 0; plane < planes; ++plane)
        for (int t = 0; t < 4; ++t)
          group_scale<F>(s + plane * plane_s, p / group_pairs, t, scale[plane][t], minimum[plane][t]);
    }
    __m512 w[2][4];  // [pair element][channels 16t..]
    for (int64_t plane = 0; plane < planes; ++plane) {
      __m512bh wt[F::products];
      pair_codes<F>(q + plane * plane_q, qh, p, wt);
      for (int t = 0; t < 4; ++t) {
        const __m512i bits = (__m512i)wt[t];
        __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
        __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(bits, high_half));
        if constexpr (F::bits == 8) {  // (128 + low) + (2048 + 16 high), both exact in float
          const __m512i high = (__m512i)wt[t + 4];
          even = _mm512_add_ps(even, _mm512_castsi512_ps(_mm512_slli_epi32(high, 16)));
          odd = _mm512_add_ps(odd, _mm512_castsi512_ps(_mm512_and_si512(high, high_half)));
        }
        even = _mm512_sub_ps(even, offset);
        odd = _mm512_sub_ps(odd, offset);
        if (plane == 0) {
          w[0][t] = _mm512_fmadd_ps(scale[0][t], even, minimum[0][t]);
          w[1][t] = _mm512_fmadd_ps(scale[0][t], odd, minimum[0][t]);
        } else {
          w[0][t] = _mm512_add_ps(w[0][t], _mm512_fmadd_ps(scale[1][t], even, minimum[1][t]));
          w[1][t] = _mm512_add_ps(w[1][t], _mm512_fmadd_ps(scale[1][t], odd, minimum[1][t]));
        }
      }
    }
    for (int t = 0; t < 4; ++t) {
      const __m512i packed = (__m512i)_mm512_cvtne2ps_pbh(w[1][t], w[0][t]);  // [even 0..15 | odd 0..15]
      _mm512_storeu_si512(tile + (p - p0) * 2 * kBlock + 32 * t, _mm512_permutexvar_epi16(interleave, packed));
    }
  }
}

#endif  // __AVX512BF16__

// The float32 weight of channel c (of block b's 64) at column k, one element at a time (rows
// of an embedding table, dequantize()): the inverse of the layouts above.
template <class F>
float weight_at(const uint8_t* q, const uint8_t* qh, const uint8_t* s, int64_t group_pairs, int64_t planes,
                int64_t plane_q, int64_t plane_s, int64_t c, int64_t k) {
  const int64_t p = k / 2, j = k % 2, half = c / 32, cc = c % 32;
  const int64_t word = 2 * (cc % 16) + j;
  const int64_t byte = (word / 8) * 16 + (cc / 16) * 8 + word % 8;
  const int64_t g = p / group_pairs;
  float total = 0.0f;
  for (int64_t plane = 0; plane < planes; ++plane) {
    const uint8_t v = q[plane * plane_q + p * kBlock + byte];
    int code = half ? v >> 4 : v & 0x0F;
    if constexpr (F::bits == 8) {
      const uint8_t h = qh[p * kBlock + byte];
      code |= (half ? h >> 4 : h & 0x0F) << 4;
    } else if constexpr (F::bits > 4) {
      const uint8_t h = qh[(p / F::high_pairs) * kBlock + byte];
      const int64_t jj = p % F::high_pairs;
      code |= F::bits == 5 ? ((h >> (2 * jj + half)) & 1) << 4 : ((h >> (4 * jj + 2 * half)) & 3) << 4;
    }
    const uint8_t* sp = s + plane * plane_s;
    float scale, minimum;
    if constexpr (F::scales == kScalesGroup) {
      const auto* sg = reinterpret_cast<const at::Half*>(sp) + g * 2 * kBlock;
      scale = static_cast<float>(sg[c]);
      minimum = static_cast<float>(sg[kBlock + c]);
    } else if constexpr (F::scales == kScalesQ8) {
      scale = static_cast<float>(reinterpret_cast<const at::Half*>(sp)[g * kBlock + c]);
      minimum = 0.0f;
    } else {
      constexpr int64_t per = 256 / F::k_group;
      const uint8_t* rec = sp + (g / per) * F::record;
      const int64_t gi = g % per;
      const float d = static_cast<float>(reinterpret_cast<const at::Half*>(rec)[c]);
      if constexpr (F::scales == kScalesKAsym) {
        scale = d * static_cast<float>(rec[256 + gi * kBlock + c]);
        minimum = static_cast<float>(reinterpret_cast<const at::Half*>(rec + 128)[c]) *
                  static_cast<float>(rec[768 + gi * kBlock + c]);
      } else {
        scale = d * static_cast<float>(static_cast<int8_t>(rec[128 + gi * kBlock + c]));
        minimum = 0.0f;
      }
    }
    total += std::fma(scale, static_cast<float>(code) - F::zero, minimum);
  }
  return total;
}

// Rows in passes of at most kRows, as even as the count allows (5 rows: 3 + 2, not 4 + 1: a
// pass of one row waits on its four accumulators' dot-product latency, one of two rows less).
template <typename Fn>
void for_row_chunks(int64_t rows, Fn&& fn) {
  const int64_t passes = (rows + kRows - 1) / kRows;
  for (int64_t i = 0, m0 = 0; i < passes; ++i) {
    const int64_t mb = (rows - m0) / (passes - i);
    const int64_t m = m0;
    m0 += mb;
    switch (mb) {
      case 1: fn(m, std::integral_constant<int, 1>{}); break;
      case 2: fn(m, std::integral_constant<int, 2>{}); break;
      case 3: fn(m, std::integral_constant<int, 3>{}); break;
      default: fn(m, std::integral_constant<int, 4>{}); break;
    }
  }
}

#if defined(__AVX512BF16__) && defined(__AVX512VNNI__)

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

#endif  // __AVX512BF16__ && __AVX512VNNI__

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

// Calls fn with the Format of `kind` (a value of Kind).
template <typename Fn>
void with_format(int64_t kind, Fn&& fn) {
  switch (kind) {
    case kInt4: fn(Format<4, kScalesGroup>{}); break;
    case kQ5: fn(Format<5, kScalesGroup>{}); break;
    case kQ4K: fn(Format<4, kScalesKAsym>{}); break;
    case kQ5K: fn(Format<5, kScalesKAsym>{}); break;
    case kQ6K: fn(Format<6, kScalesKSym>{}); break;
    case kQ8: fn(Format<8, kScalesQ8>{}); break;
    default: TORCH_CHECK(false, "linear_quant: unknown weight kind ", kind);
  }
}

// The shapes of one block-quantized weight, checked once (see the layouts above).
struct QuantShape {
  int64_t pairs, k, blocks, n, groups, group_pairs, plane_q, plane_s;
};

QuantShape check_quant(const at::Tensor& q, const at::Tensor& qh, const at::Tensor& s, int64_t kind,
                       int64_t group_size, int64_t planes) {
  TORCH_CHECK(q.dim() == 3 && q.size(2) == kBlock && q.scalar_type() == at::kByte && q.is_contiguous(),
              "linear_quant: q must be a contiguous uint8 [N/64, K/2, 64] tensor");
  TORCH_CHECK((planes == 1 || (planes == 2 && kind == kInt4)) && q.size(0) % planes == 0,
              "linear_quant: planes must be 1, or 2 for int4 planes, and divide the blocks");
  QuantShape sh{};
  sh.pairs = q.size(1);
  sh.k = 2 * sh.pairs;
  sh.blocks = q.size(0) / planes;
  sh.n = sh.blocks * kBlock;
  sh.plane_q = sh.blocks * sh.pairs * kBlock;
  with_format(kind, [&](auto f) {
    using F = decltype(f);
    if constexpr (F::scales == kScalesGroup) {
      TORCH_CHECK(group_size > 0 && group_size % 2 == 0 && sh.k % group_size == 0,
                  "linear_quant: group size ", group_size, " must be even and divide K = ", sh.k);
      TORCH_CHECK(F::bits == 4 || group_size % 8 == 0, "linear_quant: 5-bit groups must be a multiple of 8");
      sh.groups = sh.k / group_size;
      TORCH_CHECK(s.dim() == 4 && s.size(0) == q.size(0) && s.size(1) == sh.groups && s.size(2) == 2 &&
                      s.size(3) == kBlock && s.scalar_type() == at::kHalf && s.is_contiguous(),
                  "linear_quant: s must be a contiguous fp16 [N/64, K/G, 2, 64] tensor");
      sh.plane_s = sh.blocks * sh.groups * 2 * kBlock * 2;
    } else if constexpr (F::scales == kScalesQ8) {
      TORCH_CHECK(group_size > 0 && group_size % 2 == 0 && sh.k % group_size == 0,
                  "linear_quant: group size ", group_size, " must be even and divide K = ", sh.k);
      sh.groups = sh.k / group_size;
      TORCH_CHECK(s.dim() == 3 && s.size(0) == sh.blocks && s.size(1) == sh.groups && s.size(2) == kBlock &&
                      s.scalar_type() == at::kHalf && s.is_contiguous(),
                  "linear_quant: s must be a contiguous fp16 [N/64, K/G, 64] tensor");
      sh.plane_s = 0;
    } else {
      TORCH_CHECK(sh.k % 256 == 0, "linear_quant: K = ", sh.k, " is not a multiple of 256");
      sh.groups = sh.k / F::k_group;
      TORCH_CHECK(s.dim() == 3 && s.size(0) == sh.blocks && s.size(1) == sh.k / 256 && s.size(2) == F::record &&
                      s.scalar_type() == at::kByte && s.is_contiguous(),
                  "linear_quant: s must be a contiguous uint8 [N/64, K/256, ", F::record, "] tensor");
      sh.plane_s = 0;
    }
    if constexpr (F::bits > 4) {
      TORCH_CHECK(qh.dim() == 3 && qh.size(0) == sh.blocks && qh.size(1) * F::high_pairs == sh.pairs &&
                      qh.size(2) == kBlock && qh.scalar_type() == at::kByte && qh.is_contiguous(),
                  "linear_quant: qh must be a contiguous uint8 [N/64, K/2/", F::high_pairs, ", 64] tensor");
    }
  });
  sh.group_pairs = sh.k / sh.groups / 2;
  return sh;
}

// Block b's scales (its first plane's, where there are two).
const uint8_t* block_scales(const at::Tensor& s, int64_t b) {
  return static_cast<const uint8_t*>(s.data_ptr()) + b * (s.numel() * s.element_size() / s.size(0));
}

constexpr int64_t kTilePairs = 2048;  // pairs of K per dequantized tile (512 KB: L2)

at::Tensor linear_quant(const at::Tensor& x, const at::Tensor& q, const at::Tensor& qh, const at::Tensor& s,
                        int64_t kind, int64_t group_size, const c10::optional<at::Tensor>& bias, int64_t planes,
                        int64_t tile_min_rows) {
  check_x(x);
  const QuantShape sh = check_quant(q, qh, s, kind, group_size, planes);
  TORCH_CHECK(x.size(1) == sh.k, "linear_quant: x has ", x.size(1), " columns, the weight ", sh.k);
  const int64_t rows = x.size(0), n = sh.n;
  at::Tensor out = at::empty({rows, n}, x.options());
#if defined(__AVX512BF16__)
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* qp = q.data_ptr<uint8_t>();
  const auto* hp = qh.numel() ? qh.data_ptr<uint8_t>() : nullptr;
  const uint16_t* bp = bias_ptr(bias, n);
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t ldx = x.stride(0), pairs = sh.pairs, groups = sh.groups;
  const int64_t high_block = qh.numel() ? qh.size(1) * kBlock : 0;
  with_format(kind, [&](auto f) {
    using F = decltype(f);
    if (rows >= tile_min_rows) {  // many rows: a tile at a time in bf16, then the bf16 kernel over every row
      at::parallel_for(0, sh.blocks, 1, [&](int64_t b0, int64_t b1) {
        const int64_t tile_pairs = std::min(pairs, kTilePairs);
        std::vector<uint16_t> tile(tile_pairs * 2 * kBlock);
        std::vector<float> part(pairs > tile_pairs ? rows * kBlock : 0);
        for (int64_t b = b0; b < b1; ++b) {
          for (int64_t p0 = 0; p0 < pairs; p0 += tile_pairs) {
            const int64_t p1 = std::min(pairs, p0 + tile_pairs);
            dequantize_tile<F>(qp + b * pairs * kBlock, hp ? hp + b * high_block : nullptr, block_scales(s, b),
                               sh.group_pairs, planes, sh.plane_q, sh.plane_s, p0, p1, tile.data());
            for_row_chunks(rows, [&](int64_t m0, auto mb) {
              bf16_block<decltype(mb)::value>(xp + m0 * ldx + 2 * p0, ldx, tile.data(), p1 - p0,
                                              bp ? bp + b * kBlock : nullptr, op + m0 * n + b * kBlock, n,
                                              part.empty() ? nullptr : part.data() + m0 * kBlock, p0 == 0, p1 == pairs);
            });
          }
        }
      });
      return;
    }
    std::vector<float> xs(rows * groups, 0.0f);  // sums of x over each group, once for all threads
    const int64_t group = sh.k / groups;
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t kk = 0; kk < sh.k; ++kk) xs[m * groups + kk / group] += bf16_bits_to_float(xp[m * ldx + kk]);
    const float* xsp = xs.data();
    at::parallel_for(0, sh.blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        for_row_chunks(rows, [&](int64_t m0, auto mb) {
          quant_block<decltype(mb)::value, F>(xp + m0 * ldx, ldx, xsp + m0 * groups, groups, sh.group_pairs,
                                              qp + b * pairs * kBlock, hp ? hp + b * high_block : nullptr,
                                              block_scales(s, b), planes, sh.plane_q, sh.plane_s,
                                              bp ? bp + b * kBlock : nullptr, op + m0 * n + b * kBlock, n);
        });
      }
    });
  });
#else
  TORCH_CHECK(false, "linear_quant: this build has no AVX-512 BF16");
#endif
  return out;
}

// Rows `ids` of a block-quantized weight as float32 [len(ids), K]: an embedding table's lookup
// (the table shared with a tied output head) and dequantize().
at::Tensor quant_rows(const at::Tensor& ids, const at::Tensor& q, const at::Tensor& qh, const at::Tensor& s,
                      int64_t kind, int64_t group_size, int64_t planes) {
  const QuantShape sh = check_quant(q, qh, s, kind, group_size, planes);
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong, "quant_rows: ids must be a 1-d int64 tensor");
  const at::Tensor idc = ids.contiguous();
  const int64_t count = idc.size(0);
  const int64_t* ip = idc.data_ptr<int64_t>();
  for (int64_t r = 0; r < count; ++r)
    TORCH_CHECK(ip[r] >= 0 && ip[r] < sh.n, "quant_rows: row ", ip[r], " is out of range for ", sh.n, " rows");
  at::Tensor out = at::empty({count, sh.k}, q.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  const auto* qp = q.data_ptr<uint8_t>();
  const auto* hp = qh.numel() ? qh.data_ptr<uint8_t>() : nullptr;
  const int64_t high_block = qh.numel() ? qh.size(1) * kBlock : 0;
  with_format(kind, [&](auto f) {
    using F = decltype(f);
    at::parallel_for(0, count, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = ip[r] / kBlock, c = ip[r] % kBlock;
        const uint8_t* hb = hp ? hp + b * high_block : nullptr;
        for (int64_t kk = 0; kk < sh.k; ++kk)
          op[r * sh.k + kk] = weight_at<F>(qp + b * sh.pairs * kBlock, hb, block_scales(s, b), sh.group_pairs,
                                           planes, sh.plane_q, sh.plane_s, c, kk);
      }
    });
  });
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

namespace surge_kernels {

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  return ::linear_bf16(x, w, bias);
}

at::Tensor linear_quant(const at::Tensor& x, const at::Tensor& q, const at::Tensor& qh, const at::Tensor& s,
                        int64_t kind, int64_t group_size, const c10::optional<at::Tensor>& bias, int64_t planes,
                        int64_t tile_min_rows) {
  return ::linear_quant(x, q, qh, s, kind, group_size, bias, planes, tile_min_rows);
}

}  // namespace surge_kernels

TORCH_LIBRARY_FRAGMENT(surge_native, m) {
  m.def("linear_bf16(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("linear_quant(Tensor x, Tensor q, Tensor qh, Tensor s, int kind, int group_size, Tensor? bias, int planes, "
        "int tile_min_rows) -> Tensor");
  m.def("quant_rows(Tensor ids, Tensor q, Tensor qh, Tensor s, int kind, int group_size, int planes) -> Tensor");
  m.def("quantize_u8(Tensor x, Tensor inv) -> Tensor");
  m.def("linear_w8a8(Tensor codes, Tensor w, Tensor comp, Tensor corr, Tensor? bias, bool out_bf16) -> Tensor");
}

TORCH_LIBRARY_IMPL(surge_native, CPU, m) {
  m.impl("linear_bf16", &linear_bf16);
  m.impl("linear_quant", &linear_quant);
  m.impl("quant_rows", &quant_rows);
  m.impl("quantize_u8", &quantize_u8);
  m.impl("linear_w8a8", &linear_w8a8);
}
