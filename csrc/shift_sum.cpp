// spvit::shift_sum: the folded depthwise 3x3 step of SPViT (docs/method.md §1.4, §10.4), schema + CPU kernels.
//
//   shift_sum(planes (B, P, T, d), bias (d,)?, H, W, relu) -> (B, P, d)
//     out[b, p] = act(sum_k planes[b, p + offset_k, k] + bias), neighbours outside the H x W grid are zero.
//   shift_sum_backward(grad_out (B, P, d), out (B, P, d), H, W, T, relu) -> (grad_planes (B, P, T, d), grad_bias (d,))
//     g = grad_out * (out > 0 if relu); grad_planes[b, q, k] = g[b, q - offset_k] inside the grid, else 0;
//     grad_bias = sum_{b, p} g, in float32 (float64 for float64 inputs).
//
// CPU: at::parallel_for (OpenMP) over batch x grid rows; the inner loop over d is contiguous and vectorisable;
// reduced-precision inputs (bf16/fp16) accumulate in float.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "shift_sum.h"

namespace spvit {
namespace {

// Work (elements) a parallel chunk should at least get, so tiny inputs run on one thread.
constexpr int64_t kMinChunkWork = 1 << 15;

template <typename scalar_t>
void shift_sum_fwd_cpu_kernel(const scalar_t* planes, const scalar_t* bias, scalar_t* out, int64_t B, int64_t H,
                              int64_t W, int64_t T, int64_t D, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t P = H * W;
  const int64_t grain = std::max<int64_t>(1, kMinChunkWork / std::max<int64_t>(1, W * T * D));
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(D);
    std::vector<acc_t> bias_acc(D, acc_t(0));
    if (bias != nullptr) {
      for (int64_t c = 0; c < D; ++c) bias_acc[c] = static_cast<acc_t>(bias[c]);
    }
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / H;
      const int64_t i = r % H;
      for (int64_t j = 0; j < W; ++j) {
        acc_t* a = acc.data();
        std::fill(a, a + D, acc_t(0));
        for (int64_t k = 0; k < T; ++k) {
          int64_t dy, dx;
          tap_offset(k, T, dy, dx);
          const int64_t ii = i + dy, jj = j + dx;
          if (ii < 0 || ii >= H || jj < 0 || jj >= W) continue;
          const scalar_t* src = planes + ((b * P + ii * W + jj) * T + k) * D;
#pragma omp simd
          for (int64_t c = 0; c < D; ++c) a[c] += static_cast<acc_t>(src[c]);
        }
        scalar_t* dst = out + (b * P + i * W + j) * D;
        const acc_t* bb = bias_acc.data();
        if (relu) {
#pragma omp simd
          for (int64_t c = 0; c < D; ++c) {
            const acc_t v = a[c] + bb[c];
            dst[c] = static_cast<scalar_t>(v < acc_t(0) ? acc_t(0) : v);  // NaN propagates like torch.relu
          }
        } else {
#pragma omp simd
          for (int64_t c = 0; c < D; ++c) dst[c] = static_cast<scalar_t>(a[c] + bb[c]);
        }
      }
    }
  });
}

