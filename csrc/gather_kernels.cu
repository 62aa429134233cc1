// Data-movement ops of MAE: random_masking's inverse permutation, patch gather/scatter, row select
// (gather_tokens and insert_mask_tokens forward, gather_tokens backward) and insert_mask_tokens backward.
// Every output element is written exactly once (no atomics), so every result is deterministic.
#include <ATen/DeviceGuard.h>

#include "common.cuh"
#include "mae_ops.h"

namespace fastmae {
namespace {

// ---------------------------------------------------------------------------------------------
// random_masking: from ids_shuffle (torch's argsort, so ties break as in the reference) write
// ids_keep, the inverse permutation ids_restore and the mask in one pass (replaces a second argsort
// and the ones/gather of the official code).
template <typename M>
struct InvertShuffle {
  const int64_t* shuffle;  // [N, L]
  int64_t* ids_keep;       // [N, K]
  int64_t* ids_restore;    // [N, L]
  M* mask;                 // [N, L]
  int64_t length, keep;

  FM_HD void operator()(int64_t i) const {  // i = n * L + rank
    const int64_t n = i / length;
    const int64_t rank = i - n * length;
    const int64_t src = shuffle[i];
    ids_restore[n * length + src] = rank;
    mask[n * length + src] = from_float<M>(rank >= keep ? 1.0f : 0.0f);
    if (rank < keep) ids_keep[n * keep + rank] = src;
  }
};

// ---------------------------------------------------------------------------------------------
// gather_patches forward: one index per VEC consecutive output elements of a kept patch row
// (16-byte stores); the image side is read element by element, each p-pixel run of a patch row lying
// in one or two 32-byte sectors, so no sector is fetched for nothing.
template <typename T, int VEC>
struct GatherPatches {
  const T* img;        // [N, C, H, W] contiguous
  const int64_t* ids;  // [N, K] contiguous
  T* out;              // [N, K, P], P = p*p*C
  int64_t keep, width, vecs, channels, p, height, img_w, grid_w;

  FM_HD void operator()(int64_t i) const {
    const int64_t row = i / vecs;  // n * K + k
    const int64_t e0 = (i - row * vecs) * VEC;
    const int64_t n = row / keep;
    const int64_t patch = ids[row];
    const int64_t hi = patch / grid_w;
    const int64_t wi = patch - hi * grid_w;
    const T* base = img + (n * channels * height + hi * p) * img_w + wi * p;  // the patch's top-left pixel
    // Column e of a patch row is (i, j, c) with e = (i * p + j) * C + c; step it with carries.
    int64_t c = e0 % channels;
    const int64_t q = e0 / channels;
    int64_t j = q % p;
    int64_t ii = q / p;
    Pack<T, VEC> pk;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      pk.v[v] = base[(c * height + ii) * img_w + j];
      if (++c == channels) {
        c = 0;
        if (++j == p) {
          j = 0;
          ++ii;
        }
      }
    }
    *reinterpret_cast<Pack<T, VEC>*>(out + row * width + e0) = pk;
  }
};

// gather_patches backward: one index per VEC consecutive pixels of an image row inside one patch
// (16-byte stores of the whole image gradient, zeros on removed patches, no memset first).
template <typename T, int VEC>
struct ScatterPatches {
  const T* grad;       // [N, K, P] contiguous
  const int64_t* inv;  // [N, L]: k with ids_keep[n, k] = l, or -1
  T* out;              // [N, C, H, W]
  int64_t keep, width, length, channels, p, height, img_w, grid_w, wvecs;

  FM_HD void operator()(int64_t i) const {
    const int64_t row = i / wvecs;  // (n * C + c) * H + h
    const int64_t w0 = (i - row * wvecs) * VEC;
    const int64_t h = row % height;
    const int64_t nc = row / height;
    const int64_t c = nc % channels;
    const int64_t n = nc / channels;
    const int64_t hi = h / p;
    const int64_t wi = w0 / p;
    const int64_t k = inv[n * length + hi * grid_w + wi];
    Pack<T, VEC> pk;
    if (k < 0) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) pk.v[v] = from_float<T>(0.0f);
    } else {
      // pixel (h, w0 + v) is column ((h - hi*p) * p + (w0 - wi*p) + v) * C + c of row (n, k)
      const T* src = grad + (n * keep + k) * width + ((h - hi * p) * p + (w0 - wi * p)) * channels + c;
#pragma unroll
      for (int v = 0; v < VEC; ++v) pk.v[v] = src[v * channels];
    }
    *reinterpret_cast<Pack<T, VEC>*>(out + row * img_w + w0) = pk;
  }
};

