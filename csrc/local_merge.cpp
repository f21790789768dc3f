// Fused local merge on the CPU, forward and backward (kernels/local_merge.py has the maths):
// x (V, H*W, C_in) raster tokens -> out (V, P+1, C_out), the 3x3 stride-2 pad-1 convolution plus
// the nearest residual x[2oy, 2ox] and the bias per pixel, then one LF row per view.
//
// Everything computes in fp32 (fp16/bf16 inputs are upcast once; results are rounded once, when
// stored) with two algorithms, picked by size (winograd_form below) unless the caller names one:
//
// * direct: the 9 taps gathered into one (V*P, 9*C_in) im2col block and a single SGEMM against
//   the weight read in place, as (C_out, C_in*9) rows; the epilogue adds residual and bias while
//   it writes the packed rows and the LF row. Backward: one SGEMM for the im2col gradient,
//   gathered back per input pixel (at most 4 taps read a pixel), one SGEMM for the weight
//   gradient, written in the weight's layout.
// * winograd: split by tap parity a stride-2 3x3 convolution is four stride-1 ones (centre x
//   centre, centre x outer, outer x centre, outer x outer), and Winograd F(2, 2) along every
//   outer axis leaves 16 (component x kernel) SGEMMs worth 6.25 of the direct form's 9. Per
//   axis, component 0 is the centre tap and components 1-3 are, for the output pair (2q, 2q+1)
//   with d0 = t[4q-1], d1 = t[4q+1], d2 = t[4q+3]: m0 = (d0 - d1) w0, m1 = d1 (w0 + w2),
//   m2 = (d2 - d1) w2, and y[2q] = m0 + m1, y[2q+1] = m1 + m2. The input and output transforms
//   (and their adjoints in the backward) are sums of at most 11 rows of C floats; each thread
//   runs the kernel transform, the 16 GEMMs and the output-side transform for its own range of
//   channels. It wins where V * P is large (the GEMMs dominate); elsewhere the 16-block kernel
//   transform (the direct form reads the weight in place), the row transforms and 16 smaller
//   GEMMs cost more than the multiplies they save.
//
// NaN semantics follow the convolution: a NaN token reaches exactly the outputs (and gradients)
// whose taps read it, a NaN weight or bias that output channel of every pixel; the transforms
// leave a missing (padding) term out rather than scale it by 0. An infinite token can give NaN
// in the Winograd form where the convolution gives +-inf (a transform subtracts it from itself),
// as in the torch path's Winograd form.
#include "common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>


#include <algorithm>
#include <cstdlib>
#include <strings.h>
#include <array>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace fusedvlm {
namespace {

struct Src {
  const float* p;
  float coef;
};

// dst[0..n) = sum of coef * src (zero when there is no term). Coefficients are +-1 and products
// of them, so the common cases are plain copies and adds.
void combine(float* dst, const Src* src, int n_src, int64_t n) {
  if (n_src == 0) {
    std::memset(dst, 0, n * sizeof(float));
    return;
  }
  if (src[0].coef == 1.0f) {
    std::memcpy(dst, src[0].p, n * sizeof(float));
  } else {
    const float k = src[0].coef, *s = src[0].p;
    for (int64_t c = 0; c < n; ++c) dst[c] = k * s[c];
  }
  for (int t = 1; t < n_src; ++t) {
    const float* s = src[t].p;
    if (src[t].coef == 1.0f) {
      for (int64_t c = 0; c < n; ++c) dst[c] += s[c];
    } else if (src[t].coef == -1.0f) {
      for (int64_t c = 0; c < n; ++c) dst[c] -= s[c];
    } else {
      const float k = src[t].coef;
      for (int64_t c = 0; c < n; ++c) dst[c] += k * s[c];
    }
  }
}

// Lines per parallel task, for lines that move floats_per_line floats each: a task moves at
// least 128K floats, so a small merge runs on the calling thread (waking the pool costs more
// than the work).
inline int64_t grain(int64_t floats_per_line) {
  return std::max<int64_t>(1, (int64_t{1} << 17) / std::max<int64_t>(floats_per_line, 1));
}

// Large temporaries live in per-thread buffers that outlive the call. A fresh page costs a fault
// on its first write (about 0.4 ms per MB on the 2-core test machine, more than the transforms
// themselves), and glibc maps every block over 32 MB afresh on each call, so buffers allocated
// per call would pay that on every merge. Three slots per calling thread, grown to the largest
// merge seen (at the paper's shape, V10 24x24 1024->1024, 138 MB); a slot above kScratchKeep is
// released after the call instead of kept.
constexpr size_t kScratchKeep = size_t{192} << 20;

// Three slots per calling thread, each a thread_local fusedvlm::Scratch.
class MergeScratch {
 public:
  enum Slot { kWeights, kRowsIn, kRowsOut };
  ~MergeScratch() {
    for (Scratch& b : slots()) b.release_above(kScratchKeep);
  }
  float* get(Slot s, int64_t n) { return slots()[s].get(n); }

