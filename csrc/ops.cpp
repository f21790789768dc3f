// The fusedvlm:: operators' autograd kernels for CPU tensors (AutogradCPU), in C++ so that an
// eager call costs one dispatcher hop instead of two Python kernels.
//
// The schemas, fake kernels, FLOP formulas, CUDA kernels and the Python autograd registration
// (alias key Autograd) live in kernels/*.py, so every op exists on a machine that cannot build
// this library. Once it is loaded, these kernels take precedence for CPU tensors (a kernel on a
// backend's own autograd key beats the alias), without replacing anything.
//
// Nothing here decides or checks: the public function (kernels/*.py) has checked the arguments
// and chosen the implementation (fusedvlm.backend.implementation), and passes the choice as the
// op's last argument. When it is "cpp" and nothing but the CPU backend would see the call (no
// Python mode such as FlopCounterMode or FakeTensorMode, no functionalization: the keys below
// autograd are plain CPU), the C++ kernel runs directly; otherwise the call is redispatched
// below autograd, to the mode or to the op's Python CPU kernel, which obeys the same argument.
//
// Gradients: a hand-written autograd node per op (as PyTorch's generated ones are: saved
// variables and scalars as members, edges to the differentiable inputs only), whose backward
// calls fusedvlm::<op>_backward through the dispatcher, so a mode active during backward sees
// (and counts) it. torch::autograd::Function did the same through a generic context (a
// string-keyed map of scalars, metadata per input and output, the non-differentiable set): on
// tiny inputs with gradients it made the op call 2-5 us slower (bench/bench_op_overhead.py).
// Forward-mode AD is refused, as that API refused it.
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <array>
#include <mutex>
#include <string>

#include "common.h"

namespace fusedvlm {

std::tuple<at::Tensor, at::Tensor> packed_attention_fwd(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                        const at::Tensor&, const at::Tensor&, bool, double);
std::tuple<at::Tensor, at::Tensor, at::Tensor> packed_attention_bwd(const at::Tensor&, const at::Tensor&,
                                                                    const at::Tensor&, const at::Tensor&,
                                                                    const at::Tensor&, const at::Tensor&,
                                                                    const at::Tensor&, const at::Tensor&, bool, double);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> local_merge_bwd(const at::Tensor&, const at::Tensor&,
                                                                           const at::Tensor&, bool, bool, int64_t,
                                                                           int64_t, bool, bool, std::optional<bool>);
Stats pairwise_cosine_stats(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool);
at::Tensor local_merge_fwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           bool, int64_t, int64_t, std::optional<bool>);

namespace {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// True when the caller chose the C++ kernel and redispatching below autograd would reach the
// CPU kernel and nothing else.
bool run_cpp(c10::DispatchKeySet ks, c10::string_view backend) {
  const auto below = (ks & c10::after_autograd_keyset).remove(c10::DispatchKey::ADInplaceOrView);
  return backend == "cpp" && below.highestPriorityTypeId() == c10::DispatchKey::CPU;
}

void refuse_forward_ad(const char* op, std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors)
    TORCH_CHECK(!torch::autograd::isFwGradDefined(*t), "fusedvlm::", op, ": forward-mode AD is not implemented");
}

// ------------------------------------------------------------------------- packed attention

using AttentionSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                        const at::Tensor&, const at::Tensor&, std::optional<int64_t>,
                                                        std::optional<int64_t>, bool, double, c10::string_view);
using AttentionBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, std::optional<int64_t>, std::optional<int64_t>, bool, double,
    c10::string_view);

std::tuple<at::Tensor, at::Tensor> attention_below_autograd(c10::DispatchKeySet ks, const at::Tensor& q,
                                                            const at::Tensor& k, const at::Tensor& v,
                                                            const at::Tensor& cu_q, const at::Tensor& cu_k,
                                                            std::optional<int64_t> max_q, std::optional<int64_t> max_k,
                                                            bool causal, double scale, c10::string_view backend) {
  if (run_cpp(ks, backend)) return packed_attention_fwd(q, k, v, cu_q, cu_k, causal, scale);
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fusedvlm::packed_attention", "").typed<AttentionSig>();
  return op.redispatch(ks & c10::after_autograd_keyset, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, backend);
}

