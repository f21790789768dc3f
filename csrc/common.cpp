#include "common.h"

#include <dlfcn.h>

#include <mutex>
#include <utility>

namespace fusedvlm {

// libtorch_cpu is loaded RTLD_LOCAL by Python, so its BLAS is found through the library that
// holds a known ATen symbol rather than the global namespace.
void* libtorch_symbol(const char* name) {
  Dl_info info;
  if (!dladdr(reinterpret_cast<void*>(&at::get_num_threads), &info) || info.dli_fname == nullptr) return nullptr;
  void* handle = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
  return handle == nullptr ? nullptr : dlsym(handle, name);
}

namespace {

using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                          const int*, const float*, const int*, const float*, float*, const int*);

sgemm_fn sgemm_ptr() {
  static const sgemm_fn fn = reinterpret_cast<sgemm_fn>(libtorch_symbol("sgemm_"));
  return fn;
}

}  // namespace

bool have_blas() { return sgemm_ptr() != nullptr; }

namespace {

// Freed output buffers, reused by the next output that fits (up to twice its size). Bounded by
// entries and by bytes held (memory torch's allocator statistics do not see); a buffer returned
// to a full pool is freed. Never destroyed: a tensor may be freed after static destructors have run.
struct OutputPool {
  static constexpr size_t kMinBytes = size_t{1} << 20;
  static constexpr size_t kMaxEntries = 4;
  static constexpr size_t kMaxBytes = size_t{128} << 20;
  std::mutex mu;
  std::vector<std::pair<void*, size_t>> free;
  size_t held = 0;
};

OutputPool& output_pool() {
  static OutputPool* pool = new OutputPool();
  return *pool;
}

void pool_release(void* p, size_t bytes) {
  OutputPool& pool = output_pool();
  {
    std::lock_guard<std::mutex> lock(pool.mu);
    if (pool.free.size() < OutputPool::kMaxEntries && pool.held + bytes <= OutputPool::kMaxBytes) {
      pool.free.emplace_back(p, bytes);
      pool.held += bytes;
      return;
    }
  }
  std::free(p);
}

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes) {
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t need = static_cast<size_t>(numel) * sizeof(float);
  if (need < OutputPool::kMinBytes) return at::empty(sizes, opts);
  OutputPool& pool = output_pool();
  void* p = nullptr;
  size_t bytes = 0;
  {
    std::lock_guard<std::mutex> lock(pool.mu);
    auto best = pool.free.end();
    for (auto it = pool.free.begin(); it != pool.free.end(); ++it)
      if (it->second >= need && it->second <= 2 * need && (best == pool.free.end() || it->second < best->second)) best = it;
    if (best != pool.free.end()) {
      p = best->first;
      bytes = best->second;
      pool.held -= bytes;
      pool.free.erase(best);
    }
  }
  if (p == nullptr) {
    bytes = (need + 4095) / 4096 * 4096;
    p = std::aligned_alloc(4096, bytes);
    TORCH_CHECK(p != nullptr, "fusedvlm: could not allocate ", bytes, " bytes for an output");
  }
  return at::from_blob(p, sizes, [bytes](void* q) { pool_release(q, bytes); }, opts);
}

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
    return;
  }
  if (auto fn = sgemm_ptr()) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    fn(&ta, &tb, &mi, &ni, &ki, &alpha, b, &la, a, &lb, &beta, c, &lc);
    return;
  }
  auto opts = at::TensorOptions().dtype(at::kFloat);
  auto view = [&](const float* p, int64_t rows, int64_t cols, int64_t ld, bool t) {
    auto x = at::from_blob(const_cast<float*>(p), {rows, cols}, {ld, 1}, opts);
    return t ? x.t() : x;
  };
  at::Tensor A = view(a, trans_a ? k : m, trans_a ? m : k, lda, trans_a);
  at::Tensor B = view(b, trans_b ? n : k, trans_b ? k : n, ldb, trans_b);
  at::Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  at::addmm_out(C, C, A, B, beta, alpha);
}

}  // namespace fusedvlm
