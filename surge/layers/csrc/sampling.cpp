// Greedy sampling's argmax over each row of float32 logits [N, V]: the first index of the
// largest value, a NaN counting as the largest (torch.argmax's rule, kept exactly). PyTorch's
// CPU argmax walks a row one element at a time (1.3 ms for 32 x 49152 logits, where amax takes
// 74 us); this one compares 16 lanes at a time, keeping each lane's first maximum and its
// index, and splits a row between threads when there are fewer rows than threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

struct Best {
  float value;
  int64_t index;  // -1: nothing seen
};

// The winner of two candidates, `a` from indices before `b`'s.
inline Best first_of(Best a, Best b) {
  if (a.index < 0) return b;
  if (b.index < 0 || std::isnan(a.value)) return a;
  if (std::isnan(b.value)) return b;
  return b.value > a.value ? b : a;
}

// argmax of x[begin, end) as a (value, index) pair.
Best scan(const float* x, int64_t begin, int64_t end) {
  Best best{0.f, -1};
  int64_t i = begin;
#if defined(__AVX512F__)
  if (end - begin >= 16) {
    __m512 bv = _mm512_loadu_ps(x + i);
    __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(i)),
                                   _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    __m512i bi = idx;
    __mmask16 nan = _mm512_cmp_ps_mask(bv, bv, _CMP_UNORD_Q);
    const __m512i step = _mm512_set1_epi32(16);
    for (i += 16; i + 16 <= end; i += 16) {
      idx = _mm512_add_epi32(idx, step);
      const __m512 v = _mm512_loadu_ps(x + i);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      const __mmask16 gt = _mm512_cmp_ps_mask(v, bv, _CMP_GT_OQ);  // strict: a lane keeps its first maximum
      bv = _mm512_mask_mov_ps(bv, gt, v);
      bi = _mm512_mask_mov_epi32(bi, gt, idx);
    }
    if (nan) {  // the first NaN wins
      for (int64_t j = begin; j < i; ++j)
        if (std::isnan(x[j])) return {x[j], j};
    }
    alignas(64) float values[16];
    alignas(64) int32_t indices[16];
    _mm512_store_ps(values, bv);
    _mm512_store_si512(indices, bi);
    for (int l = 0; l < 16; ++l) {
      if (best.index < 0 || values[l] > best.value || (values[l] == best.value && indices[l] < best.index))
        best = {values[l], indices[l]};
    }
  }
#endif
  for (; i < end; ++i) {
    if (std::isnan(x[i])) return {x[i], i};
    if (best.index < 0 || x[i] > best.value) best = {x[i], i};
  }
  return best;
}

at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.stride(1) == 1,
              "argmax_rows: logits must be a float32 [N, V] tensor with unit stride along V");
  TORCH_CHECK(logits.size(1) > 0, "argmax_rows: rows must not be empty");
  TORCH_CHECK(logits.size(1) <= INT32_MAX, "argmax_rows: rows longer than 2^31 - 1");
  const int64_t rows = logits.size(0), n = logits.size(1), ld = logits.stride(0);
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  if (rows == 0) return out;
  const float* x = logits.data_ptr<float>();
  // Pieces per row: one when every thread has a row, else enough for the threads (a piece at
  // least 4096 values, below which the split costs more than it saves).
  const int64_t threads = at::get_num_threads();
  const int64_t pieces = rows >= threads ? 1 : std::clamp<int64_t>((threads + rows - 1) / rows, 1, std::max<int64_t>(1, n / 4096));
  const int64_t span = (n + pieces - 1) / pieces;
  std::vector<Best> found(rows * pieces);
  at::parallel_for(0, rows * pieces, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t lo = (item % pieces) * span, hi = std::min(n, lo + span);
      found[item] = lo < hi ? scan(x + (item / pieces) * ld, lo, hi) : Best{0.f, -1};
    }
  });
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    Best best = found[r * pieces];
    for (int64_t p = 1; p < pieces; ++p) best = first_of(best, found[r * pieces + p]);
    op[r] = best.index;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(surge_native, m) {
  m.def("argmax_rows(Tensor logits) -> Tensor");
}

TORCH_LIBRARY_IMPL(surge_native, CPU, m) {
  m.impl("argmax_rows", &argmax_rows);
}
