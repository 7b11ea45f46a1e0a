// The decoder stack of a decode-only step in one native call: every layer's norms, linears,
// per-head q/k norms, RoPE, KV write and paged attention, activation and residual adds, with
// no Python and no dispatcher between them (surge/layers/native_decoder.py builds it from a
// model's DecoderPlan).
//
// The linears and the attention are the same kernels the eager path calls (kernels.h); the
// small operations between them are written here to round where the eager path rounds:
//
//   residual add        bf16(x + r)
//   RMSNorm (Llama)     bf16(w * bf16(x / rms(x)))        normalized in float32
//   RMSNorm (Gemma)     bf16(x / rms(x) * (1 + w))        (1 + w) in float32, given as w
//   LayerNorm           bf16((x - mean) / std * w + b)    float32
//   RoPE (rotate-half)  bf16(bf16(x * cos) + bf16(rot(x) * sin)), cos/sin as bf16 tables
//   gated MLP           bf16(bf16(act(gate)) * up); act as ATen's vectorized float kernels
//
// Activations are bf16 throughout (the only dtype the linear kernels take). A layer is
// pre-norm (Llama) with optional norms on the attention's and the MLP's outputs (Gemma 3's
// sandwich); its MLP gated (gate and up in one linear, or as parts) or plain (GPT-2).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace {

using Vec = at::vec::Vectorized<float>;
using bf16 = c10::BFloat16;

enum NormMode : int64_t { kRmsLlama = 0, kRmsGemma = 1, kLayerNorm = 2 };
enum Activation : int64_t { kSilu = 0, kGeluTanh = 1, kGelu = 2 };
enum LinearType : int64_t { kDense = 0, kQuant = 1 };
enum NormSlot : int64_t { kAttnNorm = 0, kAttnOutNorm = 1, kMlpNorm = 2, kMlpOutNorm = 3, kQNorm = 4, kKNorm = 5 };
enum LinearSlot : int64_t { kQkv = 0, kOut = 1, kUp = 2, kDown = 3 };
constexpr int64_t kNormSlots = 6, kLinearSlots = 4;

struct Norm {
  bool present = false;
  int64_t mode = kRmsLlama;
  at::Tensor weight;  // float32 [n]
  at::Tensor bias;    // float32 [n], LayerNorm only
  double eps = 1e-6;
};

struct LinearPart {
  int64_t type = kDense;
  at::Tensor w, q, qh, s;
  c10::optional<at::Tensor> bias;
  int64_t kind = 0, group_size = 0, planes = 1, tile_min_rows = 0, out = 0;

  at::Tensor run(const at::Tensor& x) const {
    if (type == kDense) return surge_kernels::linear_bf16(x, w, bias);
    return surge_kernels::linear_quant(x, q, qh, s, kind, group_size, bias, planes, tile_min_rows);
  }
};

struct Linear {
  std::vector<LinearPart> parts;  // several: one projection stored in several formats
  int64_t out = 0;

  at::Tensor run(const at::Tensor& x) const {
    if (parts.size() == 1) return parts[0].run(x);
    std::vector<at::Tensor> outs;
    outs.reserve(parts.size());
    for (const auto& p : parts) outs.push_back(p.run(x));
    return at::cat(outs, 1);
  }
};

struct Layer {
  int64_t rope = -1;  // index of the step's cos/sin tables, -1: no RoPE (learned positions)
  int64_t heads = 0, kv_heads = 0, head_dim = 0, window = -1, activation = kSilu;
  bool gated = true;
  double scale = 1.0;
  Norm norms[kNormSlots];
  Linear linears[kLinearSlots];
};

inline float to_f(bf16 v) { return static_cast<float>(v); }

inline Vec load_bf16(const bf16* p) {  // Vec::size() values
  Vec out;
  at::vec::load_to_float<bf16>(p, out);
  return out;
}

#if defined(__AVX512BF16__)
inline __m512 load16(const bf16* p) {  // 16 bf16 -> float
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
      reinterpret_cast<const __m256i*>(p))), 16));
}

