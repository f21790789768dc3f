// Prefix psi statistics of paired hidden states on the CPU (kernels/pairwise_cosine.py has the
// maths). One pass writes unit rows U (T, 2, d) = [a^_t; b^_t] interleaved, so the rows of a tile
// of tokens [A_I; B_I] are one contiguous block and one SGEMM per lower-triangle tile pair gives
// all four Gram tiles; their strictly-lower parts are reduced to per-row increments at once.
//
// Scale safety: a row is divided by its largest |entry| before its norm is taken, so rows of
// 1e20 or 1e-30 give the cosines of their directions (the fp32 square would overflow or
// underflow). A NaN anywhere in a row makes its unit row NaN, and NaN then propagates into
// every statistic whose prefix holds that row (max(0, NaN) keeps NaN); a zero row stays zero.
#include "common.h"

#include <ATen/Parallel.h>

#include <vector>

namespace fusedvlm {
namespace {

constexpr int64_t kTile = 128;

inline float relu_keep_nan(float c) { return c < 0.0f ? 0.0f : c; }

// x (d) -> unit row in u; returns nothing, NaN/inf rows become NaN rows.
void unit_row(const float* x, float* u, int64_t d) {
  float amax = 0.0f;
  bool nan = false;
  for (int64_t e = 0; e < d; ++e) {
    const float a = std::fabs(x[e]);
    nan |= a != a;
    amax = a > amax ? a : amax;
  }
  if (nan || amax == kInf) {
    for (int64_t e = 0; e < d; ++e) u[e] = kNaN;
    return;
  }
  if (amax == 0.0f) {
    for (int64_t e = 0; e < d; ++e) u[e] = 0.0f;
    return;
  }
  const float inv_max = 1.0f / amax;
  float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
  for (int64_t e = 0; e < d; ++e) {
    const float y = x[e] * inv_max;
    ss += y * y;
  }
  const float inv = inv_max / std::sqrt(ss);
  for (int64_t e = 0; e < d; ++e) u[e] = x[e] * inv;
}

}  // namespace

// -> five (T,) float32 tensors: eq, ab, aa, bb, div (see PsiStats).
Stats pairwise_cosine_stats(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& cu, bool positive) {
  TORCH_CHECK_VALUE(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.numel() >= 1,
                    "cu_seqlens must be a 1-D int32 tensor of n + 1 >= 1 offsets");
  at::Tensor a = a_in.to(at::kFloat).contiguous(), b = b_in.to(at::kFloat).contiguous();
  const int64_t total = a.size(0), d = a.size(1);
  auto cuc = cu.contiguous();
  std::vector<int64_t> off(cuc.data_ptr<int32_t>(), cuc.data_ptr<int32_t>() + cuc.numel());
  // fusedvlm.packing.check_cu_seqlens's messages.
  TORCH_CHECK_VALUE(off[0] == 0, "cu_seqlens[0] must be 0, got ", off[0]);
  for (size_t i = 1; i < off.size(); ++i)
    TORCH_CHECK_VALUE(off[i] >= off[i - 1], "cu_seqlens must be non-decreasing, got ", join(off));
  TORCH_CHECK_VALUE(off.back() == total, "cu_seqlens[-1] = ", off.back(), " but the pack has ", total, " tokens");
  const int64_t n_pair = static_cast<int64_t>(off.size()) - 1;

  Stats out{at::empty({total}, a.options()), at::empty({total}, a.options()), at::empty({total}, a.options()),
            at::empty({total}, a.options()), at::empty({total}, a.options())};
  if (total == 0) return out;
  std::vector<float> u(static_cast<size_t>(total) * 2 * d);
  std::vector<double> eq(total), inc_ab(total, 0.0), inc_aa(total, 0.0), inc_bb(total, 0.0);
  const float *ap = a.data_ptr<float>(), *bp = b.data_ptr<float>();
  float* up = u.data();

  // A tiny input runs on the calling thread: waking the pool costs more than the work.
  const bool small = total * d < (1 << 15);
  at::parallel_for(0, total, small ? total : 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* ua = up + 2 * t * d;
      float* ub = ua + d;
      unit_row(ap + t * d, ua, d);
      unit_row(bp + t * d, ub, d);
      float c = 0.0f;
#pragma omp simd reduction(+ : c)
      for (int64_t e = 0; e < d; ++e) c += ua[e] * ub[e];
      eq[t] = positive ? relu_keep_nan(c) : c;
    }
  });

  if (positive) {
    struct Item { int64_t pair, row0; };
    std::vector<Item> items;
    for (int64_t p = 0; p < n_pair; ++p)
      for (int64_t r = off[p]; r < off[p + 1]; r += kTile) items.push_back({p, r});
    const int64_t n_items = static_cast<int64_t>(items.size());
    // Sized to the longest pair (a tile at most): zero-filling a full tile buffer would cost a
    // short pack more than its products.
    int64_t tile = 0;
    for (int64_t p = 0; p < n_pair; ++p) tile = std::max(tile, std::min(kTile, off[p + 1] - off[p]));
    at::parallel_for(0, n_items, small ? std::max<int64_t>(n_items, 1) : 1, [&](int64_t begin, int64_t end) {
      std::vector<float> gbuf(4 * tile * tile);
      for (int64_t it = begin; it < end; ++it) {
        const Item w = items[it];
        const int64_t lo = off[w.pair], bi = std::min(kTile, off[w.pair + 1] - w.row0);
        for (int64_t c0 = lo; c0 <= w.row0; c0 += kTile) {
          const int64_t bj = std::min(kTile, w.row0 + bi - c0);
          // (2 bi x 2 bj): row 2i + x, column 2j + y holds x^_i . y^_j for x, y in {a, b}.
          float* gt = gbuf.data();
          gemm(false, true, 2 * bi, 2 * bj, d, 1.0f, up + 2 * w.row0 * d, d, up + 2 * c0 * d, d, 0.0f, gt, 2 * bj);
          for (int64_t i = 0; i < bi; ++i) {
            const int64_t row = w.row0 + i;
            const int64_t jn = std::min(bj, row - c0);  // strictly below the diagonal
            const float* ga = gt + (2 * i) * 2 * bj;
            const float* gb = ga + 2 * bj;
            float s_ab = 0.0f, s_aa = 0.0f, s_bb = 0.0f;
            for (int64_t j = 0; j < jn; ++j) {
              s_aa += relu_keep_nan(ga[2 * j]);
              s_ab += relu_keep_nan(ga[2 * j + 1]) + relu_keep_nan(gb[2 * j]);
              s_bb += relu_keep_nan(gb[2 * j + 1]);
            }
            inc_ab[row] += s_ab;
            inc_aa[row] += 2.0 * s_aa;
            inc_bb[row] += 2.0 * s_bb;
          }
        }
      }
    });
  }

  float *o_eq = std::get<0>(out).data_ptr<float>(), *o_ab = std::get<1>(out).data_ptr<float>(),
        *o_aa = std::get<2>(out).data_ptr<float>(), *o_bb = std::get<3>(out).data_ptr<float>(),
        *o_div = std::get<4>(out).data_ptr<float>();
  at::parallel_for(0, n_pair, small ? std::max<int64_t>(n_pair, 1) : 1, [&](int64_t begin, int64_t end) {
    std::vector<double> sa(d), sb(d), sdiff(d);
    for (int64_t p = begin; p < end; ++p) {
      std::fill(sa.begin(), sa.end(), 0.0);
      std::fill(sb.begin(), sb.end(), 0.0);
      std::fill(sdiff.begin(), sdiff.end(), 0.0);
      double e_sum = 0, ab_sum = 0, aa_sum = 0, bb_sum = 0, sq_a = 0, sq_b = 0;
      for (int64_t t = off[p]; t < off[p + 1]; ++t) {
        const double n = static_cast<double>(t - off[p] + 1);
        const float* ua = up + 2 * t * d;
        const float* ub = ua + d;
        const float* x = ap + t * d;
        const float* y = bp + t * d;
        double div2 = 0;
        for (int64_t e = 0; e < d; ++e) {
          sdiff[e] += static_cast<double>(x[e]) - static_cast<double>(y[e]);
          div2 += sdiff[e] * sdiff[e];
        }
        e_sum += eq[t];
        if (positive) {
          ab_sum += inc_ab[t];
          aa_sum += inc_aa[t];
          bb_sum += inc_bb[t];
        } else {
          // S_ab(n) = SA.SB - E(n), S_aa(n) = |SA|^2 - sum |a^_i|^2: no Gram product at all.
          double dab = 0, daa = 0, dbb = 0, na = 0, nb = 0;
          for (int64_t e = 0; e < d; ++e) {
            sa[e] += ua[e];
            sb[e] += ub[e];
            dab += sa[e] * sb[e];
            daa += sa[e] * sa[e];
            dbb += sb[e] * sb[e];
            na += static_cast<double>(ua[e]) * ua[e];
            nb += static_cast<double>(ub[e]) * ub[e];
          }
          sq_a += na;
          sq_b += nb;
          ab_sum = dab - e_sum;
          aa_sum = daa - sq_a;
          bb_sum = dbb - sq_b;
        }
        const double pairs = n * (n - 1);
        o_eq[t] = static_cast<float>(e_sum / n);
        o_ab[t] = pairs > 0 ? static_cast<float>(ab_sum / pairs) : kNaN;
        o_aa[t] = pairs > 0 ? static_cast<float>(aa_sum / pairs) : kNaN;
        o_bb[t] = pairs > 0 ? static_cast<float>(bb_sum / pairs) : kNaN;
        o_div[t] = static_cast<float>(std::sqrt(div2));
      }
    }
  });
  return out;
}

}  // namespace fusedvlm