// ---------------------------------------------------------------------------------------------
// Row select: out[n, l, :] = src[n, idx[n, l], :] when 0 <= idx < src_len, else the fill row (or
// zeros); then + pos[row] as ONE fp32 add rounded once to the output dtype (reference._add_pos).
// Every input dtype here is exact in fp32, so going through fp32 changes no value.
template <typename Ts, typename To, int VEC>
struct SelectRows {
  const Ts* src;       // [N, src_len, D] contiguous
  const int64_t* idx;  // [N, out_len] contiguous
  const float* fill;   // [D] or null
  const float* pos;    // [*, D] or null
  To* out;             // [N, out_len, D]
  int64_t out_len, src_len, dim, vecs;
  bool pos_at_src;  // gather: the kept row's own position; insertion: the destination's

  FM_HD void operator()(int64_t i) const {
    const int64_t row = i / vecs;  // n * out_len + l
    const int64_t d0 = (i - row * vecs) * VEC;
    const int64_t n = row / out_len;
    const int64_t l = row - n * out_len;
    const int64_t s = idx[row];
    const bool take = s >= 0 && s < src_len;
    float val[VEC];
    if (take) {
      load_floats<VEC>(src + (n * src_len + s) * dim + d0, val);
    } else if (fill != nullptr) {
      load_floats<VEC>(fill + d0, val);
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) val[v] = 0.0f;
    }
    if (pos != nullptr && (take || !pos_at_src)) {
      float add[VEC];
      load_floats<VEC>(pos + (pos_at_src ? s : l) * dim + d0, add);
#pragma unroll
      for (int v = 0; v < VEC; ++v) val[v] += add[v];
    }
    store_floats<VEC>(out + row * dim + d0, val);
  }
};

// ---------------------------------------------------------------------------------------------
// insert_mask_tokens backward, per sample n and a chunk s of its rows: read each grad row once, round
// it through the cat dtype (the reference casts the gradient there first), write kept rows to d x_vis
// and sum masked rows (fp32) into this thread's accumulator. Rows l = start + ty, step ny.
template <typename Tg, typename Tx, int VEC>
struct InsertBackwardRows {
  const Tg* grad;      // [N, L, D] contiguous
  const int64_t* ids;  // [N, L] contiguous, a permutation per row
  Tx* grad_x;          // [N, K, D]
  int64_t length, keep, dim, chunk;
  int mid;  // RoundKind of the cat dtype

  FM_HD void operator()(int64_t n, int64_t s, int64_t vc, int64_t ty, int64_t ny, float* acc) const {
    const int64_t d0 = vc * VEC;
    const int64_t start = s * chunk;
    const int64_t end = start + chunk < length ? start + chunk : length;
    for (int64_t l = start + ty; l < end; l += ny) {
      const int64_t r = ids[n * length + l];
      float g[VEC];
      load_floats<VEC>(grad + (n * length + l) * dim + d0, g);
#pragma unroll
      for (int v = 0; v < VEC; ++v) g[v] = round_through(g[v], mid);
      if (r < keep) {
        store_floats<VEC>(grad_x + (n * keep + r) * dim + d0, g);
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[v] += g[v];
      }
    }
  }
};

