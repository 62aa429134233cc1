// The fastmae_cuda ops, implemented in gather_kernels.cu and loss_kernels.cu, registered in mae_ops.cpp.
// Each runs on CUDA tensors (the fast path) and on CPU tensors (the same functors in a host loop, for tests).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fastmae {

// noise [N, L] -> ids_keep [N, K] int64, ids_restore [N, L] int64, mask [N, L] in noise's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> random_masking(const at::Tensor& noise, double mask_ratio);

// imgs [N, C, H, W], ids_keep [N, K] -> [N, K, p*p*C] in the (p, q, c) order.
at::Tensor gather_patches(const at::Tensor& imgs, const at::Tensor& ids_keep, int64_t patch_size);
// grad [N, K, p*p*C] -> d imgs [N, C, H, W]: kept patches get their row, the others zeros.
at::Tensor gather_patches_backward(const at::Tensor& grad, const at::Tensor& ids_keep, int64_t patch_size,
                                   int64_t channels, int64_t height, int64_t width);

// x [N, L, D], ids_keep [N, K], pos [1, L, D] -> [N, K, D] in promote(x, pos).
at::Tensor gather_tokens(const at::Tensor& x, const at::Tensor& ids_keep, const std::optional<at::Tensor>& pos);
// grad [N, K, D] -> [N, length, D] in `dtype`: each kept row's gradient, zeros on the others.
at::Tensor gather_tokens_backward(const at::Tensor& grad, const at::Tensor& ids_keep, int64_t length,
                                  at::ScalarType dtype);

// x_vis [N, K, D], mask_token [1, 1, D], ids_restore [N, L], pos [1, L, D] -> [N, L, D].
at::Tensor insert_mask_tokens(const at::Tensor& x_vis, const at::Tensor& mask_token, const at::Tensor& ids_restore,
                              const std::optional<at::Tensor>& pos);
// grad [N, L, D] -> (d x_vis [N, K, D] in x_dtype, d mask_token [1, 1, D] in token_dtype).
std::tuple<at::Tensor, at::Tensor> insert_mask_tokens_backward(const at::Tensor& grad, const at::Tensor& ids_restore,
                                                               int64_t keep, at::ScalarType x_dtype,
                                                               at::ScalarType mid_dtype, at::ScalarType token_dtype);

// pred [N, L, P], imgs [N, C, H, W], mask [N, L] -> fp32 scalar.
at::Tensor masked_mse_loss(const at::Tensor& pred, const at::Tensor& imgs, const at::Tensor& mask, int64_t patch_size,
                           bool norm_pix, double eps);
// grad [] -> d pred [N, L, P] in pred's dtype.
at::Tensor masked_mse_loss_backward(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& imgs,
                                    const at::Tensor& mask, int64_t patch_size, bool norm_pix, double eps);

}  // namespace fastmae
