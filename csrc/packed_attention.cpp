// Packed (varlen) block-diagonal attention on the CPU, forward and backward, one call per pack.
//
// Forward: work units (a short segment with all its heads, else a segment and one key/value
// head, cut into row ranges when there are too few) are handed out largest first to the
// threads. A unit packs its keys transposed and its values contiguously once (the pack's rows
// are H * D apart), then runs blocks of queries through register-tiled AVX-512 / AVX2 kernels:
// S = scale Q K^T, the flash-attention online softmax over key chunks, O += P V. Both kernels
// follow the causal staircase (bottom-right: query i of Lq sees keys j <= i + Lk - Lq) one tile
// of rows at a time, so the diagonal costs half a tile per row tile rather than half a block.
// The backward runs one item per (segment, key/value head) through SGEMMs on the packed
// tensors in place: it owns dK, dV of that head and dQ of the G query heads that read it, so no
// two threads write the same row.
//
// Semantics shared with the Triton kernels and the torch path: any finite scale (zero and
// negative included) gives softmax(scale q k^T); a NaN anywhere in a row's inputs gives NaN in
// that row (the running max ignores NaN, exp does not); a query row with no key at all (only
// possible without causality) gives 0 and a log-sum-exp of +inf.
#include "common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <string>
#include <vector>

namespace fusedvlm {
namespace {

// Backward query block and key chunk: small for short segments (less causal waste, more items
// to share between threads), large for long ones (fewer, larger SGEMMs).
constexpr int64_t kBlockM = 128;
constexpr int64_t kBlockN = 512;
inline int64_t block_m(int64_t lq) { return lq >= 512 ? 128 : 64; }
inline int64_t block_n(int64_t lk) { return lk >= 1024 ? 512 : 256; }

struct Geometry {
  std::vector<int64_t> cq, ck;  // offsets on the host (the tensors live on the CPU already)
  int64_t hq, hkv, group, d;
};

std::vector<int64_t> offsets(const at::Tensor& cu, int64_t total, const char* name) {
  TORCH_CHECK_VALUE(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.numel() >= 1,
                    name, " must be a 1-D int32 tensor of n + 1 >= 1 offsets, got ", cu.scalar_type(), " ", cu.sizes());
  auto c = cu.contiguous();
  const int32_t* p = c.data_ptr<int32_t>();
  std::vector<int64_t> out(p, p + c.numel());
  TORCH_CHECK_VALUE(out[0] == 0, name, "[0] must be 0, got ", out[0]);
  for (size_t i = 1; i < out.size(); ++i)
    TORCH_CHECK_VALUE(out[i] >= out[i - 1], name, " must be non-decreasing, got ", join(out));
  TORCH_CHECK_VALUE(out.back() == total, name, "[-1] = ", out.back(), " but the tensor has ", total, " tokens");
  return out;
}

Geometry geometry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_q, const at::Tensor& cu_k, bool causal) {
  Geometry g;
  g.cq = offsets(cu_q, q.size(0), "cu_seqlens_q");
  g.ck = offsets(cu_k, k.size(0), "cu_seqlens_k");
  TORCH_CHECK_VALUE(g.cq.size() == g.ck.size(), "cu_seqlens_q has ", g.cq.size() - 1, " segments, cu_seqlens_k ",
                    g.ck.size() - 1, "; they must match");
  if (causal) {
    for (size_t s = 0; s + 1 < g.cq.size(); ++s) {
      int64_t lq = g.cq[s + 1] - g.cq[s], lk = g.ck[s + 1] - g.ck[s];
      TORCH_CHECK_VALUE(lk >= lq, "segment ", s, ": ", lk, " keys < ", lq,
                        " queries; a causal segment needs len_k >= len_q");
    }
  }
  g.hq = q.size(1);
  g.hkv = k.size(1);
  g.group = g.hq / g.hkv;
  g.d = q.size(2);
  return g;
}

// Keys a query row sees in its segment: [0, limit) with limit = row + 1 + shift when causal.
inline int64_t key_limit(bool causal, int64_t row, int64_t shift, int64_t lk) {
  return causal ? std::min(lk, row + 1 + shift) : lk;
}

}  // namespace

