// Shared helpers of the fusedvlm CPU kernels, compiled for the baseline ISA: a raw row-major
// SGEMM, output and scratch buffers, a vectorisable exp (variant.h has the per-ISA parts).
#pragma once

// Only the headers of the ops used: the full torch/extension.h (pybind11 and every operator) is
// included by bindings.cpp alone, which keeps the first build near a minute on two cores.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

namespace fusedvlm {

// Row-major C (m x n, ldc) = alpha * op(A) op(B) + beta * C, float32. op(X) = X^T when trans_x.
// Runs MKL/OpenBLAS sgemm when libtorch exports one (looked up once at load), else at::mm on
// views of the same memory (slower per call, same result).
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

bool have_blas();

// A symbol of the libtorch_cpu this process loaded (its MKL/OpenBLAS entry points), or nullptr.
void* libtorch_symbol(const char* name);

// Prefix psi statistics (csrc/pairwise_cosine.inc): eq, ab, aa, bb, div, each (T,) float32.
using Stats = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// An uninitialised float32 tensor for a kernel's output. Outputs of 1 MiB and more take their
// memory from a small per-process pool that their deleter refills: a pack's output (tens of MB,
// past glibc's mmap threshold) otherwise arrives as fresh pages, whose faults and zeroing cost
// a quarter of the attention forward on a pack of short segments.
at::Tensor pooled_empty(at::IntArrayRef sizes);

// The kernels compute in fp32 on contiguous rows: a no-op for such inputs, one copy otherwise.
inline at::Tensor as_float(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// "torch.bfloat16" for error messages.
inline std::string dtype_name(at::ScalarType t) { return "torch." + std::string(std::get<0>(c10::getDtypeNames(t))); }

// The value of a decode step's position: a one-element integer CPU tensor (a tensor, so that a
// compiled step does not specialise on it); `op` names the caller in the error.
inline int64_t step_position(const at::Tensor& p, const char* op) {
  TORCH_CHECK_VALUE(p.numel() == 1 && at::isIntegralType(p.scalar_type(), /*includeBool=*/false) && p.is_cpu(), op,
                    ": pos must be a one-element integer tensor on the CPU, got ", p.scalar_type(), " of shape ",
                    p.sizes(), " on ", p.device());
  return p.item<int64_t>();
}

// "[0, 3, 5]" for error messages.
inline std::string join(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

constexpr float kInf = std::numeric_limits<float>::infinity();

// Bytes read below which a decode-step kernel (matvec.inc, decode_attention.inc) stays on one
// thread: waking the others costs more.
constexpr int64_t kSerialBytes = int64_t{64} << 10;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// exp(x) to ~1 ulp (Cephes expf), written so that GCC vectorises loops over it. NaN stays NaN,
// -inf gives 0 and +inf gives +inf (the softmax relies on all three).
inline float exp_approx(float x) {
  float xc = x < -87.33654f ? -87.33654f : x;
  xc = xc > 88.72283f ? 88.72283f : xc;
  // floor through an integer conversion, which vectorises (floorf is a libm call without
  // -ffast-math); |xc| < 89 keeps it in range.
  const float t = xc * 1.44269504088896341f + 0.5f;
  int32_t n = static_cast<int32_t>(t);
  n -= static_cast<float>(n) > t ? 1 : 0;
  const float fx = static_cast<float>(n);
  float r = xc - fx * 0.693359375f;
  r = r + fx * 2.12194440e-4f;
  float r2 = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r2 + r + 1.0f;
  int32_t e = (n + 127) << 23;
  float p2;
  std::memcpy(&p2, &e, sizeof(p2));
  float res = y * p2;
  res = x < -87.33654f ? 0.0f : res;
  res = x > 88.72283f ? kInf : res;
  res = x != x ? x : res;
  return res;
}

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// A 64-byte aligned float buffer that only grows. Kept thread_local by the kernels, so that a
// call after the first reuses warm pages instead of faulting in a fresh mmap every time.
class Scratch {
 public:
  Scratch() = default;
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() { std::free(p_); }
  float* get(int64_t n) {
    if (n > n_) {
      std::free(p_);
      n_ = round_up(std::max<int64_t>(n, 1024), 16);
      p_ = static_cast<float*>(std::aligned_alloc(64, n_ * sizeof(float)));
      TORCH_CHECK(p_ != nullptr, "fusedvlm: could not allocate ", n_ * sizeof(float), " bytes of scratch");
    }
    return p_;
  }
  // Gives the memory back when it exceeds `bytes` (a huge call need not pin its buffer forever).
  void release_above(size_t bytes) {
    if (static_cast<size_t>(n_) * sizeof(float) > bytes) {
      std::free(p_);
      p_ = nullptr;
      n_ = 0;
    }
  }

 private:
  float* p_ = nullptr;
  int64_t n_ = 0;
};

}  // namespace fusedvlm