 private:
  static std::array<Scratch, 3>& slots() {
    thread_local std::array<Scratch, 3> b;
    return b;
  }
};

struct Range {
  int64_t begin, end;
};

// MKL threads even a GEMM of a few MFLOP, where waking the second thread costs about as much as
// it saves and, on a machine busy with other jobs, its barrier waits milliseconds for a
// descheduled thread. Within this guard's scope MKL runs this thread's GEMMs on this thread
// (MKL_Set_Num_Threads_Local, looked up beside sgemm_ in libtorch; a no-op without MKL).
class SequentialBlas {
 public:
  explicit SequentialBlas(bool active) : fn_(active ? set_local() : nullptr) {
    if (fn_) previous_ = fn_(1);
  }
  ~SequentialBlas() {
    if (fn_) fn_(previous_);
  }
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;

 private:
  using set_fn = int (*)(int);
  static set_fn set_local() {
    static const set_fn fn = reinterpret_cast<set_fn>(libtorch_symbol("MKL_Set_Num_Threads_Local"));
    return fn;
  }
  set_fn fn_;
  int previous_ = 0;
};

// Multiply-adds below which a GEMM runs on one thread (about 50 us of one core).
constexpr int64_t kSmallGemm = int64_t{1} << 22;

struct Geo {
  int64_t v, h, w, ho, wo, p, cin, cout;
};

Geo geometry(const at::Tensor& x, const at::Tensor& weight, int64_t h, int64_t w, bool residual) {
  TORCH_CHECK_VALUE(x.dim() == 3, "local_merge: x must be (V, H*W, C_in), got ", x.sizes());
  TORCH_CHECK_VALUE(h > 0 && w > 0 && x.size(1) == h * w, "local_merge: grid (", h, ", ", w, ") does not hold ",
                    x.size(1), " tokens");
  TORCH_CHECK_VALUE(x.size(0) > 0 && x.size(2) > 0, "local_merge: x has an empty dimension: ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(1) == x.size(2) && weight.size(2) == 3 && weight.size(3) == 3,
                    "local_merge: weight must be (C_out, ", x.size(2), ", 3, 3), got ", weight.sizes());
  Geo g{x.size(0), h, w, (h + 1) / 2, (w + 1) / 2, 0, x.size(2), weight.size(0)};
  g.p = g.ho * g.wo;
  TORCH_CHECK_VALUE(!residual || g.cin == g.cout, "local_merge: residual needs C_in == C_out, got ", g.cin, " -> ",
                    g.cout);
  return g;
}

template <typename T>
inline void store_row(T* dst, const float* src, int64_t n) {
  for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<T>(src[c]);
}

// ----------------------------------------------------------------------------- direct form

// col (V*P, 9*C_in): row (v, oy, ox) holds x[v, 2oy+dy-1, 2ox+dx-1, c] (zero outside the grid)
// at column 9 c + 3 dy + dx, the order of the weight's own (C_out, C_in, 3, 3) rows, so the
// GEMMs read the weight (and write its gradient) in place.
void im2col(const float* x, const Geo& g, float* col) {
  const int64_t k = 9 * g.cin;
  const std::vector<float> zeros(g.cin, 0.0f);
  at::parallel_for(0, g.v * g.p, grain(2 * k), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t v = r / g.p, o = r % g.p, oy = o / g.wo, ox = o % g.wo;
      const float* src[9];
      for (int64_t t = 0; t < 9; ++t) {
        const int64_t iy = 2 * oy + t / 3 - 1, ix = 2 * ox + t % 3 - 1;
        const bool inside = iy >= 0 && iy < g.h && ix >= 0 && ix < g.w;
        src[t] = inside ? x + ((v * g.h + iy) * g.w + ix) * g.cin : zeros.data();
      }
      // Channel-major so that the stores run in order.
      float* dst = col + r * k;
      for (int64_t c = 0; c < g.cin; ++c)
        for (int t = 0; t < 9; ++t) dst[9 * c + t] = src[t][c];
    }
  });
}

