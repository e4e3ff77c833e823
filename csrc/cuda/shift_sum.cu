// spvit::shift_sum / shift_sum_backward CUDA kernels (schemas in csrc/shift_sum.cpp; semantics in csrc/shift_sum.h).
//
// Forward: one thread per (position, VEC-channel chunk); it sums the T neighbour plane vectors in float registers,
// adds the bias, applies ReLU and stores one vector. Adjacent threads own adjacent channel chunks of one position,
// so every tap read is a contiguous d-element row segment (fully coalesced for d = 64: 128 B in bf16).
// Backward: grad_planes by one thread per (position, tap, VEC chunk) gathering the ReLU-masked output gradient
// (the adjoint shift); grad_bias by a deterministic two-stage column reduction (per-block partials + at::sum).
// VEC = 16 bytes / sizeof(scalar) when d % VEC == 0 and every pointer is 16-byte aligned, else 1.
// All launches go on the current stream of the tensors' device. Only c10/cuda headers are used (not
// ATen/cuda/CUDAContext.h, which needs the cuBLAS/cuSPARSE headers that a minimal CUDA toolkit may lack).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "../shift_sum.h"

namespace spvit {
namespace {

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

constexpr int kThreads = 256;

inline int64_t blocks_for(int64_t n, int64_t threads) {
  const int64_t max_blocks = int64_t(1) << 30;  // grid-stride loops cover the rest
  int64_t b = (n + threads - 1) / threads;
  return b < 1 ? 1 : (b > max_blocks ? max_blocks : b);
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// planes (B, P, T, D) -> out (B, P, D); bias (D,) or nullptr. n = B * P * (D / VEC).
template <typename scalar_t, int VEC>
__global__ void shift_sum_fwd_kernel(const scalar_t* __restrict__ planes, const scalar_t* __restrict__ bias,
                                     scalar_t* __restrict__ out, int64_t n, int H, int W, int T, int D, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = Vec<scalar_t, VEC>;
  const int DV = D / VEC;
  const int64_t P = int64_t(H) * W;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int cv = int(idx % DV);
    const int64_t pos = idx / DV;  // b * P + p
    const int64_t b = pos / P;
    const int p = int(pos - b * P);
    const int i = p / W, j = p - (p / W) * W;
    acc_t acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = acc_t(0);
    for (int k = 0; k < T; ++k) {
      int64_t dy, dx;
      tap_offset(k, T, dy, dx);
      const int ii = i + int(dy), jj = j + int(dx);
      if (ii < 0 || ii >= H || jj < 0 || jj >= W) continue;
      const vec_t x = *reinterpret_cast<const vec_t*>(planes + ((b * P + int64_t(ii) * W + jj) * T + k) * D +
                                                      int64_t(cv) * VEC);
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] += static_cast<acc_t>(x.v[e]);
    }
    if (bias != nullptr) {
      const vec_t bv = *reinterpret_cast<const vec_t*>(bias + int64_t(cv) * VEC);
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] += static_cast<acc_t>(bv.v[e]);
    }
    vec_t y;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const acc_t v = acc[e];
      y.v[e] = static_cast<scalar_t>(relu && v < acc_t(0) ? acc_t(0) : v);
    }
    *reinterpret_cast<vec_t*>(out + pos * D + int64_t(cv) * VEC) = y;
  }
}

// grad (B, P, D), out (B, P, D) -> grad_planes (B, P, T, D). n = B * P * T * (D / VEC).
template <typename scalar_t, int VEC>
__global__ void shift_sum_bwd_planes_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ out,
                                            scalar_t* __restrict__ grad_planes, int64_t n, int H, int W, int T, int D,
                                            bool relu) {
  using vec_t = Vec<scalar_t, VEC>;
  const int DV = D / VEC;
  const int64_t P = int64_t(H) * W;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int cv = int(idx % DV);
    const int64_t pk = idx / DV;  // (b * P + q) * T + k
    const int k = int(pk % T);
    const int64_t pos = pk / T;  // b * P + q
    const int64_t b = pos / P;
    const int q = int(pos - b * P);
    const int i = q / W, j = q - (q / W) * W;
    int64_t dy, dx;
    tap_offset(k, T, dy, dx);
    const int ii = i - int(dy), jj = j - int(dx);
    vec_t y;
    if (ii < 0 || ii >= H || jj < 0 || jj >= W) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) y.v[e] = scalar_t(0);
    } else {
      const int64_t src = (b * P + int64_t(ii) * W + jj) * D + int64_t(cv) * VEC;
      y = *reinterpret_cast<const vec_t*>(grad + src);
      if (relu) {
        const vec_t o = *reinterpret_cast<const vec_t*>(out + src);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          if (!(static_cast<float>(o.v[e]) > 0.f)) y.v[e] = scalar_t(0);
        }
      }
    }
    *reinterpret_cast<vec_t*>(grad_planes + pk * D + int64_t(cv) * VEC) = y;
  }
}