inline void store16(__m512 v, bf16* p) {  // rounded to nearest even
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}

inline __m512 round16(__m512 v) {  // to the nearest bf16, as float
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}
#endif

inline void store_bf16(const Vec& v, bf16* p) {  // rounded to nearest even, as c10::BFloat16
#if defined(__AVX512BF16__)
  store16(__m512(v), p);
#else
  alignas(64) float tmp[Vec::size()];
  v.store(tmp);
  for (int i = 0; i < Vec::size(); ++i) p[i] = bf16(tmp[i]);
#endif
}

// out[i] = bf16(a[i] + b[i]), rows of n
void add_rows(const bf16* a, const bf16* b, bf16* out, int64_t count) {
  int64_t i = 0;
  for (; i + Vec::size() <= count; i += Vec::size()) store_bf16(load_bf16(a + i) + load_bf16(b + i), out + i);
  for (; i < count; ++i) out[i] = bf16(to_f(a[i]) + to_f(b[i]));
}

// One row of n values (stride 1) normalized into out; w (and b) float32.
void norm_row(int64_t mode, const float* w, const float* b, double eps, const bf16* x, bf16* out, int64_t n,
              std::vector<float>& buf) {
#if defined(__AVX512BF16__)
  if (mode != kLayerNorm && n % 16 == 0) {  // the rows of every model in practice: vectorized
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
      const __m512 v = load16(x + i);
      acc = _mm512_fmadd_ps(v, v, acc);
    }
    const float inv = 1.f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(n) + static_cast<float>(eps));
    const __m512 vinv = _mm512_set1_ps(inv), one = _mm512_set1_ps(1.f);
    for (int64_t i = 0; i < n; i += 16) {
      const __m512 normed = _mm512_mul_ps(load16(x + i), vinv);
      const __m512 wv = _mm512_loadu_ps(w + i);
      store16(mode == kRmsGemma ? _mm512_mul_ps(normed, _mm512_add_ps(one, wv)) : _mm512_mul_ps(wv, round16(normed)),
              out + i);
    }
    return;
  }
#endif
  buf.resize(n);
  float* xf = buf.data();
  for (int64_t i = 0; i < n; ++i) xf[i] = to_f(x[i]);
  if (mode == kLayerNorm) {
    float mean = 0.f;
    for (int64_t i = 0; i < n; ++i) mean += xf[i];
    mean /= static_cast<float>(n);
    float var = 0.f;
    for (int64_t i = 0; i < n; ++i) var += (xf[i] - mean) * (xf[i] - mean);
    const float inv = 1.f / std::sqrt(var / static_cast<float>(n) + static_cast<float>(eps));
    for (int64_t i = 0; i < n; ++i) out[i] = bf16((xf[i] - mean) * inv * w[i] + b[i]);
    return;
  }
  float ss = 0.f;
  for (int64_t i = 0; i < n; ++i) ss += xf[i] * xf[i];
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + static_cast<float>(eps));
  if (mode == kRmsGemma) {
    for (int64_t i = 0; i < n; ++i) out[i] = bf16(xf[i] * inv * (1.f + w[i]));
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = bf16(w[i] * to_f(bf16(xf[i] * inv)));
  }
}

void norm_row(const Norm& norm, const bf16* x, bf16* out, int64_t n, std::vector<float>& buf) {
  norm_row(norm.mode, norm.weight.data_ptr<float>(), norm.bias.defined() ? norm.bias.data_ptr<float>() : nullptr,
           norm.eps, x, out, n, buf);
}

// x [T, n] (contiguous rows) -> normalized [T, n]
at::Tensor norm_rows(const Norm& norm, const at::Tensor& x) {
  at::Tensor out = at::empty_like(x);
  const int64_t rows = x.size(0), n = x.size(1);
  const bf16* xp = x.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  std::vector<float> buf;
  for (int64_t t = 0; t < rows; ++t) norm_row(norm, xp + t * n, op + t * n, n, buf);
  return out;
}