// Block = (TX vector columns) x (TY row groups); the TY partial sums are added in a fixed order.
template <typename Rows, int VEC>
__global__ void __launch_bounds__(kThreads)
    insert_backward_kernel(Rows rows, int64_t splits, int64_t vecs, float* partial) {
  __shared__ float stage[kThreads * VEC];
  const int64_t block = blockIdx.x;  // n * splits + s
  const int64_t n = block / splits;
  const int64_t vc = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  float acc[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) acc[v] = 0.0f;
  if (vc < vecs) rows(n, block - n * splits, vc, threadIdx.y, blockDim.y, acc);
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
  for (int v = 0; v < VEC; ++v) stage[t * VEC + v] = acc[v];
  __syncthreads();
  if (threadIdx.y == 0 && vc < vecs) {
    for (int y = 1; y < static_cast<int>(blockDim.y); ++y) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] += stage[(y * blockDim.x + threadIdx.x) * VEC + v];
    }
#pragma unroll
    for (int v = 0; v < VEC; ++v) partial[block * rows.dim + vc * VEC + v] = acc[v];
  }
}

// d mask_token[d] = sum over the [blocks, D] partials, in block order (deterministic), rounded
// through the cat dtype then to the token's dtype (the reference's two casts).
template <typename Tt>
struct TokenGrad {
  const float* partial;
  Tt* out;
  int64_t blocks, dim;
  int mid;

  FM_HD void operator()(int64_t d) const {
    float sum = 0.0f;
    for (int64_t b = 0; b < blocks; ++b) sum += partial[b * dim + d];
    out[d] = from_float<Tt>(round_through(sum, mid));
  }
};

// ---------------------------------------------------------------------------------------------
void check_ids(const at::Tensor& ids, const at::Tensor& data, const char* op, const char* name) {
  TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == at::kLong, "fastmae_cuda::", op, ": ", name,
              " must be a 2-D int64 tensor, got ", ids.sizes(), " ", ids.scalar_type());
  TORCH_CHECK(ids.device() == data.device(), "fastmae_cuda::", op, ": ", name, " is on ", ids.device(),
              " but the data is on ", data.device());
  TORCH_CHECK(ids.size(0) == data.size(0), "fastmae_cuda::", op, ": ", name, " has batch ", ids.size(0),
              " but the data has batch ", data.size(0));
}

// Raises (CPU) or device-asserts without a host sync (CUDA) unless `ok` is true.
void assert_true(const at::Tensor& ok, const std::string& message) {
  if (ok.is_cuda()) {
    at::_assert_async(ok, message);
  } else {
    TORCH_CHECK(ok.item<bool>(), message);
  }
}

// ids [N, K] of distinct positions in [0, length) -> inv [N, length] int64: inv[n, ids[n, k]] = k, else -1.
at::Tensor inverse_ids(const at::Tensor& ids, int64_t length, const char* op) {
  const int64_t n = ids.size(0), keep = ids.size(1);
  auto inv = at::full({n, length}, -1, ids.options());
  inv.scatter_(1, ids, at::arange(keep, ids.options()).expand({n, keep}));
  if (n * keep > 0) {
    assert_true((inv >= 0).sum(1).eq(keep).all(),
                std::string("fastmae_cuda::") + op + " backward: ids must be distinct within each row");
  }
  return inv;
}

template <typename Ts, typename To>
void launch_select_rows(const at::Tensor& src, const at::Tensor& idx, const float* fill, const float* pos,
                        bool pos_at_src, at::Tensor& out) {
  const int64_t n = src.size(0), src_len = src.size(1), dim = src.size(2), out_len = idx.size(1);
  constexpr int V = vec_for<Ts, To>();
  const Ts* s = src.data_ptr<Ts>();
  To* o = out.data_ptr<To>();
  const bool vec = dim % V == 0 && aligned(s, V * sizeof(Ts)) && aligned(o, V * sizeof(To)) &&
                   (fill == nullptr || aligned(fill, V * sizeof(float))) &&
                   (pos == nullptr || aligned(pos, V * sizeof(float)));
  const int64_t* id = idx.data_ptr<int64_t>();
  if (vec) {
    SelectRows<Ts, To, V> f{s, id, fill, pos, o, out_len, src_len, dim, dim / V, pos_at_src};
    for_each_index(out, n * out_len * (dim / V), f);
  } else {
    SelectRows<Ts, To, 1> f{s, id, fill, pos, o, out_len, src_len, dim, dim, pos_at_src};
    for_each_index(out, n * out_len * dim, f);
  }
}