// (tap, output position) pairs that read input position i of an axis: an even i only through
// the centre tap, an odd one through the outer taps of its two neighbours.
std::vector<std::vector<std::pair<int64_t, int64_t>>> direct_readers(int64_t n_in, int64_t n_out) {
  std::vector<std::vector<std::pair<int64_t, int64_t>>> r(n_in);
  for (int64_t o = 0; o < n_out; ++o)
    for (int64_t t = 0; t < 3; ++t) {
      const int64_t i = 2 * o + t - 1;
      if (i >= 0 && i < n_in) r[i].push_back({t, o});
    }
  return r;
}

// ----------------------------------------------------------------------------- Winograd form

// Taps (0, 1, 2) of the 3-tap axis kernel that component kind k sums: the centre tap, w0, w0 + w2, w2.
constexpr int kKindTaps[4][2] = {{1, -1}, {0, -1}, {0, 2}, {2, -1}};

// One grid axis of n_in inputs and n_out outputs: its four components and their counts (the
// centre has one per output, each outer one per output pair), which inputs form each component,
// which component products form each output, and the adjoints of both maps.
struct Axis {
  int64_t count[4];
  std::vector<std::vector<std::pair<int64_t, float>>> in[4];  // [kind][index] -> (input, coef)
  std::vector<std::vector<std::pair<int, int64_t>>> out;      // [output] -> (kind, index)
  std::vector<std::vector<std::tuple<int, int64_t, float>>> in_adj;  // [input] -> (kind, index, coef)
  std::vector<std::vector<int64_t>> out_adj[4];                      // [kind][index] -> outputs

  Axis(int64_t n_in, int64_t n_out) : out(n_out), in_adj(n_in) {
    const int64_t pairs = (n_out + 1) / 2;
    count[0] = n_out;
    count[1] = count[2] = count[3] = pairs;
    for (int k = 0; k < 4; ++k) {
      in[k].resize(count[k]);
      out_adj[k].resize(count[k]);
    }
    auto add = [&](int k, int64_t i, int64_t pos, float coef) {
      if (pos >= 0 && pos < n_in) in[k][i].push_back({pos, coef});
    };
    for (int64_t i = 0; i < n_out; ++i) add(0, i, 2 * i, 1.0f);
    for (int64_t q = 0; q < pairs; ++q) {
      add(1, q, 4 * q - 1, 1.0f);
      add(1, q, 4 * q + 1, -1.0f);
      add(2, q, 4 * q + 1, 1.0f);
      add(3, q, 4 * q + 3, 1.0f);
      add(3, q, 4 * q + 1, -1.0f);
    }
    for (int64_t o = 0; o < n_out; ++o) {
      out[o].push_back({0, o});
      const int64_t q = o / 2;
      out[o].push_back({o % 2 ? 2 : 1, q});
      out[o].push_back({o % 2 ? 3 : 2, q});
    }
    for (int k = 0; k < 4; ++k)
      for (int64_t i = 0; i < count[k]; ++i)
        for (auto [pos, coef] : in[k][i]) in_adj[pos].push_back({k, i, coef});
    for (int64_t o = 0; o < n_out; ++o)
      for (auto [k, i] : out[o]) out_adj[k][i].push_back(o);
  }
};

// The 16 component blocks (row kind a, column kind b), stacked: block ab holds
// V * rows.count[a] * cols.count[b] rows, row (v, i, j) at offset[ab] + (v * count_a + i) * count_b + j.
struct Blocks {
  const Axis rows, cols;
  int64_t v;
  std::array<int64_t, 17> offset;

  Blocks(const Geo& g) : rows(g.h, g.ho), cols(g.w, g.wo), v(g.v) {
    offset[0] = 0;
    for (int ab = 0; ab < 16; ++ab) offset[ab + 1] = offset[ab] + v * rows.count[ab / 4] * cols.count[ab % 4];
  }
  int64_t size(int ab) const { return offset[ab + 1] - offset[ab]; }
  int64_t row(int ab, int64_t v_, int64_t i, int64_t j) const {
    return offset[ab] + (v_ * rows.count[ab / 4] + i) * cols.count[ab % 4] + j;
  }
  int64_t total() const { return offset[16]; }

  // Runs fn(ab, v, i) over every (block, view, component row), in parallel: a line of
  // cols.count[b] rows of `width` floats each.
  template <typename Fn>
  void for_lines(int64_t width, const Fn& fn) const {
    std::vector<std::array<int64_t, 3>> lines;
    for (int ab = 0; ab < 16; ++ab)
      for (int64_t vv = 0; vv < v; ++vv)
        for (int64_t i = 0; i < rows.count[ab / 4]; ++i) lines.push_back({ab, vv, i});
    at::parallel_for(0, static_cast<int64_t>(lines.size()), grain(width * cols.count[1]), [&](int64_t b, int64_t e) {
      for (int64_t l = b; l < e; ++l) fn(static_cast<int>(lines[l][0]), lines[l][1], lines[l][2]);
    });
  }
};