// Heads of a [T, total] projection output, columns [col, col + heads * D), normalized per
// head (if `norm` is present) and rotated -> contiguous [T, heads, D].
at::Tensor heads_out(const at::Tensor& qkv, int64_t col, int64_t heads, int64_t D, const Norm& norm,
                     const at::Tensor* cos, const at::Tensor* sin) {
  const int64_t T = qkv.size(0), ld = qkv.size(1);
  at::Tensor out = at::empty({T, heads, D}, qkv.options());
  const bf16* src = qkv.data_ptr<bf16>();
  bf16* dst = out.data_ptr<bf16>();
  std::vector<float> buf;
  std::vector<bf16> row(D);
  const int64_t rot = cos != nullptr ? cos->size(-1) : 0, half = rot / 2;
  for (int64_t t = 0; t < T; ++t) {
    const bf16* c = rot ? cos->data_ptr<bf16>() + t * cos->stride(0) : nullptr;
    const bf16* s = rot ? sin->data_ptr<bf16>() + t * sin->stride(0) : nullptr;
    for (int64_t h = 0; h < heads; ++h) {
      const bf16* x = src + t * ld + col + h * D;
      bf16* o = dst + (t * heads + h) * D;
      if (norm.present) {
        norm_row(norm, x, row.data(), D, buf);
        x = row.data();
      }
      int64_t done = 0;
#if defined(__AVX512BF16__)
      if (half % 16 == 0) {  // rotate-half, 16 frequencies at a time
        const __m512 sign = _mm512_set1_ps(-0.f);
        for (int64_t d = 0; d < half; d += 16) {
          const __m512 x1 = load16(x + d), x2 = load16(x + d + half);
          store16(_mm512_add_ps(round16(_mm512_mul_ps(x1, load16(c + d))),
                                round16(_mm512_mul_ps(_mm512_xor_ps(x2, sign), load16(s + d)))), o + d);
          store16(_mm512_add_ps(round16(_mm512_mul_ps(x2, load16(c + d + half))),
                                round16(_mm512_mul_ps(x1, load16(s + d + half)))), o + d + half);
        }
        done = rot;
      }
#endif
      for (int64_t d = done; d < rot; ++d) {
        const float r = d < half ? -to_f(x[d + half]) : to_f(x[d - half]);
        o[d] = bf16(to_f(bf16(to_f(x[d]) * to_f(c[d]))) + to_f(bf16(r * to_f(s[d]))));
      }
      for (int64_t d = rot; d < D; ++d) o[d] = x[d];
    }
  }
  return out;
}

inline Vec activate(const Vec& x, int64_t activation) {
  if (activation == kSilu) return x / (Vec(1.f) + x.neg().exp());
  if (activation == kGeluTanh) {
    const Vec beta(static_cast<float>(M_SQRT2 * M_2_SQRTPI * 0.5)), kappa(0.044715f);
    const Vec inner = beta * (x + kappa * x * x * x);
    return Vec(0.5f) * x * (Vec(1.f) + inner.tanh());
  }
  return x * Vec(0.5f) * (Vec(1.f) + (x * Vec(static_cast<float>(M_SQRT1_2))).erf());
}

inline float activate(float x, int64_t activation) {
  if (activation == kSilu) return x / (1.f + std::exp(-x));
  if (activation == kGeluTanh) {
    const float beta = static_cast<float>(M_SQRT2 * M_2_SQRTPI * 0.5);
    return 0.5f * x * (1.f + std::tanh(beta * (x + 0.044715f * x * x * x)));
  }
  return x * 0.5f * (1.f + std::erf(x * static_cast<float>(M_SQRT1_2)));
}

// bf16(act(g)) for n values, into out (vectorized as ATen's activation kernels)
void act_row(const bf16* g, bf16* out, int64_t n, int64_t activation) {
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) store_bf16(activate(load_bf16(g + i), activation), out + i);
  for (; i < n; ++i) out[i] = bf16(activate(to_f(g[i]), activation));
}