// src [N, S, D], idx [N, L] -> out [N, L, D] in out_dtype (see SelectRows).
at::Tensor select_rows(const at::Tensor& src_in, const at::Tensor& idx_in, at::ScalarType out_dtype,
                       const std::optional<at::Tensor>& fill_in, const std::optional<at::Tensor>& pos_in,
                       bool pos_at_src, const char* op) {
  const at::Tensor src = src_in.contiguous();
  const at::Tensor idx = idx_in.contiguous();
  // Fill and pos go to fp32 (exact for every input dtype): one kernel per (src, out) dtype pair.
  at::Tensor fill, pos;
  if (fill_in.has_value()) fill = fill_in->to(at::kFloat).contiguous();
  if (pos_in.has_value()) pos = pos_in->to(at::kFloat).contiguous();
  auto out = at::empty({src.size(0), idx.size(1), src.size(2)}, src.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  const float* fill_ptr = fill.defined() ? fill.data_ptr<float>() : nullptr;
  const float* pos_ptr = pos.defined() ? pos.data_ptr<float>() : nullptr;
  dispatch_float(src.scalar_type(), op, [&](auto ts) {
    dispatch_float(out_dtype, op, [&](auto to) {
      launch_select_rows<decltype(ts), decltype(to)>(src, idx, fill_ptr, pos_ptr, pos_at_src, out);
    });
  });
  return out;
}

void check_pos(const std::optional<at::Tensor>& pos, const at::Tensor& data, int64_t length, int64_t dim,
               const char* op) {
  if (!pos.has_value()) return;
  TORCH_CHECK(pos->dim() == 3 && pos->size(0) == 1 && pos->size(1) == length && pos->size(2) == dim,
              "fastmae_cuda::", op, ": pos_embed must be [1, ", length, ", ", dim, "], got ", pos->sizes());
  TORCH_CHECK(pos->device() == data.device(), "fastmae_cuda::", op, ": pos_embed is on ", pos->device(),
              " but the data is on ", data.device());
}

}  // namespace

// =============================================================================================
std::tuple<at::Tensor, at::Tensor, at::Tensor> random_masking(const at::Tensor& noise, double mask_ratio) {
  check_device(noise, "random_masking");
  TORCH_CHECK(noise.dim() == 2 && noise.is_floating_point(), "fastmae_cuda::random_masking: noise must be a 2-D ",
              "floating tensor [N, L], got ", noise.sizes(), " ", noise.scalar_type());
  const at::OptionalDeviceGuard guard(at::device_of(noise));
  const int64_t n = noise.size(0), length = noise.size(1);
  // The official int(L * (1 - mask_ratio)): the same double arithmetic and truncation as Python.
  const int64_t keep = static_cast<int64_t>(static_cast<double>(length) * (1.0 - mask_ratio));
  TORCH_CHECK(keep >= 0 && keep <= length, "fastmae_cuda::random_masking: mask_ratio ", mask_ratio,
              " gives ", keep, " kept patches of ", length);
  const auto shuffle = at::argsort(noise, /*dim=*/int64_t{1}, /*descending=*/false).contiguous();  // [N, L] the reference's call: same tie order
  auto ids_keep = at::empty({n, keep}, noise.options().dtype(at::kLong));
  auto ids_restore = at::empty({n, length}, noise.options().dtype(at::kLong));
  auto mask = at::empty({n, length}, noise.options());
  dispatch_float(
      noise.scalar_type(), "noise",
      [&](auto tag) {
        using M = decltype(tag);
        InvertShuffle<M> f{shuffle.data_ptr<int64_t>(), ids_keep.data_ptr<int64_t>(),
                           ids_restore.data_ptr<int64_t>(), mask.data_ptr<M>(), length, keep};
        for_each_index(mask, n * length, f);
      },
      /*allow_double=*/true);
  return {ids_keep, ids_restore, mask};
}

