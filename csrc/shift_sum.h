// Shared helpers of the shift_sum CPU (shift_sum.cpp) and CUDA (cuda/shift_sum.cu) kernels.
//
// Layout (see spvit_kernels/reference.py::shift_sum):
//   planes (B, P, T, D) contiguous, P = H*W row-major, T = 9 taps in DeiT order or T = 1;
//   tap k reads the neighbour at (dy, dx) = (k % 3 - 1, k / 3 - 1); for T = 1 the single tap is the centre.
//   out (B, P, D): out[b, p] = act(sum_k planes[b, p + offset_k, k] + bias), zero outside the H x W grid.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace spvit {

// (dy, dx) of tap k of a T-tap plane tensor.
#if defined(__CUDACC__)
__host__ __device__
#endif
inline void tap_offset(int64_t k, int64_t taps, int64_t& dy, int64_t& dx) {
  if (taps == 1) {
    dy = 0;
    dx = 0;
  } else {
    dy = k % 3 - 1;
    dx = k / 3 - 1;
  }
}

inline void check_shift_sum_args(const at::Tensor& planes, const std::optional<at::Tensor>& bias, int64_t H,
                                 int64_t W) {
  TORCH_CHECK(planes.dim() == 4, "spvit::shift_sum: planes must be (B, P, T, d), got ", planes.sizes());
  TORCH_CHECK(H > 0 && W > 0, "spvit::shift_sum: grid must be positive, got ", H, "x", W);
  TORCH_CHECK(planes.size(1) == H * W, "spvit::shift_sum: planes have ", planes.size(1),
              " positions but the grid ", H, "x", W, " has ", H * W);
  TORCH_CHECK(planes.size(2) == 9 || planes.size(2) == 1, "spvit::shift_sum: expected 9 or 1 taps, got ",
              planes.size(2));
  TORCH_CHECK(at::isFloatingType(planes.scalar_type()), "spvit::shift_sum: planes must be floating point");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == planes.size(3), "spvit::shift_sum: bias must be (d,) = (",
                planes.size(3), ",), got ", bias->sizes());
    TORCH_CHECK(bias->device() == planes.device(), "spvit::shift_sum: bias and planes on different devices");
  }
}

inline void check_shift_sum_backward_args(const at::Tensor& grad_out, const at::Tensor& out, int64_t H, int64_t W,
                                          int64_t T) {
  TORCH_CHECK(grad_out.dim() == 3, "spvit::shift_sum_backward: grad_out must be (B, P, d), got ", grad_out.sizes());
  TORCH_CHECK(grad_out.sizes() == out.sizes(), "spvit::shift_sum_backward: grad_out ", grad_out.sizes(),
              " and out ", out.sizes(), " differ in shape");
  TORCH_CHECK(grad_out.device() == out.device(), "spvit::shift_sum_backward: grad_out and out on different devices");
  TORCH_CHECK(grad_out.size(1) == H * W, "spvit::shift_sum_backward: ", grad_out.size(1),
              " positions but the grid has ", H * W);
  TORCH_CHECK(T == 9 || T == 1, "spvit::shift_sum_backward: expected 9 or 1 taps, got ", T);
  TORCH_CHECK(at::isFloatingType(grad_out.scalar_type()), "spvit::shift_sum_backward: grad_out must be floating");
}

// dtype of the bias gradient: accumulated in float (double for double inputs).
inline at::ScalarType bias_grad_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace spvit