namespace {

// Forward register tiles: kTileR query rows x kTileC vectors of columns (scores) or of the
// head dimension (P V): 16 accumulators and their operands in AVX-512's 32 registers (AVX2,
// with 16, spills some: slower, same results).
constexpr int64_t kTileR = 4;
constexpr int64_t kTileC = 4;
// Query rows per block (its Q, running max / sum and output accumulator stay in L1), keys per
// online-softmax chunk (the block's score rows, kFwdRows x kFwdKeys, stay in L2) and keys per
// pass of the P V kernel (their V rows stay in L1 while every row tile of the block reads them).
constexpr int64_t kFwdRows = 64;
constexpr int64_t kFwdKeys = 512;
constexpr int64_t kPvKeys = 128;
static_assert(kFwdKeys % (kTileC * 16) == 0 && kPvKeys % 16 == 0, "chunks hold whole column tiles");

// s[R x C*kLanes] = scale * q[R x d] kt[d x C*kLanes] (kt: K transposed, row stride ldt).
template <int R, int C>
void qk_tile(const float* q, int64_t d, const float* kt, int64_t ldt, float scale, float* s, int64_t lds) {
  vfloat acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = vzero();
  for (int64_t e = 0; e < d; ++e) {
    vfloat kv[C];
    for (int c = 0; c < C; ++c) kv[c] = vload(kt + e * ldt + c * kLanes);
    for (int r = 0; r < R; ++r) {
      const vfloat b = vset(q[r * d + e]);
      for (int c = 0; c < C; ++c) acc[r][c] = vfma(b, kv[c], acc[r][c]);
    }
  }
  // Scaling the scores rather than q keeps a NaN or inf in q * k NaN under a zero scale.
  const vfloat sc = vset(scale);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) vstore(s + r * lds + c * kLanes, vmul(acc[r][c], sc));
}

// o[R x C*kLanes] += p[R x n] v[n x C*kLanes].
template <int R, int C>
void pv_tile(const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t n, float* o, int64_t ldo) {
  vfloat acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = vload(o + r * ldo + c * kLanes);
  for (int64_t j = 0; j < n; ++j) {
    vfloat vv[C];
    for (int c = 0; c < C; ++c) vv[c] = vload(v + j * ldv + c * kLanes);
    for (int r = 0; r < R; ++r) {
      const vfloat b = vset(p[r * ldp + j]);
      for (int c = 0; c < C; ++c) acc[r][c] = vfma(b, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) vstore(o + r * ldo + c * kLanes, acc[r][c]);
}

// Every tile shape up to kTileR x kTileC, indexed [rows - 1][vectors - 1].
using QkFn = void (*)(const float*, int64_t, const float*, int64_t, float, float*, int64_t);
using PvFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t);
static_assert(kTileR == 4 && kTileC == 4, "the tables below list every tile shape");
constexpr QkFn kQk[kTileR][kTileC] = {{&qk_tile<1, 1>, &qk_tile<1, 2>, &qk_tile<1, 3>, &qk_tile<1, 4>},
                                      {&qk_tile<2, 1>, &qk_tile<2, 2>, &qk_tile<2, 3>, &qk_tile<2, 4>},
                                      {&qk_tile<3, 1>, &qk_tile<3, 2>, &qk_tile<3, 3>, &qk_tile<3, 4>},
                                      {&qk_tile<4, 1>, &qk_tile<4, 2>, &qk_tile<4, 3>, &qk_tile<4, 4>}};
constexpr PvFn kPv[kTileR][kTileC] = {{&pv_tile<1, 1>, &pv_tile<1, 2>, &pv_tile<1, 3>, &pv_tile<1, 4>},
                                      {&pv_tile<2, 1>, &pv_tile<2, 2>, &pv_tile<2, 3>, &pv_tile<2, 4>},
                                      {&pv_tile<3, 1>, &pv_tile<3, 2>, &pv_tile<3, 3>, &pv_tile<3, 4>},
                                      {&pv_tile<4, 1>, &pv_tile<4, 2>, &pv_tile<4, 3>, &pv_tile<4, 4>}};

// Prefetches n floats from p into L1. The packing loops read row after row of the pack, each
// row (all heads) on its own page, where the hardware prefetchers restart and lag: a row is
// requested a few rows ahead instead.
inline void prefetch_floats(const float* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < n * 4; b += 64) __builtin_prefetch(c + b, 0, 3);
}
constexpr int64_t kRowsAhead = 4;

