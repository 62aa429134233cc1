// Registers the fastmae_cuda ops with the dispatcher (TORCH_LIBRARY), so they are torch.ops.fastmae_cuda.*
// and torch.compile sees them as single opaque nodes. Fake (meta) kernels and autograd are registered
// from Python in fastmae_kernels/cuda_ops.py. The same implementation serves CUDA tensors (kernels) and
// CPU tensors (the kernels' functors in a host loop, for tests without a GPU).
#include <Python.h>
#include <torch/library.h>

#include "mae_ops.h"

// `import fastmae_kernels._C` loads this library, which runs the registrations below; the module itself
// is empty (no pybind11: the ops are reached through torch.ops).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fastmae CUDA ops (torch.ops.fastmae_cuda)",
                                          -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastmae_cuda, m) {
  m.def("random_masking(Tensor noise, float mask_ratio) -> (Tensor, Tensor, Tensor)");
  m.def("gather_patches(Tensor imgs, Tensor ids_keep, int patch_size) -> Tensor");
  m.def(
      "gather_patches_backward(Tensor grad, Tensor ids_keep, int patch_size, int channels, int height, int width) "
      "-> Tensor");
  m.def("gather_tokens(Tensor x, Tensor ids_keep, Tensor? pos_embed) -> Tensor");
  m.def("gather_tokens_backward(Tensor grad, Tensor ids_keep, int length, ScalarType dtype) -> Tensor");
  m.def("insert_mask_tokens(Tensor x_vis, Tensor mask_token, Tensor ids_restore, Tensor? pos_embed) -> Tensor");
  m.def(
      "insert_mask_tokens_backward(Tensor grad, Tensor ids_restore, int keep, ScalarType x_dtype, "
      "ScalarType mid_dtype, ScalarType token_dtype) -> (Tensor, Tensor)");
  m.def(
      "masked_mse_loss(Tensor pred, Tensor imgs, Tensor mask, int patch_size, bool norm_pix, float eps) -> Tensor");
  m.def(
      "masked_mse_loss_backward(Tensor grad, Tensor pred, Tensor imgs, Tensor mask, int patch_size, bool norm_pix, "
      "float eps) -> Tensor");
}

#define FASTMAE_IMPLS(m)                                                     \
  m.impl("random_masking", &fastmae::random_masking);                       \
  m.impl("gather_patches", &fastmae::gather_patches);                       \
  m.impl("gather_patches_backward", &fastmae::gather_patches_backward);     \
  m.impl("gather_tokens", &fastmae::gather_tokens);                         \
  m.impl("gather_tokens_backward", &fastmae::gather_tokens_backward);       \
  m.impl("insert_mask_tokens", &fastmae::insert_mask_tokens);               \
  m.impl("insert_mask_tokens_backward", &fastmae::insert_mask_tokens_backward); \
  m.impl("masked_mse_loss", &fastmae::masked_mse_loss);                     \
  m.impl("masked_mse_loss_backward", &fastmae::masked_mse_loss_backward)

TORCH_LIBRARY_IMPL(fastmae_cuda, CUDA, m) { FASTMAE_IMPLS(m); }

TORCH_LIBRARY_IMPL(fastmae_cuda, CPU, m) { FASTMAE_IMPLS(m); }
