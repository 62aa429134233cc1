// masked_mse_loss: the official norm-pix forward_loss with the target patchified on the fly.
// One warp per patch row: removed rows (mask != 0) read their image patch (three passes over the same
// p*p*C values, the second and third from L1/L2: mean, UNBIASED variance as torch.var, then the squared
// error against pred), visible rows read nothing. All arithmetic is fp32 whatever the input dtypes.
// Forward: per-block partial sums (loss, mask) reduced in a fixed order, then one block divides: no
// float atomics, the same bits on every run. Backward recomputes the target and writes d pred once.
#include <ATen/DeviceGuard.h>

#include "common.cuh"
#include "mae_ops.h"

namespace fastmae {
namespace {

constexpr int kWarps = kThreads / 32;
constexpr int64_t kLossBlocks = 1024;  // forward partials: fixed by the shape, not the card (determinism)

template <typename Tp, typename Ti, int VEC, bool BACKWARD>
struct MseRow {
  const Tp* pred;      // [N, L, P] contiguous
  const Ti* img;       // [N, C, H, W] contiguous
  const float* mask;   // [N, L] fp32 contiguous
  Tp* grad_pred;       // [N, L, P] (backward)
  const float* scale;  // [1] d loss * 2 / (P * sum(mask)) (backward), a device scalar: no host sync
  int64_t length, width, vecs, channels, p, height, img_w, grid_w;
  bool norm_pix;
  float eps;

  // Target values of columns e0 .. e0+VEC-1 of the patch at `base`; column e = (i * p + j) * C + c.
  FM_HD void target(const Ti* base, int64_t e0, float* t) const {
    int64_t c = e0 % channels;
    const int64_t q = e0 / channels;
    int64_t j = q % p;
    int64_t i = q / p;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      t[v] = to_float(base[(c * height + i) * img_w + j]);
      if (++c == channels) {
        c = 0;
        if (++j == p) {
          j = 0;
          ++i;
        }
      }
    }
  }

  // Row `row` = n * L + l, computed by `lane` of `lanes` (32 on the GPU, 1 on the host). Forward:
  // returns mask * mean squared error of the row (on every lane). Backward: writes d pred of the row.
  FM_HD float operator()(int64_t row, int lane, int lanes) const {
    const float m = mask[row];
    if (m == 0.0f) {  // a visible patch: no loss, zero gradient, nothing read
      if (BACKWARD) {
        float zero[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) zero[v] = 0.0f;
        for (int64_t g = lane; g < vecs; g += lanes) store_floats<VEC>(grad_pred + row * width + g * VEC, zero);
      }
      return 0.0f;
    }
    const int64_t n = row / length;
    const int64_t l = row - n * length;
    const int64_t hi = l / grid_w;
    const Ti* base = img + (n * channels * height + hi * p) * img_w + (l - hi * grid_w) * p;
    float t[VEC];
    float mean = 0.0f, denom = 1.0f;
    if (norm_pix) {
      float sum = 0.0f;
      for (int64_t g = lane; g < vecs; g += lanes) {
        target(base, g * VEC, t);
#pragma unroll
        for (int v = 0; v < VEC; ++v) sum += t[v];
      }
      mean = warp_sum(sum) / static_cast<float>(width);
      float sq = 0.0f;  // two-pass variance: no cancellation on flat patches
      for (int64_t g = lane; g < vecs; g += lanes) {
        target(base, g * VEC, t);
#pragma unroll
        for (int v = 0; v < VEC; ++v) sq += (t[v] - mean) * (t[v] - mean);
      }
      // (var + eps) ** 0.5 then a true division, as the reference (no rsqrt, no fast math)
      denom = sqrtf(warp_sum(sq) / static_cast<float>(width - 1) + eps);
    }
    const float coef = BACKWARD ? m * scale[0] : 0.0f;
    float acc = 0.0f;
    for (int64_t g = lane; g < vecs; g += lanes) {
      const int64_t e0 = g * VEC;
      float pv[VEC];
      target(base, e0, t);
      load_floats<VEC>(pred + row * width + e0, pv);
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const float diff = pv[v] - (norm_pix ? (t[v] - mean) / denom : t[v]);
        if (BACKWARD) {
          pv[v] = diff * coef;
        } else {
          acc += diff * diff;
        }
      }
      if (BACKWARD) store_floats<VEC>(grad_pred + row * width + e0, pv);
    }
    if (BACKWARD) return 0.0f;
    return warp_sum(acc) / static_cast<float>(width) * m;
  }
};