// For each of `heads` heads (src + h * d, dst + h * d * ldt): dst[e * ldt + j] = src[j * lds + e]
// for j < rows, e < d; columns rows..ldt of dst are zeroed. Heads inner, so that a block of rows
// is read once, in address order, whatever the number of heads.
void transpose_rows(const float* src, int64_t lds, int64_t rows, int64_t d, int64_t heads, float* dst, int64_t ldt) {
  int64_t j0 = 0;
#ifdef __AVX512F__
  // Sixteen rows at a time, one gather per column: every store fills a whole cache line.
  if (lds * 16 < (int64_t{1} << 31)) {
    const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(static_cast<int32_t>(lds)));
    for (; j0 < rows; j0 += 16) {
      const __mmask16 m = rows - j0 >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (rows - j0)) - 1u);
      for (int64_t j = j0 + 16; j < std::min(rows, j0 + 32); ++j) prefetch_floats(src + j * lds, heads * d);
      for (int64_t h = 0; h < heads; ++h) {
        const float* base = src + j0 * lds + h * d;
        float* out = dst + h * d * ldt + j0;
        for (int64_t e = 0; e < d; ++e)
          _mm512_storeu_ps(out + e * ldt, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, base + e, 4));
      }
    }
  }
#endif
  for (int64_t j = j0; j < rows; ++j)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t e = 0; e < d; ++e) dst[(h * d + e) * ldt + j] = src[j * lds + h * d + e];
  const int64_t done = std::max(j0, rows);
  for (int64_t e = 0; e < heads * d; ++e) std::fill(dst + e * ldt + done, dst + (e + 1) * ldt, 0.0f);
}

// The forward's share of work: query rows [r0, r1) of one segment for the key/value heads
// [kvh, kvh + kvn) and their query heads, whose keys and values it packs once. kvn is 1, or
// every head of a short segment, whose rows the unit then reads and writes whole, in address
// order (per head, a row is D floats H * D apart, a pattern the hardware prefetchers miss).
struct FwdUnit {
  int64_t seg, kvh, kvn, r0, r1;
  double cost;
};

// Segments up to this many keys are one unit (when there are enough of them for the threads):
// their K^T and V for all heads, kept per thread, stay within a few MB.
constexpr int64_t kWholeMaxKeys = 1024;

struct FwdScratch {
  Scratch kt, v, q, s, acc, stats, qall, oall;
};

// Prefetches (into L2), a few cache lines per step, the rows a unit will read, while the unit
// before it computes. Those rows sit at the pack's H * D stride, each on its own 4 KB page,
// where the hardware prefetchers do not follow: fetched on demand, every one costs a DRAM
// latency (about a tenth of the forward's time on a pack of short segments, one unit per head).
class RowPrefetcher {
 public:
  // Lines at most per unit: the next unit's rows share L2 with the current unit's buffers.
  static constexpr int64_t kMaxLines = 4096;

  void start(int64_t steps) {
    int64_t total = 0;
    for (int i = 0; i < n_; ++i) total += s_[i].rows * s_[i].lines;
    rate_ = (std::min(total, kMaxLines) + steps - 1) / std::max<int64_t>(steps, 1);
    left_ = kMaxLines;
  }
  void add(const float* p, int64_t stride, int64_t rows, int64_t floats) {
    if (rows > 0 && floats > 0) s_[n_++] = {reinterpret_cast<const char*>(p), stride * 4, rows, (floats * 4 + 63) / 64};
  }
  void clear() { n_ = cur_ = 0; row_ = line_ = 0; rate_ = 0; }
  void step() {
    for (int64_t k = 0; k < rate_ && cur_ < n_ && left_ > 0; ++k, --left_) {
      const Stream& st = s_[cur_];
      __builtin_prefetch(st.p + row_ * st.stride + line_ * 64, 0, 2);
      if (++line_ == st.lines) {
        line_ = 0;
        if (++row_ == st.rows) row_ = 0, ++cur_;
      }
    }
  }

