// The vector layer of one kernel variant: included by variant_body.inc inside its namespace and
// target region, once per variant, with FUSEDVLM_AVX512 or FUSEDVLM_AVX2 (or neither) set by the
// variant's translation unit (variant.h explains why the ISA comes from there and not from -m
// flags). No include guard: each variant translation unit includes it once.
//
// vfloat is the variant's widest float vector, for hand-tiled register kernels: AVX-512 (32
// registers), AVX2 with FMA (16 registers), else GCC's generic four-lane vectors (any
// architecture; SSE2 on x86-64, where the compiler also picks the instructions).
#if FUSEDVLM_AVX512
using vfloat = __m512;
constexpr int64_t kLanes = 16;
constexpr int kVectorRegisters = 32;
inline vfloat vzero() { return _mm512_setzero_ps(); }
inline vfloat vset(float x) { return _mm512_set1_ps(x); }
inline vfloat vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vfloat x) { _mm512_storeu_ps(p, x); }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm512_fmadd_ps(a, b, c); }
inline vfloat vmul(vfloat a, vfloat b) { return _mm512_mul_ps(a, b); }
inline vfloat vadd(vfloat a, vfloat b) { return _mm512_add_ps(a, b); }
inline vfloat vsub(vfloat a, vfloat b) { return _mm512_sub_ps(a, b); }
inline vfloat vdiv(vfloat a, vfloat b) { return _mm512_div_ps(a, b); }
inline float vsum(vfloat a) { return _mm512_reduce_add_ps(a); }
// kLanes weights as fp32: bf16 is the top half of an fp32, fp16 converts in one instruction.
inline vfloat vload(const c10::BFloat16* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
inline vfloat vload(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
// int8 sign-extended to int32, then converted: the matvec applies the row's scale once, after the sum.
inline vfloat vload(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#elif FUSEDVLM_AVX2
using vfloat = __m256;
constexpr int64_t kLanes = 8;
constexpr int kVectorRegisters = 16;
inline vfloat vzero() { return _mm256_setzero_ps(); }
inline vfloat vset(float x) { return _mm256_set1_ps(x); }
inline vfloat vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vfloat x) { _mm256_storeu_ps(p, x); }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm256_fmadd_ps(a, b, c); }
inline vfloat vmul(vfloat a, vfloat b) { return _mm256_mul_ps(a, b); }
inline vfloat vadd(vfloat a, vfloat b) { return _mm256_add_ps(a, b); }
inline vfloat vsub(vfloat a, vfloat b) { return _mm256_sub_ps(a, b); }
inline vfloat vdiv(vfloat a, vfloat b) { return _mm256_div_ps(a, b); }
inline float vsum(vfloat v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline vfloat vload(const c10::BFloat16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline vfloat vload(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline vfloat vload(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
#else
typedef float vfloat __attribute__((vector_size(16)));
constexpr int64_t kLanes = 4;
constexpr int kVectorRegisters = 16;
inline vfloat vzero() { return vfloat{}; }
inline vfloat vset(float x) { return vfloat{} + x; }
inline vfloat vload(const float* p) { vfloat x; std::memcpy(&x, p, sizeof(x)); return x; }
inline void vstore(float* p, vfloat x) { std::memcpy(p, &x, sizeof(x)); }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return a * b + c; }
inline vfloat vmul(vfloat a, vfloat b) { return a * b; }
inline vfloat vadd(vfloat a, vfloat b) { return a + b; }
inline vfloat vsub(vfloat a, vfloat b) { return a - b; }
inline vfloat vdiv(vfloat a, vfloat b) { return a / b; }
inline float vsum(vfloat a) { return (a[0] + a[1]) + (a[2] + a[3]); }
template <typename T>
inline vfloat vload(const T* p) {
  return vfloat{static_cast<float>(p[0]), static_cast<float>(p[1]), static_cast<float>(p[2]), static_cast<float>(p[3])};
}
#endif

#if FUSEDVLM_AVX512
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

// exp_approx on every lane.
inline vfloat vexp(vfloat x) { return exp16(x); }

inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

// row[j] = exp(row[j] - base) for j < n; returns the sum. NaN propagates, the max of a row is
// taken by the caller with NaN ignored, so a NaN score makes its row's sum NaN.
inline float exp_sub_sum(float* row, int64_t n, float base) {
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

// max(init, row[0..n)) ignoring NaN entries.
inline float row_max(const float* row, int64_t n, float init) {
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
#if FUSEDVLM_AVX2
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
// exp_approx on every lane.
inline vfloat vexp(vfloat x) { return exp8(x); }
#else
// exp_approx lane by lane.
inline vfloat vexp(vfloat x) {
  for (int i = 0; i < kLanes; ++i) x[i] = exp_approx(x[i]);
  return x;
}
#endif

// row[j] = exp(row[j] - base) for j < n; returns the sum. NaN propagates, the max of a row is
// taken by the caller with NaN ignored, so a NaN score makes its row's sum NaN.
inline float exp_sub_sum(float* row, int64_t n, float base) {
  int64_t j = 0;
  float sum = 0.0f;
#if FUSEDVLM_AVX2
  const __m256 b = _mm256_set1_ps(base);
  __m256 acc = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), b));
    _mm256_storeu_ps(row + j, p);
    acc = _mm256_add_ps(acc, p);
  }
  sum = vsum(acc);
#endif
  for (; j < n; ++j) {
    row[j] = exp_approx(row[j] - base);
    sum += row[j];
  }
  return sum;
}

// max(init, row[0..n)) ignoring NaN entries.
inline float row_max(const float* row, int64_t n, float init) {
  int64_t j = 0;
  float mx = init;
#if FUSEDVLM_AVX2
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
#endif
