// The kernels other translation units call directly (decoder.cpp's decode step), without the
// dispatcher. Each is also a torch op (surge_native::...), registered in its own file.
#pragma once

#include <ATen/ATen.h>

namespace surge_kernels {

// linear.cpp
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias);
at::Tensor linear_quant(const at::Tensor& x, const at::Tensor& q, const at::Tensor& qh, const at::Tensor& s,
                        int64_t kind, int64_t group_size, const c10::optional<at::Tensor>& bias, int64_t planes,
                        int64_t tile_min_rows);

// paged_attention.cpp
at::Tensor paged_decode_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& kv_cache,
                             const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                             const at::Tensor& seq_lens, double scale, int64_t window);

}  // namespace surge_kernels