// Each warp takes rows warp, warp + all_warps, ...; block b writes (sum of its rows' losses, sum of
// their mask values) to partial[b], warps added in order.
template <typename Row>
__global__ void __launch_bounds__(kThreads) mse_forward_kernel(Row row_fn, int64_t rows, float* partial) {
  __shared__ float stage[2][kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t all_warps = static_cast<int64_t>(gridDim.x) * kWarps;
  float loss = 0.0f, msum = 0.0f;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + warp; r < rows; r += all_warps) {
    loss += row_fn(r, lane, 32);
    msum += row_fn.mask[r];
  }
  if (lane == 0) {
    stage[0][warp] = loss;
    stage[1][warp] = msum;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float a = 0.0f, b = 0.0f;
    for (int w = 0; w < kWarps; ++w) {
      a += stage[0][w];
      b += stage[1][w];
    }
    partial[2 * blockIdx.x] = a;
    partial[2 * blockIdx.x + 1] = b;
  }
}

// One block: loss = sum(partial losses) / sum(partial masks), both summed in a fixed order.
__global__ void __launch_bounds__(kThreads) mse_finish_kernel(const float* partial, int64_t blocks, float* out) {
  __shared__ float stage[2][kThreads];
  float a = 0.0f, b = 0.0f;
  for (int64_t i = threadIdx.x; i < blocks; i += kThreads) {
    a += partial[2 * i];
    b += partial[2 * i + 1];
  }
  stage[0][threadIdx.x] = a;
  stage[1][threadIdx.x] = b;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {  // a fixed tree: deterministic
    if (threadIdx.x < stride) {
      stage[0][threadIdx.x] += stage[0][threadIdx.x + stride];
      stage[1][threadIdx.x] += stage[1][threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = stage[0][0] / stage[1][0];
}

template <typename Row>
__global__ void __launch_bounds__(kThreads) mse_backward_kernel(Row row_fn, int64_t rows) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t all_warps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + warp; r < rows; r += all_warps) row_fn(r, lane, 32);
}

struct Geometry {
  int64_t n, length, width, channels, p, height, img_w, grid_w;
};

Geometry check_inputs(const at::Tensor& pred, const at::Tensor& imgs, const at::Tensor& mask, int64_t p,
                      const char* op) {
  check_device(pred, op);
  TORCH_CHECK(imgs.dim() == 4, "fastmae_cuda::", op, ": imgs must be [N, C, H, W], got ", imgs.sizes());
  const int64_t n = imgs.size(0), channels = imgs.size(1), height = imgs.size(2), img_w = imgs.size(3);
  TORCH_CHECK(p > 0 && height % p == 0 && img_w % p == 0, "fastmae_cuda::", op, ": image ", height, "x", img_w,
              " is not divisible by patch_size ", p);
  const int64_t length = (height / p) * (img_w / p), width = p * p * channels;
  TORCH_CHECK(pred.dim() == 3 && pred.size(0) == n && pred.size(1) == length && pred.size(2) == width,
              "fastmae_cuda::", op, ": pred must be [", n, ", ", length, ", ", width, "], got ", pred.sizes());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == n && mask.size(1) == length, "fastmae_cuda::", op,
              ": mask must be [", n, ", ", length, "], got ", mask.sizes());
  TORCH_CHECK(imgs.device() == pred.device() && mask.device() == pred.device(), "fastmae_cuda::", op,
              ": pred, imgs and mask must be on one device");
  return {n, length, width, channels, p, height, img_w, img_w / p};
}

// Calls f(MseRow<...>{...}) with the dtypes of pred and imgs and the widest pred access alignment allows.
template <bool BACKWARD, typename F>
void with_row(const at::Tensor& pred, const at::Tensor& imgs, const at::Tensor& mask_f, at::Tensor* grad_pred,
              const at::Tensor* scale, const Geometry& g, bool norm_pix, double eps, F&& f) {
  dispatch_float(pred.scalar_type(), "pred", [&](auto tp) {
    dispatch_float(imgs.scalar_type(), "imgs", [&](auto ti) {
      using Tp = decltype(tp);
      using Ti = decltype(ti);
      constexpr int V = 16 / sizeof(Tp);
      Tp* gp = grad_pred != nullptr ? grad_pred->data_ptr<Tp>() : nullptr;
      const float* sc = scale != nullptr ? scale->data_ptr<float>() : nullptr;
      const bool vec = g.width % V == 0 && aligned(pred.data_ptr(), 16) && (gp == nullptr || aligned(gp, 16));
      if (vec) {
        f(MseRow<Tp, Ti, V, BACKWARD>{pred.data_ptr<Tp>(), imgs.data_ptr<Ti>(), mask_f.data_ptr<float>(), gp, sc,
                                      g.length, g.width, g.width / V, g.channels, g.p, g.height, g.img_w, g.grid_w,
                                      norm_pix, static_cast<float>(eps)});
      } else {
        f(MseRow<Tp, Ti, 1, BACKWARD>{pred.data_ptr<Tp>(), imgs.data_ptr<Ti>(), mask_f.data_ptr<float>(), gp, sc,
                                      g.length, g.width, g.width, g.channels, g.p, g.height, g.img_w, g.grid_w,
                                      norm_pix, static_cast<float>(eps)});
      }
    });
  });
}

}  // namespace

