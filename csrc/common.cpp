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

#ifdef __AVX512F__
namespace {

// exp_approx on sixteen lanes (the same Cephes polynomial as exp8 and exp_approx).
inline __m512 exp16(__m512 x) {
  const __m512 hi = _mm512_set1_ps(88.72283f), lo = _mm512_set1_ps(-87.33654f);
  const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
  const __m512 fx = _mm512_roundscale_ps(_mm512_fmadd_ps(xc, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                         _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fmadd_ps(fx, _mm512_set1_ps(2.12194440e-4f), r);
  const __m512 r2 = _mm512_mul_ps(r, r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_add_ps(_mm512_fmadd_ps(y, r2, r), _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(fx), _mm512_set1_epi32(127)), 23);
  __m512 res = _mm512_mul_ps(y, _mm512_castsi512_ps(e));
  res = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), res, _mm512_setzero_ps());
  res = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, hi, _CMP_GT_OQ), res, _mm512_set1_ps(kInf));
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), res, x);
}

inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

}  // namespace

float exp_sub_sum(float* row, int64_t n, float base) {
  const __m512 b = _mm512_set1_ps(base);
  __m512 acc = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 p = exp16(_mm512_sub_ps(_mm512_loadu_ps(row + j), b));
    _mm512_storeu_ps(row + j, p);
    acc = _mm512_add_ps(acc, p);
  }
  if (j < n) {
    const __mmask16 m = tail_mask(n - j);
    const __m512 p = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + j), b));
    _mm512_mask_storeu_ps(row + j, m, p);
    acc = _mm512_mask_add_ps(acc, m, acc, p);
  }
  return _mm512_reduce_add_ps(acc);
}

float row_max(const float* row, int64_t n, float init) {
  __m512 acc = _mm512_set1_ps(init);
  int64_t j = 0;
  // max_ps(x, acc) returns acc when x is NaN: NaN entries are skipped.
  for (; j + 16 <= n; j += 16) acc = _mm512_max_ps(_mm512_loadu_ps(row + j), acc);
  if (j < n) {
    const __mmask16 m = tail_mask(n - j);
    acc = _mm512_mask_max_ps(acc, m, _mm512_maskz_loadu_ps(m, row + j), acc);
  }
  return _mm512_reduce_max_ps(acc);
}

#else
#ifdef __AVX2__
namespace {

// exp_approx on eight lanes (the same Cephes polynomial, so both give the same values).
inline __m256 exp8(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.72283f), lo = _mm256_set1_ps(-87.33654f);
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  const __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fmadd_ps(fx, _mm256_set1_ps(2.12194440e-4f), r);
  const __m256 r2 = _mm256_mul_ps(r, r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, r2, r), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  __m256 res = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  res = _mm256_blendv_ps(res, _mm256_setzero_ps(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
  res = _mm256_blendv_ps(res, _mm256_set1_ps(kInf), _mm256_cmp_ps(x, hi, _CMP_GT_OQ));
  return _mm256_blendv_ps(res, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

}  // namespace
#endif

float exp_sub_sum(float* row, int64_t n, float base) {
  int64_t j = 0;
  float sum = 0.0f;
#ifdef __AVX2__
  const __m256 b = _mm256_set1_ps(base);
  __m256 acc = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), b));
    _mm256_storeu_ps(row + j, p);
    acc = _mm256_add_ps(acc, p);
  }
  sum = hsum(acc);
#endif
  for (; j < n; ++j) {
    row[j] = exp_approx(row[j] - base);
    sum += row[j];
  }
  return sum;
}

float row_max(const float* row, int64_t n, float init) {
  int64_t j = 0;
  float mx = init;
#ifdef __AVX2__
  __m256 acc = _mm256_set1_ps(init);
  // max_ps(x, acc) returns acc when x is NaN: NaN entries are skipped.
  for (; j + 8 <= n; j += 8) acc = _mm256_max_ps(_mm256_loadu_ps(row + j), acc);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  for (float l : lanes) mx = l > mx ? l : mx;
#endif
  for (; j < n; ++j) mx = row[j] > mx ? row[j] : mx;
  return mx;
}
#endif  // __AVX512F__

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
