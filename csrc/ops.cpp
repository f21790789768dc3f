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
// Gradients: a C++ autograd node whose backward calls fusedvlm::<op>_backward through the
// dispatcher, so a mode active during backward sees (and counts) it.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
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

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// True when the caller chose the C++ kernel and redispatching below autograd would reach the
// CPU kernel and nothing else.
bool run_cpp(c10::DispatchKeySet ks, c10::string_view backend) {
  const auto below = (ks & c10::after_autograd_keyset).remove(c10::DispatchKey::ADInplaceOrView);
  return backend == "cpp" && below.highestPriorityTypeId() == c10::DispatchKey::CPU;
}

bool any_requires_grad(std::initializer_list<const at::Tensor*> tensors) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : tensors)
    if (t->defined() && t->requires_grad()) return true;
  return false;
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

struct PackedAttention : public torch::autograd::Function<PackedAttention> {
  static variable_list forward(AutogradContext* ctx, c10::DispatchKeySet ks, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& cu_q, const at::Tensor& cu_k,
                               std::optional<int64_t> max_q, std::optional<int64_t> max_k, bool causal,
                               double scale, c10::string_view backend) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = attention_below_autograd(ks, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, backend);
    ctx->save_for_backward({q, k, v, out, lse, cu_q, cu_k});
    ctx->saved_data["max_q"] = max_q;
    ctx->saved_data["max_k"] = max_k;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["backend"] = std::string(backend);
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fusedvlm::packed_attention_backward", "")
                               .typed<AttentionBackwardSig>();
    const auto s = ctx->get_saved_variables();
    auto [dq, dk, dv] = op.call(grads[0].contiguous(), s[0], s[1], s[2], s[3], s[4], s[5], s[6],
                                ctx->saved_data["max_q"].toOptional<int64_t>(),
                                ctx->saved_data["max_k"].toOptional<int64_t>(), ctx->saved_data["causal"].toBool(),
                                ctx->saved_data["scale"].toDouble(), ctx->saved_data["backend"].toStringRef());
    return {at::Tensor(), dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> packed_attention_autograd(c10::DispatchKeySet ks, const at::Tensor& q,
                                                             const at::Tensor& k, const at::Tensor& v,
                                                             const at::Tensor& cu_q, const at::Tensor& cu_k,
                                                             std::optional<int64_t> max_q,
                                                             std::optional<int64_t> max_k, bool causal, double scale,
                                                             c10::string_view backend) {
  if (!any_requires_grad({&q, &k, &v})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return attention_below_autograd(ks, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, backend);
  }
  auto outs = PackedAttention::apply(ks, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, backend);
  return {outs[0], outs[1]};
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

struct LocalMerge : public torch::autograd::Function<LocalMerge> {
  static at::Tensor forward(AutogradContext* ctx, c10::DispatchKeySet ks, const at::Tensor& x,
                            const at::Tensor& weight, const at::Tensor& lf, const std::optional<at::Tensor>& bias,
                            bool residual, int64_t h, int64_t w, c10::string_view backend) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = merge_below_autograd(ks, x, weight, lf, bias, residual, h, w, backend);
    ctx->save_for_backward({x, weight});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["residual"] = residual;
    ctx->saved_data["h"] = h;
    ctx->saved_data["w"] = w;
    ctx->saved_data["backend"] = std::string(backend);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fusedvlm::local_merge_backward", "")
                               .typed<MergeBackwardSig>();
    const auto s = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // Indices among the tensor inputs: x, weight, lf_token, then bias when there is one.
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1),
               need_lf = ctx->needs_input_grad(2), need_b = has_bias && ctx->needs_input_grad(3);
    auto [dx, dw, dlf, db] = op.call(grads[0].contiguous(), s[0], s[1], has_bias, ctx->saved_data["residual"].toBool(),
                                     ctx->saved_data["h"].toInt(), ctx->saved_data["w"].toInt(),
                                     {need_x, need_w, need_lf}, ctx->saved_data["backend"].toStringRef());
    return {at::Tensor(), need_x ? dx : at::Tensor(), need_w ? dw : at::Tensor(), need_lf ? dlf : at::Tensor(),
            need_b ? db : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor local_merge_autograd(c10::DispatchKeySet ks, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& lf, const std::optional<at::Tensor>& bias, bool residual, int64_t h,
                                int64_t w, c10::string_view backend) {
  const at::Tensor none;
  if (!any_requires_grad({&x, &weight, &lf, bias.has_value() ? &*bias : &none})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return merge_below_autograd(ks, x, weight, lf, bias, residual, h, w, backend);
  }
  return LocalMerge::apply(ks, x, weight, lf, bias, residual, h, w, backend);
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