// [T, 2I] gate | up -> [T, I] bf16(bf16(act(gate)) * up); [T, I] -> bf16(act(x)) when not gated
at::Tensor mlp_hidden(const at::Tensor& h, int64_t activation, bool gated) {
  const int64_t T = h.size(0), width = gated ? h.size(1) / 2 : h.size(1);
  at::Tensor out = at::empty({T, width}, h.options());
  const bf16* src = h.data_ptr<bf16>();
  bf16* dst = out.data_ptr<bf16>();
  const int64_t ld = h.size(1);
  at::parallel_for(0, T, std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      bf16* o = dst + t * width;
      act_row(src + t * ld, o, width, activation);
      if (!gated) continue;
      const bf16* up = src + t * ld + width;
      int64_t i = 0;
      for (; i + Vec::size() <= width; i += Vec::size()) store_bf16(load_bf16(o + i) * load_bf16(up + i), o + i);
      for (; i < width; ++i) o[i] = bf16(to_f(o[i]) * to_f(up[i]));
    }
  });
  return out;
}

at::Tensor float_vector(const at::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.dim() == 1 && t.numel() == n, "Decoder: ", what, " must be a vector of ", n);
  return t.to(at::kFloat).contiguous();
}

}  // namespace

// The eager path's norm (surge/layers/norm.py, bf16 on this CPU): the same rows as the stack's,
// so eager and native steps agree bit for bit. x [..., n] bf16; weight (and bias) [n], any
// float dtype; mode: 0 Llama RMSNorm, 1 Gemma's (1 + w), 2 LayerNorm.
at::Tensor norm_op(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, double eps,
                   int64_t mode) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() >= 1, "norm: x must be bf16");
  TORCH_CHECK(mode >= kRmsLlama && mode <= kLayerNorm, "norm: unknown mode ", mode);
  TORCH_CHECK((mode == kLayerNorm) == bias.has_value(), "norm: a bias exactly for LayerNorm");
  Norm norm;
  norm.mode = mode, norm.eps = eps;
  const int64_t n = x.size(-1);
  norm.weight = float_vector(weight, n, "norm's weight");
  if (bias.has_value()) norm.bias = float_vector(*bias, n, "norm's bias");
  const at::Tensor rows = x.contiguous().view({-1, n});
  return norm_rows(norm, rows).view(x.sizes());
}

// The stack: layers added in order, each slot filled once, then forward per decode step.
struct Decoder : torch::CustomClassHolder {
  std::vector<Layer> layers;
  Norm final_norm;
  int64_t hidden = 0;

  explicit Decoder(int64_t hidden_size) : hidden(hidden_size) {}

  // ints: rope index (-1 none), heads, kv heads, head dim, window (-1 none), activation, gated
  void add_layer(std::vector<int64_t> ints, double scale) {
    TORCH_CHECK(ints.size() == 7, "Decoder.add_layer: 7 integers");
    Layer layer;
    layer.rope = ints[0], layer.heads = ints[1], layer.kv_heads = ints[2], layer.head_dim = ints[3];
    layer.window = ints[4], layer.activation = ints[5], layer.gated = ints[6] != 0;
    layer.scale = scale;
    TORCH_CHECK(layer.heads > 0 && layer.kv_heads > 0 && layer.heads % layer.kv_heads == 0 && layer.head_dim > 0,
                "Decoder.add_layer: bad head counts");
    TORCH_CHECK(layer.activation >= kSilu && layer.activation <= kGelu, "Decoder.add_layer: unknown activation");
    layers.push_back(std::move(layer));
  }

  Layer& layer_at(int64_t index) {
    TORCH_CHECK(index >= 0 && index < static_cast<int64_t>(layers.size()), "Decoder: no layer ", index);
    return layers[index];
  }