at::Tensor gather_patches(const at::Tensor& imgs_in, const at::Tensor& ids_in, int64_t patch_size) {
  check_device(imgs_in, "gather_patches");
  TORCH_CHECK(imgs_in.dim() == 4, "fastmae_cuda::gather_patches: imgs must be [N, C, H, W], got ", imgs_in.sizes());
  check_ids(ids_in, imgs_in, "gather_patches", "ids_keep");
  const int64_t p = patch_size, channels = imgs_in.size(1), height = imgs_in.size(2), img_w = imgs_in.size(3);
  TORCH_CHECK(p > 0 && height % p == 0 && img_w % p == 0, "fastmae_cuda::gather_patches: image ", height, "x",
              img_w, " is not divisible by patch_size ", p);
  const at::OptionalDeviceGuard guard(at::device_of(imgs_in));
  const at::Tensor imgs = imgs_in.contiguous();
  const at::Tensor ids = ids_in.contiguous();
  const int64_t n = imgs.size(0), keep = ids.size(1), width = p * p * channels;
  auto out = at::empty({n, keep, width}, imgs.options());  // [N, K, p*p*C]
  if (out.numel() == 0) return out;
  dispatch_float(imgs.scalar_type(), "imgs", [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = 16 / sizeof(T);
    const int64_t grid_w = img_w / p;
    if (width % V == 0) {  // out rows are then 16-byte aligned (fresh allocation)
      GatherPatches<T, V> f{imgs.data_ptr<T>(), ids.data_ptr<int64_t>(), out.data_ptr<T>(), keep, width,
                            width / V, channels, p, height, img_w, grid_w};
      for_each_index(out, n * keep * (width / V), f);
    } else {
      GatherPatches<T, 1> f{imgs.data_ptr<T>(), ids.data_ptr<int64_t>(), out.data_ptr<T>(), keep, width,
                            width, channels, p, height, img_w, grid_w};
      for_each_index(out, n * keep * width, f);
    }
  });
  return out;
}

at::Tensor gather_patches_backward(const at::Tensor& grad_in, const at::Tensor& ids_in, int64_t patch_size,
                                   int64_t channels, int64_t height, int64_t img_w) {
  check_device(grad_in, "gather_patches_backward");
  const int64_t p = patch_size;
  TORCH_CHECK(grad_in.dim() == 3 && grad_in.size(2) == p * p * channels,
              "fastmae_cuda::gather_patches_backward: grad must be [N, K, ", p * p * channels, "], got ",
              grad_in.sizes());
  check_ids(ids_in, grad_in, "gather_patches_backward", "ids_keep");
  TORCH_CHECK(p > 0 && height % p == 0 && img_w % p == 0, "fastmae_cuda::gather_patches_backward: image ", height,
              "x", img_w, " is not divisible by patch_size ", p);
  const at::OptionalDeviceGuard guard(at::device_of(grad_in));
  const at::Tensor grad = grad_in.contiguous();
  const int64_t n = grad.size(0), keep = grad.size(1), width = grad.size(2);
  const int64_t grid_w = img_w / p, length = (height / p) * grid_w;
  auto out = at::empty({n, channels, height, img_w}, grad.options());  // [N, C, H, W]
  if (out.numel() == 0) return out;
  const at::Tensor inv = inverse_ids(ids_in.contiguous(), length, "gather_patches");  // [N, L]
  dispatch_float(grad.scalar_type(), "grad", [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = 16 / sizeof(T);
    if (p % V == 0) {  // VEC pixels of an image row then lie in one patch, 16-byte aligned
      ScatterPatches<T, V> f{grad.data_ptr<T>(), inv.data_ptr<int64_t>(), out.data_ptr<T>(), keep, width, length,
                             channels, p, height, img_w, grid_w, img_w / V};
      for_each_index(out, out.numel() / V, f);
    } else {
      ScatterPatches<T, 1> f{grad.data_ptr<T>(), inv.data_ptr<int64_t>(), out.data_ptr<T>(), keep, width, length,
                             channels, p, height, img_w, grid_w, img_w};
      for_each_index(out, out.numel(), f);
    }
  });
  return out;
}