// Column sums of the masked gradient: partial[blockIdx.y, c] = sum over this block's rows of g[row, c].
// Block (32, 8): threadIdx.x walks channels, threadIdx.y rows (stride 8 * gridDim.y).
template <typename scalar_t>
__global__ void shift_sum_bwd_bias_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ out,
                                          at::opmath_type<scalar_t>* __restrict__ partial, int64_t rows, int D,
                                          bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t smem[8][33];
  const int c = blockIdx.x * 32 + threadIdx.x;
  acc_t s = acc_t(0);
  if (c < D) {
    for (int64_t r = int64_t(blockIdx.y) * 8 + threadIdx.y; r < rows; r += int64_t(gridDim.y) * 8) {
      const acc_t g = static_cast<acc_t>(grad[r * D + c]);
      if (!relu || static_cast<acc_t>(out[r * D + c]) > acc_t(0)) s += g;
    }
  }
  smem[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < D) {
    acc_t t = acc_t(0);
#pragma unroll
    for (int y = 0; y < 8; ++y) t += smem[y][threadIdx.x];
    partial[int64_t(blockIdx.y) * D + c] = t;
  }
}

template <typename scalar_t>
int pick_vec(int64_t D, std::initializer_list<const void*> ptrs) {
  constexpr int v = 16 / sizeof(scalar_t);
  if (v <= 1 || D % v != 0) return 1;
  for (const void* p : ptrs) {
    if (p != nullptr && !aligned16(p)) return 1;
  }
  return v;
}

at::Tensor shift_sum_cuda(const at::Tensor& planes_in, const std::optional<at::Tensor>& bias_in, int64_t H, int64_t W,
                          bool relu) {
  check_shift_sum_args(planes_in, bias_in, H, W);
  TORCH_CHECK(planes_in.is_cuda(), "spvit::shift_sum (CUDA kernel): planes must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(planes_in.device());
  const at::Tensor planes = planes_in.contiguous();
  const int64_t B = planes.size(0), T = planes.size(2), D = planes.size(3);
  TORCH_CHECK(H * W < (int64_t(1) << 31) && D < (int64_t(1) << 31), "spvit::shift_sum: grid or d too large");
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) bias = bias_in->to(planes.scalar_type()).contiguous();
  at::Tensor out = at::empty({B, H * W, D}, planes.options());
  if (out.numel() == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, planes.scalar_type(), "spvit_shift_sum_cuda", [&] {
    const scalar_t* pp = planes.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    constexpr int V = 16 / sizeof(scalar_t);
    if (pick_vec<scalar_t>(D, {pp, bp, op}) == V && V > 1) {
      const int64_t n = B * H * W * (D / V);
      shift_sum_fwd_kernel<scalar_t, V><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
          pp, bp, op, n, int(H), int(W), int(T), int(D), relu);
    } else {
      const int64_t n = B * H * W * D;
      shift_sum_fwd_kernel<scalar_t, 1><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
          pp, bp, op, n, int(H), int(W), int(T), int(D), relu);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> shift_sum_backward_cuda(const at::Tensor& grad_in, const at::Tensor& out_in,
                                                           int64_t H, int64_t W, int64_t T, bool relu) {
  check_shift_sum_backward_args(grad_in, out_in, H, W, T);
  TORCH_CHECK(grad_in.is_cuda(), "spvit::shift_sum_backward (CUDA kernel): tensors must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor out = out_in.to(grad.scalar_type()).contiguous();
  const int64_t B = grad.size(0), D = grad.size(2);
  const int64_t rows = B * H * W;
  const auto acc_type = bias_grad_dtype(grad.scalar_type());
  at::Tensor grad_planes = at::empty({B, H * W, T, D}, grad.options());
  if (grad_planes.numel() == 0) return {grad_planes, at::zeros({D}, grad.options().dtype(acc_type))};
  const int64_t row_blocks = std::min<int64_t>((rows + 7) / 8, 512);
  at::Tensor partial = at::empty({row_blocks, D}, grad.options().dtype(acc_type));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "spvit_shift_sum_backward_cuda", [&] {
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* op = out.const_data_ptr<scalar_t>();
    scalar_t* dp = grad_planes.mutable_data_ptr<scalar_t>();
    constexpr int V = 16 / sizeof(scalar_t);
    if (pick_vec<scalar_t>(D, {gp, op, dp}) == V && V > 1) {
      const int64_t n = rows * T * (D / V);
      shift_sum_bwd_planes_kernel<scalar_t, V><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
          gp, op, dp, n, int(H), int(W), int(T), int(D), relu);
    } else {
      const int64_t n = rows * T * D;
      shift_sum_bwd_planes_kernel<scalar_t, 1><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
          gp, op, dp, n, int(H), int(W), int(T), int(D), relu);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 block(32, 8);
    const dim3 grid(unsigned((D + 31) / 32), unsigned(row_blocks));
    shift_sum_bwd_bias_kernel<scalar_t><<<grid, block, 0, stream>>>(
        gp, op, partial.mutable_data_ptr<at::opmath_type<scalar_t>>(), rows, int(D), relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_planes, partial.sum(0)};
}

}  // namespace
}  // namespace spvit

TORCH_LIBRARY_IMPL(spvit, CUDA, m) {
  m.impl("shift_sum", &spvit::shift_sum_cuda);
  m.impl("shift_sum_backward", &spvit::shift_sum_backward_cuda);
}