// A (total, C_in): every component row of x.
void winograd_inputs(const float* x, const Geo& g, const Blocks& bl, float* a) {
  bl.for_lines(g.cin, [&](int ab, int64_t v, int64_t i) {
    const int ka = ab / 4, kb = ab % 4;
    for (int64_t j = 0; j < bl.cols.count[kb]; ++j) {
      Src src[4];
      int n = 0;
      for (auto [py, cy] : bl.rows.in[ka][i])
        for (auto [px, cx] : bl.cols.in[kb][j]) src[n++] = {x + ((v * g.h + py) * g.w + px) * g.cin, cy * cx};
      combine(a + bl.row(ab, v, i, j) * g.cin, src, n, g.cin);
    }
  });
}

// ----------------------------------------------------------------------------- weights

// taps (9, c1 - c0) = weight[n, c0:c1] regrouped tap-major: taps[t * (c1 - c0) + c - c0] = weight[n, c, t / 3, t % 3].
inline void tap_major(const float* wp, const Geo& g, int64_t n, Range cols, float* taps) {
  const int64_t width = cols.end - cols.begin;
  const float* row = wp + n * g.cin * 9;
  for (int64_t c = cols.begin; c < cols.end; ++c)
    for (int t = 0; t < 9; ++t) taps[t * width + c - cols.begin] = row[c * 9 + t];
}

// Winograd kernels (16, C_out, C_in), rows `rows` and columns `cols` of every block: block ab
// sums the taps (ty, tx) with ty in kind a and tx in kind b.
void winograd_kernels(const float* wp, const Geo& g, Range rows, Range cols, float* k) {
  const int64_t width = cols.end - cols.begin, block = g.cout * g.cin;
  std::vector<float> taps(9 * width);
  for (int64_t n = rows.begin; n < rows.end; ++n) {
    tap_major(wp, g, n, cols, taps.data());
    for (int ab = 0; ab < 16; ++ab) {
      Src src[4];
      int m = 0;
      for (int ty : kKindTaps[ab / 4])
        for (int tx : kKindTaps[ab % 4])
          if (ty >= 0 && tx >= 0) src[m++] = {taps.data() + (ty * 3 + tx) * width, 1.0f};
      combine(k + ab * block + n * g.cin + cols.begin, src, m, width);
    }
  }
}

// Adjoint of winograd_kernels for output channels `rows`: dk (16, C_out, C_in) -> dw (C_out, C_in, 3, 3).
void winograd_kernels_grad(const float* dk, const Geo& g, Range rows, float* dw) {
  const int64_t block = g.cout * g.cin;
  std::vector<float> taps(9 * g.cin);
  for (int64_t n = rows.begin; n < rows.end; ++n) {
    for (int t = 0; t < 9; ++t) {
      Src src[4];
      int m = 0;
      for (int ka = 0; ka < 4; ++ka)
        for (int kb = 0; kb < 4; ++kb) {
          const auto &ra = kKindTaps[ka], &rb = kKindTaps[kb];
          if ((ra[0] == t / 3 || ra[1] == t / 3) && (rb[0] == t % 3 || rb[1] == t % 3))
            src[m++] = {dk + (ka * 4 + kb) * block + n * g.cin, 1.0f};
        }
      combine(taps.data() + t * g.cin, src, m, g.cin);
    }
    float* row = dw + n * g.cin * 9;
    for (int64_t c = 0; c < g.cin; ++c)
      for (int t = 0; t < 9; ++t) row[c * 9 + t] = taps[t * g.cin + c];
  }
}

// ----------------------------------------------------------------------------- per-thread stages

// Channel ranges, one per thread, cut at multiples of 16 floats so that no two threads write
// one cache line.
std::vector<Range> channel_chunks(int64_t c) {
  const int64_t lines = (c + 15) / 16;
  const int64_t n = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), lines));
  std::vector<Range> r;
  for (int64_t i = 0; i < n; ++i) r.push_back({std::min(c, lines * i / n * 16), std::min(c, lines * (i + 1) / n * 16)});
  return r;
}

