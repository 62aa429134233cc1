// Shared pieces of the fastmae CUDA kernels: packed vector loads/stores, dtype dispatch, rounding,
// and `for_each_index`, which runs a __host__ __device__ functor over an index range either as a CUDA
// grid-stride kernel (CUDA tensors) or as a host loop (CPU tensors). The host loop runs the SAME
// functor code, so the index math, the vector/scalar paths and the roundings are tested on machines
// without a GPU; only the launch and the warp/block reductions are GPU-only.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <optional>

#define FM_HD __host__ __device__ __forceinline__

namespace fastmae {

constexpr int kThreads = 256;       // threads per block for every kernel here
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride loops above this many blocks

// VEC elements of T moved as one access: 16 bytes for the widest type of an op ("16-byte vector").
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Elements per 16-byte access for the wider of two element types.
template <typename A, typename B>
constexpr int vec_for() {
  return 16 / (sizeof(A) > sizeof(B) ? sizeof(A) : sizeof(B));
}

// Exact widening to fp32. bf16 is widened on its bits: c10::BFloat16's own operator float goes through a
// reinterpret_cast to __nv_bfloat16 in nvcc-compiled host code, which gcc -O3 (strict aliasing) miscompiled
// to zeros on values copied out of a Pack (seen on the host twin, caught by tests/test_cuda_ops.py).
template <typename T>
FM_HD float to_float(T v) {
  return static_cast<float>(v);
}

template <>
FM_HD float to_float<c10::BFloat16>(c10::BFloat16 v) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(static_cast<unsigned int>(v.x) << 16);
#else
  return c10::detail::f32_from_bits(v.x);
#endif
}

template <>
FM_HD float to_float<c10::Half>(c10::Half v) {
#ifdef __CUDA_ARCH__
  return static_cast<float>(v);
#else
  return c10::detail::fp16_ieee_to_fp32_value(v.x);  // on the bits, for the same reason
#endif
}

// fp32 -> T, round to nearest even as torch's .to(); on the host on the bits (see to_float).
template <typename T>
FM_HD T from_float(float v) {
  return static_cast<T>(v);
}

template <>
FM_HD c10::BFloat16 from_float<c10::BFloat16>(float v) {
#ifdef __CUDA_ARCH__
  return c10::BFloat16(v);
#else
  return c10::BFloat16(c10::detail::round_to_nearest_even(v), c10::BFloat16::from_bits());
#endif
}

template <>
FM_HD c10::Half from_float<c10::Half>(float v) {
#ifdef __CUDA_ARCH__
  return c10::Half(v);
#else
  return c10::Half(c10::detail::fp16_ieee_from_fp32_value(v), c10::Half::from_bits());
#endif
}

template <int N, typename T>
FM_HD void load_floats(const T* p, float* out) {
  const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(pk.v[i]);
}

template <int N, typename T>
FM_HD void store_floats(T* p, const float* in) {
  Pack<T, N> pk;
#pragma unroll
  for (int i = 0; i < N; ++i) pk.v[i] = from_float<T>(in[i]);  // round to nearest even, as torch's .to()
  *reinterpret_cast<Pack<T, N>*>(p) = pk;
}

// Rounding of an fp32 value through a narrower dtype and back: what a `.to(dtype)` in the reference's
// graph does to a gradient. kind: 0 fp32 (exact), 1 bf16, 2 fp16.
enum RoundKind : int { kRoundF32 = 0, kRoundBF16 = 1, kRoundF16 = 2 };

FM_HD float round_through(float v, int kind) {
  if (kind == kRoundBF16) return to_float(from_float<c10::BFloat16>(v));
  if (kind == kRoundF16) return to_float(from_float<c10::Half>(v));
  return v;
}

inline int round_kind(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return kRoundBF16;
    case at::kHalf: return kRoundF16;
    default: return kRoundF32;
  }
}

// True when `p` may be accessed in `bytes`-wide packs.
inline bool aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// Calls f(T{}) for the kernel storage dtypes (fp32, bf16, fp16; fp64 too where allowed).
template <typename F>
void dispatch_float(at::ScalarType t, const char* what, F&& f, bool allow_double = false) {
  switch (t) {
    case at::kFloat: f(float{}); return;
    case at::kBFloat16: f(c10::BFloat16{}); return;
    case at::kHalf: f(c10::Half{}); return;
    case at::kDouble:
      if (allow_double) { f(double{}); return; }
      break;
    default: break;
  }
  TORCH_CHECK(false, "fastmae_cuda: ", what, " must be float32, bfloat16 or float16, got ", t);
}

#ifdef __CUDACC__
template <typename F>
__global__ void __launch_bounds__(kThreads) for_each_kernel(int64_t count, F f) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += step) f(i);
}
#endif

// f(i) for i in [0, count): one thread per index on CUDA (consecutive threads take consecutive
// indices, so functors that map i to consecutive addresses are coalesced), a parallel host loop on CPU.
template <typename F>
void for_each_index(const at::Tensor& like, int64_t count, const F& f) {
  if (count <= 0) return;
  if (like.is_cuda()) {
#ifdef __CUDACC__
    const int64_t blocks = std::min<int64_t>((count + kThreads - 1) / kThreads, kMaxBlocks);
    for_each_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(count, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
  } else {
    at::parallel_for(0, count, 2048, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) f(i);
    });
  }
}

// Sum over the 32 lanes of a warp, the same value on every lane (butterfly: a fixed order, so
// deterministic). On the host a "warp" is one lane, so this is the identity there.
FM_HD float warp_sum(float v) {
#ifdef __CUDA_ARCH__
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
#endif
  return v;
}

inline void check_device(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.is_cuda() || t.is_cpu(), "fastmae_cuda::", op, ": tensors must be on CUDA (or CPU for tests), got ",
              t.device());
}

}  // namespace fastmae