 private:
  struct Stream {
    const char* p;
    int64_t stride, rows, lines;
  };
  Stream s_[3];
  int n_ = 0, cur_ = 0;
  int64_t row_ = 0, line_ = 0, rate_ = 0, left_ = 0;
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> packed_attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& v_in, const at::Tensor& cu_q,
                                                        const at::Tensor& cu_k, bool causal, double scale_d) {
  const Geometry g = geometry(q_in, k_in, cu_q, cu_k, causal);
  at::Tensor q = as_float(q_in), k = as_float(k_in), v = as_float(v_in);
  const int64_t tq = q.size(0), hq = g.hq, hkv = g.hkv, d = g.d, group = g.group;
  at::Tensor out = pooled_empty(q.sizes());
  at::Tensor lse = at::empty({hq, tq}, q.options());
  const float scale = static_cast<float>(scale_d);
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float *op = out.data_ptr<float>(), *lp = lse.data_ptr<float>();
  const int64_t n_seg = static_cast<int64_t>(g.cq.size()) - 1;
  const int64_t dp = round_up(d, kLanes);

  // Keys seen by rows [a, b) of a segment, summed: the work of a unit.
  auto cost = [&](int64_t seg, int64_t a, int64_t b) {
    const int64_t lq = g.cq[seg + 1] - g.cq[seg], lk = g.ck[seg + 1] - g.ck[seg];
    if (!causal) return static_cast<double>(b - a) * lk;
    double c = 0;
    for (int64_t r = a; r < b; ++r) c += key_limit(true, r, lk - lq, lk);
    return c;
  };
  // A short segment is one unit when there are enough to share between the threads; else one
  // unit per (segment, kv head), and when even those are too few, each is cut into row ranges
  // of about equal work (a range repacks the keys it needs).
  const int64_t threads = at::get_num_threads();
  const int64_t pairs = n_seg * hkv;
  const int64_t parts = pairs >= 4 * threads ? 1 : (4 * threads + std::max<int64_t>(pairs, 1) - 1) / std::max<int64_t>(pairs, 1);
  std::vector<FwdUnit> units;
  double total_cost = 0;
  for (int64_t s = 0; s < n_seg; ++s) {
    const int64_t lq = g.cq[s + 1] - g.cq[s], lk = g.ck[s + 1] - g.ck[s];
    if (lq == 0) continue;
    const double whole = cost(s, 0, lq);
    total_cost += whole * hkv;
    if (n_seg >= 4 * threads && lk <= kWholeMaxKeys) {
      units.push_back({s, 0, hkv, 0, lq, whole * hkv});
      continue;
    }
    std::vector<int64_t> cuts{0};
    if (parts > 1) {
      // Cut at kFwdRows boundaries once a part has its share of the work.
      double acc = 0;
      for (int64_t r = 0; r < lq; r += kFwdRows) {
        acc += cost(s, r, std::min(lq, r + kFwdRows));
        if (acc >= whole / parts * static_cast<double>(cuts.size()) && r + kFwdRows < lq) cuts.push_back(r + kFwdRows);
      }
    }
    cuts.push_back(lq);
    for (int64_t h = 0; h < hkv; ++h)
      for (size_t c = 0; c + 1 < cuts.size(); ++c) units.push_back({s, h, 1, cuts[c], cuts[c + 1], cost(s, cuts[c], cuts[c + 1])});
  }
  // Largest first, handed out one at a time: the threads finish together.
  std::stable_sort(units.begin(), units.end(), [](const FwdUnit& a, const FwdUnit& b) { return a.cost > b.cost; });

  auto prefetch = [&](const FwdUnit& u, RowPrefetcher& pf, int64_t steps) {
    pf.clear();
    // A whole segment is read in address order, which the hardware prefetchers follow.
    if (u.kvn > 1) return;
    const int64_t q0 = g.cq[u.seg], k0 = g.ck[u.seg], lk = g.ck[u.seg + 1] - k0;
    const int64_t n_keys = key_limit(causal, u.r1 - 1, lk - (g.cq[u.seg + 1] - q0), lk);
    // The G query heads of a key/value head are adjacent: one run of G * D floats per row.
    pf.add(qp + ((q0 + u.r0) * hq + u.kvh * group) * d, hq * d, u.r1 - u.r0, group * d);
    pf.add(kp + (k0 * hkv + u.kvh) * d, hkv * d, n_keys, d);
    pf.add(vp + (k0 * hkv + u.kvh) * d, hkv * d, n_keys, d);
    pf.start(steps);
  };

  auto run_unit = [&](const FwdUnit& u, FwdScratch& sc, RowPrefetcher& pf) {
    const int64_t q0 = g.cq[u.seg], lq = g.cq[u.seg + 1] - q0, k0 = g.ck[u.seg], lk = g.ck[u.seg + 1] - k0;
    const int64_t shift = lk - lq;
    const int64_t n_keys = key_limit(causal, u.r1 - 1, shift, lk);
    const bool all = u.kvn > 1;
    const int64_t kv_lo = u.kvh, kv_n = u.kvn, h_lo = kv_lo * group, hn = kv_n * group;
    // K transposed (d x ldt) and V (n_keys x dp) of each key/value head, contiguous: the tiles
    // read them with unit stride instead of the pack's H * D, and pad columns are zero so every
    // tile is whole.
    const int64_t ldt = round_up(std::max<int64_t>(n_keys, 1), kTileC * kLanes);
    const int64_t ldv = std::max<int64_t>(n_keys, 1) * dp;
    float* kt = sc.kt.get(kv_n * d * ldt);
    float* vb = sc.v.get(kv_n * ldv);
    transpose_rows(kp + (k0 * hkv + kv_lo) * d, hkv * d, n_keys, d, kv_n, kt, ldt);
    for (int64_t j = 0; j < n_keys; ++j) {
      const float* vs = vp + ((k0 + j) * hkv + kv_lo) * d;
      if (j + kRowsAhead < n_keys) prefetch_floats(vs + kRowsAhead * hkv * d, kv_n * d);
      for (int64_t c = 0; c < kv_n; ++c) {
        float* vd = vb + c * ldv + j * dp;
        std::memcpy(vd, vs + c * d, d * sizeof(float));
        std::fill(vd + d, vd + dp, 0.0f);
      }
    }
    // A whole segment's queries and outputs go through per-head staging, filled and emptied
    // row by row; a (segment, kv head) unit reads and writes the pack in place.
    float* qs = nullptr;
    float* os = nullptr;
    if (all) {
      qs = sc.qall.get(hn * lq * d);
      os = sc.oall.get(hn * lq * d);
      for (int64_t i = 0; i < lq; ++i) {
        if (i + kRowsAhead < lq) prefetch_floats(qp + ((q0 + i + kRowsAhead) * hq + h_lo) * d, hn * d);
        for (int64_t c = 0; c < hn; ++c) std::memcpy(qs + (c * lq + i) * d, qp + ((q0 + i) * hq + h_lo + c) * d, d * sizeof(float));
      }
    }
    auto q_row = [&](int64_t h, int64_t r) { return all ? qs + ((h - h_lo) * lq + r) * d : qp + ((q0 + r) * hq + h) * d; };
    auto o_row = [&](int64_t h, int64_t r) { return all ? os + ((h - h_lo) * lq + r) * d : op + ((q0 + r) * hq + h) * d; };

    float* qb = sc.q.get(kFwdRows * d);
    float* sb = sc.s.get(kFwdRows * kFwdKeys);
    float* acc = sc.acc.get(kFwdRows * dp);
    float* m = sc.stats.get(2 * kFwdRows);
    float* l = m + kFwdRows;
    std::array<int64_t, kFwdRows / kTileR> lim;
    for (int64_t h = kv_lo * group; h < (kv_lo + kv_n) * group; ++h) {
      const float* ktb = kt + (h / group - kv_lo) * d * ldt;
      const float* vbb = vb + (h / group - kv_lo) * ldv;
      for (int64_t r0 = u.r0; r0 < u.r1; r0 += kFwdRows) {
        const int64_t bm = std::min(kFwdRows, u.r1 - r0), n_tiles = (bm + kTileR - 1) / kTileR;
        for (int64_t i = 0; i < bm; ++i) std::memcpy(qb + i * d, q_row(h, r0 + i), d * sizeof(float));
        std::fill(acc, acc + bm * dp, 0.0f);
        std::fill(m, m + bm, -kInf);
        std::fill(l, l + bm, 0.0f);
        const int64_t hi = key_limit(causal, r0 + bm - 1, shift, lk);
        for (int64_t c0 = 0; c0 < hi; c0 += kFwdKeys) {
          const int64_t cn = std::min(kFwdKeys, hi - c0);
          // Keys of this chunk seen by the last row of each row tile: the causal staircase, so
          // that the diagonal costs about half a tile per row tile rather than half a block.
          for (int64_t t = 0; t < n_tiles; ++t) {
            const int64_t last = std::min(bm, (t + 1) * kTileR) - 1;
            lim[t] = std::clamp<int64_t>(key_limit(causal, r0 + last, shift, lk) - c0, 0, cn);
          }
          // Scores, column tile outer: its K^T panel stays in L1 while the row tiles pass.
          for (int64_t j0 = 0; j0 < cn; j0 += kTileC * kLanes) {
            for (int64_t t = 0; t < n_tiles; ++t) {
              if (lim[t] <= j0) continue;
              const int64_t rows = std::min(kTileR, bm - t * kTileR);
              const int64_t vecs = std::min(kTileC, (lim[t] - j0 + kLanes - 1) / kLanes);
              kQk[rows - 1][vecs - 1](qb + t * kTileR * d, d, ktb + c0 + j0, ldt, scale,
                                                     sb + t * kTileR * kFwdKeys + j0, kFwdKeys);
            }
          }
          for (int64_t i = 0; i < bm; ++i) {
            float* row = sb + i * kFwdKeys;
            const int64_t vis = std::clamp<int64_t>(key_limit(causal, r0 + i, shift, lk) - c0, 0, cn);
            const float mx = row_max(row, vis, m[i]);
            // A row that has seen no visible key keeps m = -inf; shift by 0 to avoid inf - inf.
            const float base = mx == -kInf ? 0.0f : mx;
            const float sum = exp_sub_sum(row, vis, base);
            // Its tile's P V reads up to the tile's last row: past this row's limit P is 0
            // (set, not computed: a score there may be NaN from a key this row must not see).
            std::fill(row + vis, row + lim[i / kTileR], 0.0f);
            pf.step();
            const float a = exp_approx(m[i] - base);
            l[i] = l[i] * a + sum;
            m[i] = mx;
            if (a != 1.0f) {
              float* ar = acc + i * dp;
              for (int64_t e = 0; e < dp; ++e) ar[e] *= a;
            }
          }
          for (int64_t j0 = 0; j0 < cn; j0 += kPvKeys) {
            for (int64_t t = 0; t < n_tiles; ++t) {
              if (lim[t] <= j0) continue;
              const int64_t rows = std::min(kTileR, bm - t * kTileR), n = std::min(kPvKeys, lim[t] - j0);
              for (int64_t e0 = 0; e0 < dp; e0 += kTileC * kLanes) {
                const int64_t vecs = std::min(kTileC, (dp - e0) / kLanes);
                kPv[rows - 1][vecs - 1](sb + t * kTileR * kFwdKeys + j0, kFwdKeys,
                                                       vbb + (c0 + j0) * dp + e0, dp, n, acc + t * kTileR * dp + e0, dp);
              }
            }
          }
        }
        for (int64_t i = 0; i < bm; ++i) {
          const int64_t row = q0 + r0 + i;
          float* o = o_row(h, r0 + i);
          const float li = l[i];
          // No key at all (non-causal, empty key segment): output 0, lse +inf (exp(s - lse) = 0).
          if (li == 0.0f) {
            std::fill(o, o + d, 0.0f);
            lp[h * tq + row] = kInf;
          } else {
            const float inv = 1.0f / li;
            const float* ar = acc + i * dp;
            for (int64_t e = 0; e < d; ++e) o[e] = ar[e] * inv;
            lp[h * tq + row] = m[i] + std::log(li);
          }
        }
      }
    }
    if (all)
      for (int64_t i = 0; i < lq; ++i)
        for (int64_t c = 0; c < hn; ++c) std::memcpy(op + ((q0 + i) * hq + h_lo + c) * d, os + (c * lq + i) * d, d * sizeof(float));
  };

  const int64_t n_units = static_cast<int64_t>(units.size());
  std::atomic<int64_t> next{0};
  auto worker = [&](int64_t, int64_t) {
    static thread_local FwdScratch sc;
    RowPrefetcher pf;
    // The unit after this one is claimed ahead, so that its rows can be prefetched meanwhile.
    for (int64_t it = next++, nxt = next++; it < n_units; it = nxt, nxt = next++) {
      const FwdUnit& u = units[it];
      pf.clear();
      if (nxt < n_units) prefetch(units[nxt], pf, group * (u.r1 - u.r0));
      run_unit(u, sc, pf);
    }
  };
  // A tiny pack runs on the calling thread: waking the pool costs more than the work.
  if (total_cost * group * d < (1 << 20) || threads == 1)
    worker(0, 1);
  else
    at::parallel_for(0, threads, 1, worker);
  return {out.to(q_in.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> packed_attention_bwd(
    const at::Tensor& do_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& cu_q, const at::Tensor& cu_k, bool causal,
    double scale_d) {
  const Geometry g = geometry(q_in, k_in, cu_q, cu_k, causal);
  at::Tensor q = as_float(q_in), k = as_float(k_in), v = as_float(v_in), dout = as_float(do_in),
             o = as_float(out_in), lse = as_float(lse_in);
  const int64_t tq = q.size(0), hq = g.hq, hkv = g.hkv, d = g.d, group = g.group;
  at::Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  const float scale = static_cast<float>(scale_d);
  const int64_t ldq = hq * d, ldk = hkv * d;
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>(),
              *dop = dout.data_ptr<float>(), *opp = o.data_ptr<float>(), *lp = lse.data_ptr<float>();
  float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  const int64_t n_seg = static_cast<int64_t>(g.cq.size()) - 1;

  const int64_t grain = tq * d * hq < (1 << 15) ? std::max<int64_t>(n_seg * hkv, 1) : 1;
  at::parallel_for(0, n_seg * hkv, grain, [&](int64_t begin, int64_t end) {
    // Kept per thread: fresh buffers of this size would be new pages on every call.
    static thread_local Scratch pscratch, dpscratch, rowscratch;
    float* pbuf = pscratch.get(kBlockM * kBlockN);
    float* dpbuf = dpscratch.get(kBlockM * kBlockN);
    float* delta = rowscratch.get(2 * kBlockM);
    float* lrow = delta + kBlockM;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t seg = it / hkv, kvh = it % hkv;
      const int64_t q0 = g.cq[seg], lq = g.cq[seg + 1] - q0, k0 = g.ck[seg], lk = g.ck[seg + 1] - k0;
      const int64_t shift = lk - lq;
      const float* kb = kp + (k0 * hkv + kvh) * d;
      const float* vb = vp + (k0 * hkv + kvh) * d;
      float* dkb = dkp + (k0 * hkv + kvh) * d;
      float* dvb = dvp + (k0 * hkv + kvh) * d;
      for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
        const int64_t bm_max = block_m(lq), bn = block_n(lk);
        for (int64_t r0 = 0; r0 < lq; r0 += bm_max) {
          const int64_t bm = std::min(bm_max, lq - r0);
          const int64_t base = (q0 + r0) * hq + h;
          const float* qb = qp + base * d;
          const float* dob = dop + base * d;
          float* dqb = dqp + base * d;
          for (int64_t i = 0; i < bm; ++i) {
            const float* a = dob + i * ldq;
            const float* b = opp + (base + i * hq) * d;
            float s = 0.0f;
            for (int64_t e = 0; e < d; ++e) s += a[e] * b[e];
            delta[i] = s;
            lrow[i] = lp[h * tq + q0 + r0 + i];
          }
          const int64_t hi = key_limit(causal, r0 + bm - 1, shift, lk);
          for (int64_t c0 = 0; c0 < hi; c0 += bn) {
            const int64_t cn = std::min(bn, hi - c0);
            float* p = pbuf;
            float* dp = dpbuf;
            gemm(false, true, bm, cn, d, scale, qb, ldq, kb + c0 * ldk, ldk, 0.0f, p, bn);
            gemm(false, true, bm, cn, d, 1.0f, dob, ldq, vb + c0 * ldk, ldk, 0.0f, dp, bn);
            for (int64_t i = 0; i < bm; ++i) {
              float* pr = p + i * bn;
              float* dpr = dp + i * bn;
              const int64_t vis = std::max<int64_t>(0, std::min(cn, key_limit(causal, r0 + i, shift, lk) - c0));
              const float di = delta[i];
              exp_sub_sum(pr, vis, lrow[i]);
              for (int64_t j = 0; j < vis; ++j) dpr[j] = pr[j] * (dpr[j] - di);
              // Invisible entries are zeroed, not multiplied: their scores may be NaN.
              for (int64_t j = vis; j < cn; ++j) pr[j] = dpr[j] = 0.0f;
            }
            // dV += P^T dO, dQ += scale dS K, dK += scale dS^T Q.
            gemm(true, false, cn, d, bm, 1.0f, p, bn, dob, ldq, 1.0f, dvb + c0 * ldk, ldk);
            gemm(false, false, bm, d, cn, scale, dp, bn, kb + c0 * ldk, ldk, 1.0f, dqb, ldq);
            gemm(true, false, cn, d, bm, scale, dp, bn, qb, ldq, 1.0f, dkb + c0 * ldk, ldk);
          }
        }
      }
    }
  });
  return {dq.to(q_in.scalar_type()), dk.to(k_in.scalar_type()), dv.to(v_in.scalar_type())};
}

}  // namespace fusedvlm