// Runs fn(range) for every chunk, one chunk per thread. gemm() inside runs on its calling
// thread (MKL is sequential inside a parallel region), so a stage of 16 GEMMs and its
// transforms meets one barrier rather than one per GEMM: on a busy machine every barrier waits
// for a descheduled thread.
template <typename Fn>
void for_chunks(const std::vector<Range>& chunks, const Fn& fn) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(chunks[i]);
  });
}

// fn(typed data pointer of t), for the three dtypes a merge stores.
template <typename Fn>
void with_typed(const at::Tensor& t, const Fn& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "local_merge", [&] {
    fn(t.data_ptr<scalar_t>());
  });
}

// out[v, oy*wo+ox, ch] = sum(sources) + residual + bias over output lines (v, oy) in
// [line0, line1), channels ch. sources(v, oy, ox, src) writes at most 9 full-row sources.
template <typename T, typename Sources>
void output_rows(T* op, const Geo& g, const float* x, bool residual, const float* bias, int64_t line0,
                 int64_t line1, Range ch, const Sources& sources) {
  const int64_t width = ch.end - ch.begin;
  std::vector<float> buf(width);
  for (int64_t line = line0; line < line1; ++line) {
    const int64_t v = line / g.ho, oy = line % g.ho;
    for (int64_t ox = 0; ox < g.wo; ++ox) {
      Src src[11];
      int n = sources(v, oy, ox, src);
      if (residual) src[n++] = {x + ((v * g.h + 2 * oy) * g.w + 2 * ox) * g.cin, 1.0f};
      if (bias) src[n++] = {bias, 1.0f};
      for (int i = 0; i < n; ++i) src[i].p += ch.begin;
      combine(buf.data(), src, n, width);
      store_row(op + (v * (g.p + 1) + oy * g.wo + ox) * g.cout + ch.begin, buf.data(), width);
    }
  }
}

template <typename T>
void lf_rows(T* op, const Geo& g, const float* lf, Range ch) {
  for (int64_t v = 0; v < g.v; ++v)
    store_row(op + (v * (g.p + 1) + g.p) * g.cout + ch.begin, lf + ch.begin, ch.end - ch.begin);
}

// dx[v, iy*W+ix, ch] = sum(sources) + (residual, at even pixels) g[v, iy/2, ix/2, ch] over input
// lines (v, iy) in [line0, line1). sources(v, iy, ix, src) writes at most 9 full-row sources.
template <typename T, typename Sources>
void grad_x_rows(T* dp, const Geo& g, const float* gp, bool residual, int64_t line0, int64_t line1, Range ch,
                 const Sources& sources) {
  const int64_t width = ch.end - ch.begin;
  std::vector<float> buf(width);
  for (int64_t line = line0; line < line1; ++line) {
    const int64_t v = line / g.h, iy = line % g.h;
    for (int64_t ix = 0; ix < g.w; ++ix) {
      Src src[10];
      int n = sources(v, iy, ix, src);
      if (residual && iy % 2 == 0 && ix % 2 == 0)
        src[n++] = {gp + (v * (g.p + 1) + (iy / 2) * g.wo + ix / 2) * g.cout, 1.0f};
      for (int i = 0; i < n; ++i) src[i].p += ch.begin;
      combine(buf.data(), src, n, width);
      store_row(dp + (v * g.h * g.w + iy * g.w + ix) * g.cin + ch.begin, buf.data(), width);
    }
  }
}

// dlf = sum_v g[v, P]; db = sum_{v, p < P} g[v, p] (fp32 per view, double across views).
std::pair<at::Tensor, at::Tensor> bias_and_lf_grads(const float* gp, const Geo& g, bool has_bias,
                                                    const at::Tensor& weight) {
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor dlf = at::empty({g.cout}, f32), db = at::empty({has_bias ? g.cout : 0}, f32);
  std::vector<double> lf_acc(g.cout, 0.0), b_acc(has_bias ? g.cout : 0, 0.0);
  std::vector<float> view_acc(g.cout);
  for (int64_t v = 0; v < g.v; ++v) {
    const float* gv = gp + v * (g.p + 1) * g.cout;
    for (int64_t c = 0; c < g.cout; ++c) lf_acc[c] += gv[g.p * g.cout + c];
    if (!has_bias) continue;
    std::fill(view_acc.begin(), view_acc.end(), 0.0f);
    for (int64_t r = 0; r < g.p; ++r)
      for (int64_t c = 0; c < g.cout; ++c) view_acc[c] += gv[r * g.cout + c];
    for (int64_t c = 0; c < g.cout; ++c) b_acc[c] += view_acc[c];
  }
  float *lp = dlf.data_ptr<float>(), *bp = db.data_ptr<float>();
  for (int64_t c = 0; c < g.cout; ++c) lp[c] = static_cast<float>(lf_acc[c]);
  for (size_t c = 0; c < b_acc.size(); ++c) bp[c] = static_cast<float>(b_acc[c]);
  return {dlf.to(weight.scalar_type()), db.to(weight.scalar_type())};
}

}  // namespace