template <typename scalar_t>
void shift_sum_bwd_cpu_kernel(const scalar_t* grad, const scalar_t* out, scalar_t* grad_planes,
                              at::opmath_type<scalar_t>* bias_partial, int64_t B, int64_t H, int64_t W, int64_t T,
                              int64_t D, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t P = H * W;
  const int64_t grain = std::max<int64_t>(1, kMinChunkWork / std::max<int64_t>(1, W * T * D));
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / H;
      const int64_t i = r % H;
      acc_t* part = bias_partial + r * D;  // this row's contribution to grad_bias
      std::fill(part, part + D, acc_t(0));
      for (int64_t j = 0; j < W; ++j) {
        // bias gradient: the masked output gradient at (i, j)
        const scalar_t* g0 = grad + (b * P + i * W + j) * D;
        const scalar_t* o0 = out + (b * P + i * W + j) * D;
        if (relu) {
#pragma omp simd
          for (int64_t c = 0; c < D; ++c) part[c] += o0[c] > scalar_t(0) ? static_cast<acc_t>(g0[c]) : acc_t(0);
        } else {
#pragma omp simd
          for (int64_t c = 0; c < D; ++c) part[c] += static_cast<acc_t>(g0[c]);
        }
        // planes gradient (adjoint shift): plane k at q = (i, j) fed the output at q - offset_k
        for (int64_t k = 0; k < T; ++k) {
          int64_t dy, dx;
          tap_offset(k, T, dy, dx);
          const int64_t ii = i - dy, jj = j - dx;
          scalar_t* dst = grad_planes + ((b * P + i * W + j) * T + k) * D;
          if (ii < 0 || ii >= H || jj < 0 || jj >= W) {
            std::fill(dst, dst + D, scalar_t(0));
            continue;
          }
          const scalar_t* g = grad + (b * P + ii * W + jj) * D;
          if (relu) {
            const scalar_t* o = out + (b * P + ii * W + jj) * D;
#pragma omp simd
            for (int64_t c = 0; c < D; ++c) dst[c] = o[c] > scalar_t(0) ? g[c] : scalar_t(0);
          } else {
            std::copy(g, g + D, dst);
          }
        }
      }
    }
  });
}

at::Tensor shift_sum_cpu(const at::Tensor& planes_in, const std::optional<at::Tensor>& bias_in, int64_t H, int64_t W,
                         bool relu) {
  check_shift_sum_args(planes_in, bias_in, H, W);
  TORCH_CHECK(planes_in.device().is_cpu(), "spvit::shift_sum (CPU kernel): planes must be a CPU tensor");
  const at::Tensor planes = planes_in.contiguous();
  const int64_t B = planes.size(0), T = planes.size(2), D = planes.size(3);
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) bias = bias_in->to(planes.scalar_type()).contiguous();
  at::Tensor out = at::empty({B, H * W, D}, planes.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, planes.scalar_type(), "spvit_shift_sum_cpu", [&] {
    shift_sum_fwd_cpu_kernel<scalar_t>(planes.const_data_ptr<scalar_t>(),
                                       bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                                       out.mutable_data_ptr<scalar_t>(), B, H, W, T, D, relu);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> shift_sum_backward_cpu(const at::Tensor& grad_in, const at::Tensor& out_in,
                                                          int64_t H, int64_t W, int64_t T, bool relu) {
  check_shift_sum_backward_args(grad_in, out_in, H, W, T);
  TORCH_CHECK(grad_in.device().is_cpu(), "spvit::shift_sum_backward (CPU kernel): tensors must be on the CPU");
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor out = out_in.to(grad.scalar_type()).contiguous();
  const int64_t B = grad.size(0), D = grad.size(2);
  at::Tensor grad_planes = at::empty({B, H * W, T, D}, grad.options());
  const auto acc_type = bias_grad_dtype(grad.scalar_type());
  at::Tensor partial = at::empty({B * H, D}, grad.options().dtype(acc_type));
  if (grad_planes.numel() == 0) return {grad_planes, at::zeros({D}, grad.options().dtype(acc_type))};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "spvit_shift_sum_backward_cpu", [&] {
    shift_sum_bwd_cpu_kernel<scalar_t>(grad.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(),
                                       grad_planes.mutable_data_ptr<scalar_t>(),
                                       partial.mutable_data_ptr<at::opmath_type<scalar_t>>(), B, H, W, T, D, relu);
  });
  return {grad_planes, partial.sum(0)};
}

}  // namespace
}  // namespace spvit

TORCH_LIBRARY_FRAGMENT(spvit, m) {
  m.def("shift_sum(Tensor planes, Tensor? bias, int H, int W, bool relu) -> Tensor");
  m.def("shift_sum_backward(Tensor grad_out, Tensor out, int H, int W, int T, bool relu) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(spvit, CPU, m) {
  m.impl("shift_sum", &spvit::shift_sum_cpu);
  m.impl("shift_sum_backward", &spvit::shift_sum_backward_cpu);
}