at::Tensor gather_tokens(const at::Tensor& x, const at::Tensor& ids_keep, const std::optional<at::Tensor>& pos) {
  check_device(x, "gather_tokens");
  TORCH_CHECK(x.dim() == 3, "fastmae_cuda::gather_tokens: x must be [N, L, D], got ", x.sizes());
  check_ids(ids_keep, x, "gather_tokens", "ids_keep");
  check_pos(pos, x, x.size(1), x.size(2), "gather_tokens");
  const at::OptionalDeviceGuard guard(at::device_of(x));
  const auto out_dtype = pos.has_value() ? at::promote_types(x.scalar_type(), pos->scalar_type()) : x.scalar_type();
  return select_rows(x, ids_keep, out_dtype, std::nullopt, pos, /*pos_at_src=*/true, "gather_tokens");
}

at::Tensor gather_tokens_backward(const at::Tensor& grad, const at::Tensor& ids_keep, int64_t length,
                                  at::ScalarType dtype) {
  check_device(grad, "gather_tokens_backward");
  TORCH_CHECK(grad.dim() == 3 && grad.size(1) == ids_keep.size(1),
              "fastmae_cuda::gather_tokens_backward: grad must be [N, K, D] with K = ids_keep.size(1), got ",
              grad.sizes());
  check_ids(ids_keep, grad, "gather_tokens_backward", "ids_keep");
  const at::OptionalDeviceGuard guard(at::device_of(grad));
  const at::Tensor inv = inverse_ids(ids_keep.contiguous(), length, "gather_tokens");  // [N, L], -1: not kept
  return select_rows(grad, inv, dtype, std::nullopt, std::nullopt, false, "gather_tokens_backward");
}

at::Tensor insert_mask_tokens(const at::Tensor& x_vis, const at::Tensor& mask_token, const at::Tensor& ids_restore,
                              const std::optional<at::Tensor>& pos) {
  check_device(x_vis, "insert_mask_tokens");
  TORCH_CHECK(x_vis.dim() == 3, "fastmae_cuda::insert_mask_tokens: x_vis must be [N, K, D], got ", x_vis.sizes());
  const int64_t dim = x_vis.size(2);
  TORCH_CHECK(mask_token.dim() == 3 && mask_token.numel() == dim && mask_token.device() == x_vis.device(),
              "fastmae_cuda::insert_mask_tokens: mask_token must be [1, 1, ", dim, "] on ", x_vis.device());
  check_ids(ids_restore, x_vis, "insert_mask_tokens", "ids_restore");
  const int64_t length = ids_restore.size(1);
  TORCH_CHECK(length >= x_vis.size(1), "fastmae_cuda::insert_mask_tokens: ids_restore has L=", length, " < K=",
              x_vis.size(1));
  check_pos(pos, x_vis, length, dim, "insert_mask_tokens");
  const at::OptionalDeviceGuard guard(at::device_of(x_vis));
  // Output dtype: torch.cat's promotion of x_vis and the token, then the position add's.
  auto out_dtype = at::promote_types(x_vis.scalar_type(), mask_token.scalar_type());
  if (pos.has_value()) out_dtype = at::promote_types(out_dtype, pos->scalar_type());
  return select_rows(x_vis, ids_restore, out_dtype, mask_token.reshape({dim}), pos, /*pos_at_src=*/false,
                     "insert_mask_tokens");
}