// The Winograd form saves 2.75/9 of the GEMM work but pays a 16-block kernel transform (O(C_in
// C_out) per call, where the direct form reads the weight in place) and row transforms (O(V P C)),
// so it needs many output pixels V*P and not too few channels. Measured on one thread (CPU time)
// at 7x7 to 24x24 grids, 1 to 10 views, 64 to 1024 channels: at 1024 channels the forms tie near
// V*P = 576 (4 views of 24x24); at V*P = 1440 (the paper's 10 views) Winograd wins from 128
// channels up. FUSEDVLM_MERGE_FORM=direct|winograd forces one form (benchmarks and tests).
bool winograd_form(int64_t v, int64_t h, int64_t w, int64_t c_in, int64_t c_out) {
  const char* forced = std::getenv("FUSEDVLM_MERGE_FORM");
  if (forced != nullptr && *forced != '\0' && strcasecmp(forced, "auto") != 0) {
    if (strcasecmp(forced, "direct") == 0) return false;
    TORCH_CHECK_VALUE(strcasecmp(forced, "winograd") == 0, "FUSEDVLM_MERGE_FORM=", forced,
                      ": expected auto, direct or winograd");
    return true;
  }
  constexpr int64_t kMinChannels = 128 * 128, kMinPixels = 640;
  return c_in * c_out >= kMinChannels && v * ((h + 1) / 2) * ((w + 1) / 2) >= kMinPixels;
}

