// Packed (varlen) block-diagonal attention on the CPU, forward and backward, one call per pack.
//
// Work is split into (segment, head, block of queries) items run by at::parallel_for.
// Each item streams its segment's keys in chunks up to its causal limit (bottom-right:
// query i of Lq sees keys j <= i + Lk - Lq) with the flash-attention online softmax: S = scale
// Q K^T and P V are SGEMMs on the packed tensors in place (row stride H * D), so no segment is
// copied, padded or masked beyond its diagonal band. The backward runs one item per (segment,
// key/value head): it owns dK, dV of that head and dQ of the G query heads that read it, so no
// two threads write the same row.
//
// Semantics shared with the Triton kernels and the torch path: any finite scale (zero and
// negative included) gives softmax(scale q k^T); a NaN anywhere in a row's inputs gives NaN in
// that row (the running max ignores NaN, exp does not); a query row with no key at all (only
// possible without causality) gives 0 and a log-sum-exp of +inf.
#include "common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <string>
#include <vector>

namespace fusedvlm {
namespace {

// Query block and key chunk: small for short segments (less causal waste, more items to share
// between threads), large for long ones (fewer, larger SGEMMs and fewer softmax rescales).
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

at::Tensor as_float(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// Keys a query row sees in its segment: [0, limit) with limit = row + 1 + shift when causal.
inline int64_t key_limit(bool causal, int64_t row, int64_t shift, int64_t lk) {
  return causal ? std::min(lk, row + 1 + shift) : lk;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> packed_attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& v_in, const at::Tensor& cu_q,
                                                        const at::Tensor& cu_k, bool causal, double scale_d) {
  const Geometry g = geometry(q_in, k_in, cu_q, cu_k, causal);
  at::Tensor q = as_float(q_in), k = as_float(k_in), v = as_float(v_in);
  const int64_t tq = q.size(0), hq = g.hq, hkv = g.hkv, d = g.d, group = g.group;
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({hq, tq}, q.options());
  const float scale = static_cast<float>(scale_d);
  const int64_t ldq = hq * d, ldk = hkv * d;
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float *op = out.data_ptr<float>(), *lp = lse.data_ptr<float>();

  struct Item { int64_t seg, head, row0; };
  std::vector<Item> items;
  for (int64_t s = 0; s + 1 < static_cast<int64_t>(g.cq.size()); ++s) {
    const int64_t lq = g.cq[s + 1] - g.cq[s];
    for (int64_t h = 0; h < hq; ++h)
      for (int64_t r = 0; r < lq; r += block_m(lq)) items.push_back({s, h, r});
  }

  // A tiny pack runs on the calling thread: waking the pool costs more than the work.
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t grain = tq * d * hq < (1 << 15) ? std::max<int64_t>(n_items, 1) : 1;
  at::parallel_for(0, n_items, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> sbuf(kBlockM * kBlockN), acc(kBlockM * d), m(kBlockM), l(kBlockM), alpha(kBlockM);
    for (int64_t it = begin; it < end; ++it) {
      const Item w = items[it];
      const int64_t q0 = g.cq[w.seg], lq = g.cq[w.seg + 1] - q0, k0 = g.ck[w.seg], lk = g.ck[w.seg + 1] - k0;
      const int64_t shift = lk - lq, bm = std::min(block_m(lq), lq - w.row0), kvh = w.head / group;
      const int64_t bn = block_n(lk);
      const float* qb = qp + ((q0 + w.row0) * hq + w.head) * d;
      const float* kb = kp + (k0 * hkv + kvh) * d;
      const float* vb = vp + (k0 * hkv + kvh) * d;
      std::fill(acc.begin(), acc.begin() + bm * d, 0.0f);
      std::fill(m.begin(), m.end(), -kInf);
      std::fill(l.begin(), l.end(), 0.0f);
      const int64_t hi = key_limit(causal, w.row0 + bm - 1, shift, lk);
      for (int64_t c0 = 0; c0 < hi; c0 += bn) {
        const int64_t cn = std::min(bn, hi - c0);
        float* s = sbuf.data();
        gemm(false, true, bm, cn, d, scale, qb, ldq, kb + c0 * ldk, ldk, 0.0f, s, bn);
        for (int64_t i = 0; i < bm; ++i) {
          float* row = s + i * bn;
          // Columns past this row's causal limit are invisible.
          const int64_t vis = std::max<int64_t>(0, std::min(cn, key_limit(causal, w.row0 + i, shift, lk) - c0));
          for (int64_t j = vis; j < cn; ++j) row[j] = -kInf;
          const float mx = row_max(row, vis, m[i]);
          // A row that has seen no visible key keeps m = -inf; shift by 0 to avoid inf - inf.
          const float base = mx == -kInf ? 0.0f : mx;
          const float sum = exp_sub_sum(row, cn, base);
          const float a = exp_approx(m[i] - base);
          alpha[i] = a;
          l[i] = l[i] * a + sum;
          m[i] = mx;
          float* accr = acc.data() + i * d;
          if (a != 1.0f)
            for (int64_t e = 0; e < d; ++e) accr[e] *= a;
        }
        gemm(false, false, bm, d, cn, 1.0f, s, bn, vb + c0 * ldk, ldk, 1.0f, acc.data(), d);
      }
      for (int64_t i = 0; i < bm; ++i) {
        const int64_t row = q0 + w.row0 + i;
        float* o = op + (row * hq + w.head) * d;
        const float li = l[i];
        // No key at all (non-causal, empty key segment): output 0, lse +inf (exp(s - lse) = 0).
        const bool none = li == 0.0f;
        const float inv = none ? 0.0f : 1.0f / li;
        for (int64_t e = 0; e < d; ++e) o[e] = none ? 0.0f : acc[i * d + e] * inv;
        lp[w.head * tq + row] = none ? kInf : m[i] + std::log(li);
      }
    }
  });
  return {out.to(q_in.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> packed_attention_bwd(
    const at::Tensor& do_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& cu_q, const at::Tensor& cu_k, bool causal,
    double scale_d) {
  const Geometry g = geometry(q_in, k_in, cu_q, cu_k, causal);
  at::Tensor q = as_float(q_in), k = as_float(k_in), v = as_float(v_in), dout = as_float(do_in),
             o = as_float(out_in), lse = lse_in.to(at::kFloat).contiguous();
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
    std::vector<float> pbuf(kBlockM * kBlockN), dpbuf(kBlockM * kBlockN), delta(kBlockM), lrow(kBlockM);
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
            float* p = pbuf.data();
            float* dp = dpbuf.data();
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