  // layer -1: the final norm
  void set_norm(int64_t layer, int64_t slot, int64_t mode, at::Tensor weight, c10::optional<at::Tensor> bias,
                double eps) {
    TORCH_CHECK(mode >= kRmsLlama && mode <= kLayerNorm, "Decoder.set_norm: unknown mode ", mode);
    Norm norm;
    norm.present = true, norm.mode = mode, norm.eps = eps;
    int64_t n = hidden;
    if (layer >= 0) {
      TORCH_CHECK(slot >= 0 && slot < kNormSlots, "Decoder.set_norm: unknown slot ", slot);
      if (slot == kQNorm || slot == kKNorm) n = layer_at(layer).head_dim;
    }
    norm.weight = float_vector(weight, n, "a norm's weight");
    TORCH_CHECK((mode == kLayerNorm) == bias.has_value(), "Decoder.set_norm: a bias exactly for LayerNorm");
    if (bias.has_value()) norm.bias = float_vector(*bias, n, "a norm's bias");
    (layer < 0 ? final_norm : layer_at(layer).norms[slot]) = std::move(norm);
  }

  // type 0: tensors [w] (linear_bf16's layout); type 1: [q, qh, s] and ints [kind, group size,
  // planes, tile_min_rows] (linear_quant's). Several parts of one slot run as one projection.
  void add_linear_part(int64_t layer, int64_t slot, int64_t type, std::vector<at::Tensor> tensors,
                       std::vector<int64_t> ints, c10::optional<at::Tensor> bias, int64_t out) {
    TORCH_CHECK(slot >= 0 && slot < kLinearSlots, "Decoder.add_linear_part: unknown slot ", slot);
    LinearPart part;
    part.type = type, part.bias = bias, part.out = out;
    if (type == kDense) {
      TORCH_CHECK(tensors.size() == 1 && ints.empty(), "Decoder.add_linear_part: a dense part is [w]");
      part.w = tensors[0];
    } else {
      TORCH_CHECK(type == kQuant && tensors.size() == 3 && ints.size() == 4,
                  "Decoder.add_linear_part: a quantized part is [q, qh, s] with 4 integers");
      part.q = tensors[0], part.qh = tensors[1], part.s = tensors[2];
      part.kind = ints[0], part.group_size = ints[1], part.planes = ints[2], part.tile_min_rows = ints[3];
    }
    Linear& linear = layer_at(layer).linears[slot];
    linear.parts.push_back(std::move(part));
    linear.out += out;
  }