struct PackedAttentionBackward : public Node {
  SavedVariable q, k, v, out, lse, cu_q, cu_k;
  bool shared_offsets = false;  // cu_k is cu_q (self-attention): saved once
  std::optional<int64_t> max_q, max_k;
  bool causal = true;
  double scale = 1.0;
  std::string backend;

  std::string name() const override { return "PackedAttentionBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* s : {&q, &k, &v, &out, &lse, &cu_q, &cu_k}) s->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fusedvlm::packed_attention_backward", "")
                               .typed<AttentionBackwardSig>();
    std::lock_guard<std::mutex> lock(mutex_);
    if (!grads[0].defined()) return variable_list(3);  // no gradient reaches the output: zero
    const auto self = getptr();
    const at::Tensor offsets_q = cu_q.unpack();
    auto [dq, dk, dv] = op.call(grads[0].contiguous(), q.unpack(), k.unpack(), v.unpack(), out.unpack(self),
                                lse.unpack(), offsets_q, shared_offsets ? offsets_q : cu_k.unpack(), max_q, max_k,
                                causal, scale, backend);
    return {dq, dk, dv};
  }
};

std::tuple<at::Tensor, at::Tensor> packed_attention_autograd(c10::DispatchKeySet ks, const at::Tensor& q,
                                                             const at::Tensor& k, const at::Tensor& v,
                                                             const at::Tensor& cu_q, const at::Tensor& cu_k,
                                                             std::optional<int64_t> max_q,
                                                             std::optional<int64_t> max_k, bool causal, double scale,
                                                             c10::string_view backend) {
  if (!torch::autograd::compute_requires_grad(q, k, v)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return attention_below_autograd(ks, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, backend);
  }
  refuse_forward_ad("packed_attention", {&q, &k, &v});
  auto node = c10::make_intrusive<PackedAttentionBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(q, k, v));
  at::Tensor out, lse;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::AutoGradMode no_grad(false);
    std::tie(out, lse) = attention_below_autograd(ks, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, backend);
  }
  torch::autograd::set_history(out, node);  // lse (softmax statistics) stays non-differentiable
  node->q = SavedVariable(q, false);
  node->k = SavedVariable(k, false);
  node->v = SavedVariable(v, false);
  node->out = SavedVariable(out, true);
  node->lse = SavedVariable(lse, false);
  node->cu_q = SavedVariable(cu_q, false);
  node->shared_offsets = cu_k.is_same(cu_q);
  if (!node->shared_offsets) node->cu_k = SavedVariable(cu_k, false);
  node->max_q = max_q;
  node->max_k = max_k;
  node->causal = causal;
  node->scale = scale;
  node->backend = std::string(backend);
  torch::autograd::fire_node_creation_hooks(node);
  return {out, lse};
}

// The backward op, entered from the node above (or a caller's own autograd): never
// differentiated itself, so it only routes like the forward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> packed_attention_backward_autograd(
    c10::DispatchKeySet ks, const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_q, const at::Tensor& cu_k,
    std::optional<int64_t> max_q, std::optional<int64_t> max_k, bool causal, double scale, c10::string_view backend) {
  at::AutoDispatchBelowADInplaceOrView guard;
  if (run_cpp(ks, backend)) return packed_attention_bwd(grad, q, k, v, out, lse, cu_q, cu_k, causal, scale);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fusedvlm::packed_attention_backward", "")
                             .typed<AttentionBackwardSig>();
  return op.redispatch(ks & c10::after_autograd_keyset, grad, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal,
                       scale, backend);
}

// ------------------------------------------------------------------------- pairwise cosine

using StatsSig = Stats(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, c10::string_view);

// Statistics, never differentiated: the outputs carry no graph, as under the public function's
// torch.no_grad().
Stats pairwise_cosine_stats_autograd(c10::DispatchKeySet ks, const at::Tensor& a, const at::Tensor& b,
                                     const at::Tensor& cu, bool positive, c10::string_view backend) {
  at::AutoDispatchBelowADInplaceOrView guard;
  if (run_cpp(ks, backend)) return pairwise_cosine_stats(a, b, cu, positive);
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fusedvlm::pairwise_cosine_stats", "").typed<StatsSig>();
  return op.redispatch(ks & c10::after_autograd_keyset, a, b, cu, positive, backend);
}

// ------------------------------------------------------------------------- local merge

using MergeSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            bool, int64_t, int64_t, c10::string_view);
using MergeBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, bool, int64_t, int64_t, std::array<bool, 3>,
    c10::string_view);

at::Tensor merge_below_autograd(c10::DispatchKeySet ks, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& lf, const std::optional<at::Tensor>& bias, bool residual, int64_t h,
                                int64_t w, c10::string_view backend) {
  if (run_cpp(ks, backend)) return local_merge_fwd(x, weight, lf, bias, residual, h, w, std::nullopt);
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fusedvlm::local_merge", "").typed<MergeSig>();
  return op.redispatch(ks & c10::after_autograd_keyset, x, weight, lf, bias, residual, h, w, backend);
}

struct LocalMergeBackward : public Node {
  SavedVariable x, weight;
  bool has_bias = false, residual = true;
  int64_t h = 0, w = 0;
  std::string backend;

  std::string name() const override { return "LocalMergeBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    x.reset_data();
    weight.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fusedvlm::local_merge_backward", "")
                               .typed<MergeBackwardSig>();
    std::lock_guard<std::mutex> lock(mutex_);
    // Edges: x, weight, lf_token, bias (an empty edge when there is none).
    const bool need_x = task_should_compute_output(0), need_w = task_should_compute_output(1),
               need_lf = task_should_compute_output(2), need_b = has_bias && task_should_compute_output(3);
    if (!grads[0].defined()) return variable_list(4);  // no gradient reaches the output: zero
    auto [dx, dw, dlf, db] = op.call(grads[0].contiguous(), x.unpack(), weight.unpack(), has_bias, residual, h, w,
                                     {need_x, need_w, need_lf}, backend);
    return {need_x ? dx : at::Tensor(), need_w ? dw : at::Tensor(), need_lf ? dlf : at::Tensor(),
            need_b ? db : at::Tensor()};
  }
};

at::Tensor local_merge_autograd(c10::DispatchKeySet ks, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& lf, const std::optional<at::Tensor>& bias, bool residual, int64_t h,
                                int64_t w, c10::string_view backend) {
  if (!torch::autograd::compute_requires_grad(x, weight, lf, bias)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return merge_below_autograd(ks, x, weight, lf, bias, residual, h, w, backend);
  }
  const at::Tensor none;
  refuse_forward_ad("local_merge", {&x, &weight, &lf, bias.has_value() ? &*bias : &none});
  auto node = c10::make_intrusive<LocalMergeBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, weight, lf, bias));
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::AutoGradMode no_grad(false);
    out = merge_below_autograd(ks, x, weight, lf, bias, residual, h, w, backend);
  }
  torch::autograd::set_history(out, node);
  node->x = SavedVariable(x, false);
  node->weight = SavedVariable(weight, false);
  node->has_bias = bias.has_value() && bias->defined();
  node->residual = residual;
  node->h = h;
  node->w = w;
  node->backend = std::string(backend);
  torch::autograd::fire_node_creation_hooks(node);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> local_merge_backward_autograd(
    c10::DispatchKeySet ks, const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, bool has_bias,
    bool residual, int64_t h, int64_t w, std::array<bool, 3> output_mask, c10::string_view backend) {
  at::AutoDispatchBelowADInplaceOrView guard;
  if (run_cpp(ks, backend))
    return local_merge_bwd(grad, x, weight, has_bias, residual, h, w, output_mask[0], output_mask[1], std::nullopt);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fusedvlm::local_merge_backward", "")
                             .typed<MergeBackwardSig>();
  return op.redispatch(ks & c10::after_autograd_keyset, grad, x, weight, has_bias, residual, h, w, output_mask,
                       backend);
}

}  // namespace
}  // namespace fusedvlm

TORCH_LIBRARY_IMPL(fusedvlm, AutogradCPU, m) {
  m.impl("local_merge", TORCH_FN(fusedvlm::local_merge_autograd));
  m.impl("local_merge_backward", TORCH_FN(fusedvlm::local_merge_backward_autograd));
  m.impl("packed_attention", TORCH_FN(fusedvlm::packed_attention_autograd));
  m.impl("packed_attention_backward", TORCH_FN(fusedvlm::packed_attention_backward_autograd));
  m.impl("pairwise_cosine_stats", TORCH_FN(fusedvlm::pairwise_cosine_stats_autograd));
}