at::Tensor local_merge_fwd(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& lf_token,
                           const std::optional<at::Tensor>& bias_in, bool residual, int64_t h, int64_t w,
                           std::optional<bool> form) {
  const Geo g = geometry(x_in, weight_in, h, w, residual);
  const bool winograd = form.has_value() ? *form : winograd_form(g.v, g.h, g.w, g.cin, g.cout);
  TORCH_CHECK_VALUE(lf_token.dim() == 1 && lf_token.size(0) == g.cout, "local_merge: lf_token must be (", g.cout,
                    ",), got ", lf_token.sizes());
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  TORCH_CHECK_VALUE(!has_bias || (bias_in->dim() == 1 && bias_in->size(0) == g.cout), "local_merge: bias must be (",
                    g.cout, ",), got ", bias_in->sizes());
  const at::Tensor x = as_float(x_in), weight = as_float(weight_in), lf = as_float(lf_token);
  const at::Tensor bias = has_bias ? as_float(*bias_in) : at::Tensor();
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>(), *lp = lf.data_ptr<float>();
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  at::Tensor out = at::empty({g.v, g.p + 1, g.cout}, x_in.options());
  MergeScratch scratch;

  if (!winograd) {
    const int64_t kk = 9 * g.cin;
    float* col = scratch.get(MergeScratch::kRowsIn, g.v * g.p * kk);
    im2col(xp, g, col);
    float* y = scratch.get(MergeScratch::kRowsOut, g.v * g.p * g.cout);
    {
      SequentialBlas one_thread(g.v * g.p * kk * g.cout < kSmallGemm);
      gemm(false, true, g.v * g.p, g.cout, kk, 1.0f, col, kk, wp, kk, 0.0f, y, g.cout);
    }
    with_typed(out, [&](auto* op) {
      at::parallel_for(0, g.v * g.ho, grain(3 * g.wo * g.cout), [&](int64_t begin, int64_t end) {
        output_rows(op, g, xp, residual, bp, begin, end, {0, g.cout}, [&](int64_t v, int64_t oy, int64_t ox, Src* src) {
          src[0] = {y + (v * g.p + oy * g.wo + ox) * g.cout, 1.0f};
          return 1;
        });
      });
      lf_rows(op, g, lp, {0, g.cout});
    });
    return out;
  }

  const Blocks bl(g);
  float* a = scratch.get(MergeScratch::kRowsIn, bl.total() * g.cin);
  winograd_inputs(xp, g, bl, a);
  float* k = scratch.get(MergeScratch::kWeights, 16 * g.cout * g.cin);
  float* prod = scratch.get(MergeScratch::kRowsOut, bl.total() * g.cout);
  // Each thread owns a range of output channels: its rows of the kernels, its columns of every
  // product and of the output.
  with_typed(out, [&](auto* op) {
    for_chunks(channel_chunks(g.cout), [&](Range ch) {
      winograd_kernels(wp, g, ch, {0, g.cin}, k);
      for (int ab = 0; ab < 16; ++ab)
        gemm(false, true, bl.size(ab), ch.end - ch.begin, g.cin, 1.0f, a + bl.offset[ab] * g.cin, g.cin,
             k + (ab * g.cout + ch.begin) * g.cin, g.cin, 0.0f, prod + bl.offset[ab] * g.cout + ch.begin, g.cout);
      output_rows(op, g, xp, residual, bp, 0, g.v * g.ho, ch, [&](int64_t v, int64_t oy, int64_t ox, Src* src) {
        int n = 0;
        for (auto [ka, i] : bl.rows.out[oy])
          for (auto [kb, j] : bl.cols.out[ox]) src[n++] = {prod + bl.row(ka * 4 + kb, v, i, j) * g.cout, 1.0f};
        return n;
      });
      lf_rows(op, g, lp, ch);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> local_merge_bwd(const at::Tensor& grad_in,
                                                                           const at::Tensor& x_in,
                                                                           const at::Tensor& weight_in, bool has_bias,
                                                                           bool residual, int64_t h, int64_t w,
                                                                           bool need_x, bool need_w,
                                                                           std::optional<bool> form) {
  const Geo g = geometry(x_in, weight_in, h, w, residual);
  const bool winograd = form.has_value() ? *form : winograd_form(g.v, g.h, g.w, g.cin, g.cout);
  TORCH_CHECK_VALUE(grad_in.dim() == 3 && grad_in.size(0) == g.v && grad_in.size(1) == g.p + 1 &&
                        grad_in.size(2) == g.cout,
                    "local_merge_backward: grad must be (", g.v, ", ", g.p + 1, ", ", g.cout, "), got ",
                    grad_in.sizes());
  const at::Tensor gr = as_float(grad_in);
  const float* gp = gr.data_ptr<float>();
  const at::Tensor x = need_w ? as_float(x_in) : at::Tensor();
  const at::Tensor weight = need_x ? as_float(weight_in) : at::Tensor();  // (C_out, C_in * 9) rows
  at::Tensor dx = need_x ? at::empty({g.v, g.h * g.w, g.cin}, x_in.options()) : at::empty({0}, x_in.options());
  at::Tensor dw = at::empty({0}, weight_in.options());
  auto [dlf, db] = bias_and_lf_grads(gp, g, has_bias, weight_in);
  MergeScratch scratch;

  if (!winograd) {
    const int64_t kk = 9 * g.cin;
    SequentialBlas one_thread(g.v * g.p * kk * g.cout < kSmallGemm);
    // The pixel rows of every view, without the LF rows, as one GEMM operand.
    float* gc = scratch.get(MergeScratch::kRowsOut, g.v * g.p * g.cout);
    for (int64_t v = 0; v < g.v; ++v)
      std::memcpy(gc + v * g.p * g.cout, gp + v * (g.p + 1) * g.cout, g.p * g.cout * sizeof(float));
    if (need_x) {
      float* dcol = scratch.get(MergeScratch::kRowsIn, g.v * g.p * kk);
      gemm(false, false, g.v * g.p, kk, g.cout, 1.0f, gc, g.cout, weight.data_ptr<float>(), kk, 0.0f, dcol, kk);
      // dx[pixel] gathers the im2col gradient of the (at most 4) taps that read the pixel.
      const auto ry = direct_readers(g.h, g.ho), rx = direct_readers(g.w, g.wo);
      with_typed(dx, [&](auto* dp) {
        at::parallel_for(0, g.v * g.h, grain(5 * g.w * g.cin), [&](int64_t begin, int64_t end) {
          std::vector<float> buf(g.cin);
          for (int64_t line = begin; line < end; ++line) {
            const int64_t v = line / g.h, iy = line % g.h;
            for (int64_t ix = 0; ix < g.w; ++ix) {
              const float* taps[4];
              int n = 0;
              for (auto [ty, oy] : ry[iy])
                for (auto [tx, ox] : rx[ix]) taps[n++] = dcol + (v * g.p + oy * g.wo + ox) * kk + ty * 3 + tx;
              float* b = buf.data();
              if (n == 0) std::fill(buf.begin(), buf.end(), 0.0f);
              for (int64_t c = 0; n > 0 && c < g.cin; ++c) b[c] = taps[0][9 * c];
              for (int t = 1; t < n; ++t)
                for (int64_t c = 0; c < g.cin; ++c) b[c] += taps[t][9 * c];
              if (residual && iy % 2 == 0 && ix % 2 == 0) {
                const float* r = gp + (v * (g.p + 1) + (iy / 2) * g.wo + ix / 2) * g.cout;
                for (int64_t c = 0; c < g.cin; ++c) b[c] += r[c];
              }
              store_row(dp + (v * g.h * g.w + iy * g.w + ix) * g.cin, b, g.cin);
            }
          }
        });
      });
    }
    if (need_w) {
      float* col = scratch.get(MergeScratch::kRowsIn, g.v * g.p * kk);
      im2col(x.data_ptr<float>(), g, col);
      at::Tensor dwf = at::empty({g.cout, g.cin, 3, 3}, gr.options());
      gemm(true, false, g.cout, kk, g.v * g.p, 1.0f, gc, g.cout, col, kk, 0.0f, dwf.data_ptr<float>(), kk);
      dw = dwf.to(weight_in.scalar_type());
    }
    return {dx, dw, dlf, db};
  }

  const Blocks bl(g);
  const int64_t block = g.cout * g.cin;
  // dP: the output transform's adjoint, every component product's gradient.
  float* dprod = scratch.get(MergeScratch::kRowsOut, bl.total() * g.cout);
  bl.for_lines(g.cout, [&](int ab, int64_t v, int64_t i) {
    const int ka = ab / 4, kb = ab % 4;
    for (int64_t j = 0; j < bl.cols.count[kb]; ++j) {
      Src src[4];
      int n = 0;
      for (int64_t oy : bl.rows.out_adj[ka][i])
        for (int64_t ox : bl.cols.out_adj[kb][j]) src[n++] = {gp + (v * (g.p + 1) + oy * g.wo + ox) * g.cout, 1.0f};
      combine(dprod + bl.row(ab, v, i, j) * g.cout, src, n, g.cout);
    }
  });
  if (need_x) {
    // Each thread owns a range of input channels: its columns of the kernels, of dA and of dx.
    float* k = scratch.get(MergeScratch::kWeights, 16 * block);
    float* da = scratch.get(MergeScratch::kRowsIn, bl.total() * g.cin);
    const float* wp = weight.data_ptr<float>();
    with_typed(dx, [&](auto* dp) {
      for_chunks(channel_chunks(g.cin), [&](Range ch) {
        winograd_kernels(wp, g, {0, g.cout}, ch, k);
        for (int ab = 0; ab < 16; ++ab)
          gemm(false, false, bl.size(ab), ch.end - ch.begin, g.cout, 1.0f, dprod + bl.offset[ab] * g.cout, g.cout,
               k + ab * block + ch.begin, g.cin, 0.0f, da + bl.offset[ab] * g.cin + ch.begin, g.cin);
        grad_x_rows(dp, g, gp, residual, 0, g.v * g.h, ch, [&](int64_t v, int64_t iy, int64_t ix, Src* src) {
          int n = 0;
          for (auto [ka, i, cy] : bl.rows.in_adj[iy])
            for (auto [kb, j, cx] : bl.cols.in_adj[ix]) src[n++] = {da + bl.row(ka * 4 + kb, v, i, j) * g.cin, cy * cx};
          return n;
        });
      });
    });
  }
  if (need_w) {
    // dA and the kernels are spent: their slots take A and dK. Each thread owns a range of
    // output channels: its rows of dK and of the weight gradient.
    float* a = scratch.get(MergeScratch::kRowsIn, bl.total() * g.cin);
    winograd_inputs(x.data_ptr<float>(), g, bl, a);
    float* dk = scratch.get(MergeScratch::kWeights, 16 * block);
    at::Tensor dwf = at::empty({g.cout, g.cin, 3, 3}, gr.options());
    float* dwp = dwf.data_ptr<float>();
    for_chunks(channel_chunks(g.cout), [&](Range ch) {
      for (int ab = 0; ab < 16; ++ab)
        gemm(true, false, ch.end - ch.begin, g.cin, bl.size(ab), 1.0f, dprod + bl.offset[ab] * g.cout + ch.begin,
             g.cout, a + bl.offset[ab] * g.cin, g.cin, 0.0f, dk + ab * block + ch.begin * g.cin, g.cin);
      winograd_kernels_grad(dk, g, ch, dwp);
    });
    dw = dwf.to(weight_in.scalar_type());
  }
  return {dx, dw, dlf, db};
}

}  // namespace fusedvlm