std::tuple<at::Tensor, at::Tensor> insert_mask_tokens_backward(const at::Tensor& grad_in,
                                                               const at::Tensor& ids_in, int64_t keep,
                                                               at::ScalarType x_dtype, at::ScalarType mid_dtype,
                                                               at::ScalarType token_dtype) {
  const char* op = "insert_mask_tokens_backward";
  check_device(grad_in, op);
  TORCH_CHECK(grad_in.dim() == 3, "fastmae_cuda::", op, ": grad must be [N, L, D], got ", grad_in.sizes());
  check_ids(ids_in, grad_in, op, "ids_restore");
  TORCH_CHECK(ids_in.size(1) == grad_in.size(1) && keep >= 0 && keep <= grad_in.size(1), "fastmae_cuda::", op,
              ": ids_restore ", ids_in.sizes(), " does not match grad ", grad_in.sizes(), " with K=", keep);
  const at::OptionalDeviceGuard guard(at::device_of(grad_in));
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor ids = ids_in.contiguous();
  const int64_t n = grad.size(0), length = grad.size(1), dim = grad.size(2);
  auto grad_x = at::empty({n, keep, dim}, grad.options().dtype(x_dtype));             // [N, K, D]
  auto grad_token = at::empty({1, 1, dim}, grad.options().dtype(token_dtype));        // [1, 1, D]
  if (n * length == 0 || dim == 0) {
    grad_token.zero_();
    return {grad_x, grad_token};
  }
  // A permutation writes every d(x_vis) row exactly once; anything else would leave rows unwritten.
  const auto hit = at::zeros({n, length}, ids.options().dtype(at::kBool)).scatter_(1, ids, true);
  assert_true(hit.all(), "fastmae_cuda::insert_mask_tokens backward: ids_restore must be a permutation of [0, L)");

  // Rows of a sample are split into chunks so that about 1024 blocks run whatever the batch: the split
  // depends on the shape only, so the summation order (and the result) is the same on every run and card.
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>(length, (1024 + n - 1) / n));
  const int64_t chunk = (length + splits - 1) / splits;
  splits = (length + chunk - 1) / chunk;
  auto partial = at::empty({n * splits, dim}, grad.options().dtype(at::kFloat));  // [N*S, D] masked-row sums
  const int mid = round_kind(mid_dtype);

  dispatch_float(grad.scalar_type(), "grad", [&](auto tg) {
    dispatch_float(x_dtype, "x_vis", [&](auto tx) {
      using Tg = decltype(tg);
      using Tx = decltype(tx);
      constexpr int V = vec_for<Tg, Tx>();
      const bool vec = dim % V == 0 && aligned(grad.data_ptr(), V * sizeof(Tg)) &&
                       aligned(grad_x.data_ptr(), V * sizeof(Tx));
      auto run = [&](auto rows, auto vec_tag) {
        constexpr int W = decltype(vec_tag)::value;
        const int64_t vecs = dim / W;
        if (grad.is_cuda()) {
          const int64_t tx_threads = std::min<int64_t>(256, (vecs + 31) / 32 * 32);
          const dim3 block(static_cast<unsigned>(tx_threads), static_cast<unsigned>(kThreads / tx_threads));
          const dim3 blocks(static_cast<unsigned>(n * splits), static_cast<unsigned>((vecs + tx_threads - 1) / tx_threads));
          insert_backward_kernel<decltype(rows), W><<<blocks, block, 0, c10::cuda::getCurrentCUDAStream()>>>(
              rows, splits, vecs, partial.data_ptr<float>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        } else {
          float* part = partial.data_ptr<float>();
          at::parallel_for(0, n * splits * vecs, 64, [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i) {
              const int64_t block = i / vecs, vc = i - block * vecs;
              float acc[W];
              for (int v = 0; v < W; ++v) acc[v] = 0.0f;
              rows(block / splits, block % splits, vc, 0, 1, acc);
              for (int v = 0; v < W; ++v) part[block * dim + vc * W + v] = acc[v];
            }
          });
        }
      };
      if (vec) {
        run(InsertBackwardRows<Tg, Tx, V>{grad.data_ptr<Tg>(), ids.data_ptr<int64_t>(), grad_x.data_ptr<Tx>(), length,
                                          keep, dim, chunk, mid},
            std::integral_constant<int, V>{});
      } else {
        run(InsertBackwardRows<Tg, Tx, 1>{grad.data_ptr<Tg>(), ids.data_ptr<int64_t>(), grad_x.data_ptr<Tx>(), length,
                                          keep, dim, chunk, mid},
            std::integral_constant<int, 1>{});
      }
    });
  });
  dispatch_float(token_dtype, "mask_token", [&](auto tt) {
    using Tt = decltype(tt);
    TokenGrad<Tt> f{partial.data_ptr<float>(), grad_token.data_ptr<Tt>(), n * splits, dim, mid};
    for_each_index(grad_token, dim, f);
  });
  return {grad_x, grad_token};
}

}  // namespace fastmae