  // Every layer has what its kind needs, with consistent widths.
  void validate() {
    TORCH_CHECK(final_norm.present, "Decoder: no final norm");
    for (size_t i = 0; i < layers.size(); ++i) {
      const Layer& l = layers[i];
      const int64_t q = l.heads * l.head_dim, kv = l.kv_heads * l.head_dim;
      TORCH_CHECK(l.norms[kAttnNorm].present && l.norms[kMlpNorm].present, "Decoder: layer ", i, " lacks a norm");
      TORCH_CHECK(l.norms[kQNorm].present == l.norms[kKNorm].present, "Decoder: layer ", i, " has one q/k norm");
      TORCH_CHECK(l.linears[kQkv].out == q + 2 * kv, "Decoder: layer ", i, " qkv gives ", l.linears[kQkv].out,
                  " columns, not ", q + 2 * kv);
      TORCH_CHECK(l.linears[kOut].out == hidden && l.linears[kDown].out == hidden,
                  "Decoder: layer ", i, " output projections must give ", hidden);
      TORCH_CHECK(l.linears[kUp].out > 0 && (!l.gated || l.linears[kUp].out % 2 == 0),
                  "Decoder: layer ", i, " has no MLP input projection");
    }
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers.size()); }

  // x [T, hidden] bf16 (the embedded tokens); cos/sin: per RoPE, [T, rot] bf16 rows (any row
  // stride); kv_caches: one per layer; the step's slots, block tables, lengths as
  // paged_decode_step takes them. Returns the final norm's output [T, hidden].
  at::Tensor forward(at::Tensor x, std::vector<at::Tensor> cos, std::vector<at::Tensor> sin,
                     std::vector<at::Tensor> kv_caches, at::Tensor slot_mapping, at::Tensor block_tables,
                     at::Tensor seq_lens) {
    TORCH_CHECK(x.dim() == 2 && x.size(1) == hidden && x.scalar_type() == at::kBFloat16,
                "Decoder.forward: x must be bf16 [T, ", hidden, "]");
    TORCH_CHECK(kv_caches.size() == layers.size(), "Decoder.forward: one KV cache per layer");
    TORCH_CHECK(cos.size() == sin.size(), "Decoder.forward: as many sin tables as cos");
    for (size_t r = 0; r < cos.size(); ++r)
      TORCH_CHECK(cos[r].dim() == 2 && cos[r].size(0) == x.size(0) && cos[r].scalar_type() == at::kBFloat16 &&
                      cos[r].stride(1) == 1 && sin[r].sizes() == cos[r].sizes() && sin[r].stride(1) == 1 &&
                      sin[r].scalar_type() == at::kBFloat16,
                  "Decoder.forward: cos/sin must be bf16 [T, rot] with unit stride");
    x = x.contiguous();
    at::Tensor residual;
    const int64_t T = x.size(0);
    for (size_t i = 0; i < layers.size(); ++i) {
      const Layer& l = layers[i];
      TORCH_CHECK(l.rope < static_cast<int64_t>(cos.size()), "Decoder.forward: no RoPE table ", l.rope);
      if (residual.defined()) {
        add_rows(x.data_ptr<bf16>(), residual.data_ptr<bf16>(), residual.data_ptr<bf16>(), x.numel());
      } else {
        residual = x.clone();
      }
      at::Tensor h = norm_rows(l.norms[kAttnNorm], residual);
      // attention
      const at::Tensor qkv = l.linears[kQkv].run(h);
      const int64_t D = l.head_dim, qw = l.heads * D, kvw = l.kv_heads * D;
      const at::Tensor* c = l.rope >= 0 ? &cos[l.rope] : nullptr;
      const at::Tensor* s = l.rope >= 0 ? &sin[l.rope] : nullptr;
      TORCH_CHECK(c == nullptr || (c->size(1) <= D && c->size(1) % 2 == 0),
                  "Decoder.forward: RoPE over ", c == nullptr ? 0 : c->size(1), " of a head of ", D);
      at::Tensor q = heads_out(qkv, 0, l.heads, D, l.norms[kQNorm], c, s);
      at::Tensor k = heads_out(qkv, qw, l.kv_heads, D, l.norms[kKNorm], c, s);
      at::Tensor v = qkv.narrow(1, qw + kvw, kvw).view({T, l.kv_heads, D});
      at::Tensor attn = surge_kernels::paged_decode_step(q, k, v, kv_caches[i], slot_mapping, block_tables,
                                                         seq_lens, l.scale, l.window);
      h = l.linears[kOut].run(attn.view({T, qw}));
      if (l.norms[kAttnOutNorm].present) h = norm_rows(l.norms[kAttnOutNorm], h);
      add_rows(h.data_ptr<bf16>(), residual.data_ptr<bf16>(), residual.data_ptr<bf16>(), h.numel());
      // MLP
      h = norm_rows(l.norms[kMlpNorm], residual);
      const at::Tensor up = l.linears[kUp].run(h);
      const at::Tensor act = mlp_hidden(up, l.activation, l.gated);
      h = l.linears[kDown].run(act);
      if (l.norms[kMlpOutNorm].present) h = norm_rows(l.norms[kMlpOutNorm], h);
      x = h;
    }
    if (residual.defined()) add_rows(x.data_ptr<bf16>(), residual.data_ptr<bf16>(), residual.data_ptr<bf16>(), x.numel());
    else residual = x;
    return norm_rows(final_norm, residual);
  }
};

TORCH_LIBRARY_FRAGMENT(surge_native, m) {
  m.def("norm(Tensor x, Tensor weight, Tensor? bias, float eps, int mode) -> Tensor");
  m.class_<Decoder>("Decoder")
      .def(torch::init<int64_t>())
      .def("add_layer", &Decoder::add_layer)
      .def("set_norm", &Decoder::set_norm)
      .def("add_linear_part", &Decoder::add_linear_part)
      .def("validate", &Decoder::validate)
      .def("num_layers", &Decoder::num_layers)
      .def("forward", &Decoder::forward);
}

TORCH_LIBRARY_IMPL(surge_native, CPU, m) {
  m.impl("norm", &norm_op);
}