at::Tensor masked_mse_loss(const at::Tensor& pred_in, const at::Tensor& imgs_in, const at::Tensor& mask_in,
                           int64_t patch_size, bool norm_pix, double eps) {
  const Geometry g = check_inputs(pred_in, imgs_in, mask_in, patch_size, "masked_mse_loss");
  const at::OptionalDeviceGuard guard(at::device_of(pred_in));
  const at::Tensor pred = pred_in.contiguous();
  const at::Tensor imgs = imgs_in.contiguous();
  const at::Tensor mask = mask_in.to(at::kFloat).contiguous();  // [N, L], exact for any float mask
  auto out = at::empty({}, pred.options().dtype(at::kFloat));
  const int64_t rows = g.n * g.length;
  if (rows == 0) return out.fill_(std::numeric_limits<float>::quiet_NaN());  // 0 / 0, as the reference
  with_row<false>(pred, imgs, mask, nullptr, nullptr, g, norm_pix, eps, [&](auto row_fn) {
    if (pred.is_cuda()) {
      const int64_t blocks = std::min<int64_t>((rows + kWarps - 1) / kWarps, kLossBlocks);
      auto partial = at::empty({blocks, 2}, out.options());
      auto stream = c10::cuda::getCurrentCUDAStream();
      mse_forward_kernel<<<blocks, kThreads, 0, stream>>>(row_fn, rows, partial.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      mse_finish_kernel<<<1, kThreads, 0, stream>>>(partial.data_ptr<float>(), blocks, out.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      std::vector<float> row_loss(rows);
      at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) row_loss[r] = row_fn(r, 0, 1);
      });
      float loss = 0.0f, msum = 0.0f;
      const float* m = mask.data_ptr<float>();
      for (int64_t r = 0; r < rows; ++r) {
        loss += row_loss[r];
        msum += m[r];
      }
      out.fill_(loss / msum);
    }
  });
  return out;
}

at::Tensor masked_mse_loss_backward(const at::Tensor& grad, const at::Tensor& pred_in, const at::Tensor& imgs_in,
                                    const at::Tensor& mask_in, int64_t patch_size, bool norm_pix, double eps) {
  const Geometry g = check_inputs(pred_in, imgs_in, mask_in, patch_size, "masked_mse_loss_backward");
  TORCH_CHECK(grad.numel() == 1 && grad.device() == pred_in.device(),
              "fastmae_cuda::masked_mse_loss_backward: grad must be a scalar on ", pred_in.device());
  const at::OptionalDeviceGuard guard(at::device_of(pred_in));
  const at::Tensor pred = pred_in.contiguous();
  const at::Tensor imgs = imgs_in.contiguous();
  const at::Tensor mask = mask_in.to(at::kFloat).contiguous();
  auto grad_pred = at::empty(pred.sizes(), pred.options());  // [N, L, P]
  const int64_t rows = g.n * g.length;
  if (grad_pred.numel() == 0) return grad_pred;
  // d loss / d pred = grad * mask * 2 (pred - target) / (P * sum(mask)), the scale kept on the device
  const at::Tensor scale = (grad.to(at::kFloat).reshape({1}) * 2.0 / (mask.sum() * static_cast<double>(g.width)));
  with_row<true>(pred, imgs, mask, &grad_pred, &scale, g, norm_pix, eps, [&](auto row_fn) {
    if (pred.is_cuda()) {
      const int64_t blocks = std::min<int64_t>((rows + kWarps - 1) / kWarps, kMaxBlocks);
      mse_backward_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(row_fn, rows);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) row_fn(r, 0, 1);
      });
    }
  });
  return grad_pred;
}

}  // namespace fastmae
