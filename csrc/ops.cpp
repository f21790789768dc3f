// The fusedvlm:: operators' autograd kernels for CPU tensors (AutogradCPU), in C++ so that an
// eager call costs one dispatcher hop instead of two Python kernels.
//
// The schemas, fake kernels, FLOP formulas, CUDA kernels and the Python autograd registration
// (alias key Autograd) live in kernels/*.py, so every op exists on a machine that cannot build
// this library. Once it is loaded, these kernels take precedence for CPU tensors (a kernel on a
// backend's own autograd key beats the alias), without replacing anything:
//
// * When nothing but the CPU backend would see the call (no Python mode such as
//   FlopCounterMode or FakeTensorMode, no functionalization: the keys below autograd are plain
//   CPU) and the backend choice is the C++ kernels (fusedvlm.backend: FUSEDVLM_BACKEND cpp, or
//   auto without the Triton interpreter), the C++ kernel runs directly.
// * Otherwise the call is redispatched below autograd, to the mode or to the Python CPU kernel,
//   which routes to the Triton interpreter or the torch path exactly as it does without this file.
//
// Gradients: a C++ autograd node whose backward calls fusedvlm::<op>_backward through the
// dispatcher, so a mode active during backward sees (and counts) it.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

#include "common.h"

namespace fusedvlm {

std::tuple<at::Tensor, at::Tensor> packed_attention_fwd(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                        const at::Tensor&, const at::Tensor&, bool, double);
Stats pairwise_cosine_stats(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool);
at::Tensor local_merge_fwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           bool, int64_t, int64_t, std::optional<bool>);

namespace {

constexpr int64_t kMaxHeadDim = 256;  // kernels/packed_attention.py _MAX_HEAD_DIM

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// fusedvlm.backend.cpu_implementation's choice of "cpp", from the same environment variables.
// Anything else (torch, the interpreter, an invalid value that Python reports) goes to Python.
bool cpp_selected() {
  const char* choice = std::getenv("FUSEDVLM_BACKEND");
  if (choice != nullptr && *choice != '\0') {
    if (strcasecmp(choice, "cpp") == 0) return true;
    if (strcasecmp(choice, "auto") != 0) return false;
  }
  const char* interp = std::getenv("TRITON_INTERPRET");
  const bool interpreter = interp != nullptr && *interp != '\0' && std::strcmp(interp, "0") != 0 &&
                           std::strcmp(interp, "false") != 0 && std::strcmp(interp, "False") != 0;
  return !interpreter;
}

// True when redispatching below autograd would reach the CPU kernel and nothing else.
bool plain_cpu(c10::DispatchKeySet ks) {
  const auto below = (ks & c10::after_autograd_keyset).remove(c10::DispatchKey::ADInplaceOrView);
  return below.highestPriorityTypeId() == c10::DispatchKey::CPU;
}

std::string dtype_name(const at::Tensor& t) {
  return "torch." + std::string(std::get<0>(c10::getDtypeNames(t.scalar_type())));
}

bool half_or_float(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}

// The public functions' argument checks (kernels/*.py) with the same messages: with this library
// loaded a CPU call goes straight to the op, and these are its checks.
void check_offsets_tensor(const at::Tensor& cu, const at::Tensor& like, const char* name) {
  TORCH_CHECK_VALUE(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.sym_numel() >= 1, name,
                    " must be a 1-D int32 tensor of n + 1 >= 1 offsets, got ", dtype_name(cu), " ", cu.sym_sizes());
  TORCH_CHECK_VALUE(cu.device() == like.device(), name, " is on ", cu.device(), " but q is on ", like.device());
}

void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                     const at::Tensor& cu_k) {
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"q", &q}, {"k", &k}, {"v", &v}}) {
    TORCH_CHECK_VALUE(t->dim() == 3, name, " must be a (T, H, D) tensor, got ", t->sym_sizes());
    TORCH_CHECK_VALUE(half_or_float(*t), name, " must be float32, float16 or bfloat16, got ", dtype_name(*t));
  }
  TORCH_CHECK_VALUE(q.device() == k.device() && k.device() == v.device(), "q, k, v must be on one device, got ",
                    q.device(), ", ", k.device(), ", ", v.device());
  TORCH_CHECK_VALUE(k.sym_sizes() == v.sym_sizes(), "k and v must have the same shape, got ", k.sym_sizes(), " and ", v.sym_sizes());
  TORCH_CHECK_VALUE(q.sym_size(2) == k.sym_size(2), "head dim of q (", q.sym_size(2), ") and k/v (", k.sym_size(2), ") differ");
  TORCH_CHECK_VALUE(q.sym_size(2) >= 1 && q.sym_size(2) <= kMaxHeadDim, "head dim must be in 1..", kMaxHeadDim, ", got ",
                    q.sym_size(2));
  TORCH_CHECK_VALUE(k.sym_size(1) > 0 && q.sym_size(1) % k.sym_size(1) == 0, "query heads (", q.sym_size(1),
                    ") must be a positive multiple of key/value heads (", k.sym_size(1), ")");
  check_offsets_tensor(cu_q, q, "cu_seqlens_q");
  check_offsets_tensor(cu_k, q, "cu_seqlens_k");
  TORCH_CHECK_VALUE(cu_q.sym_numel() == cu_k.sym_numel(), "cu_seqlens_q has ", cu_q.sym_numel() - 1,
                    " segments, cu_seqlens_k ", cu_k.sym_numel() - 1, "; they must match");
}

void check_pairs(const at::Tensor& a, const at::Tensor& b, const at::Tensor& cu) {
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"h_a", &a}, {"h_b", &b}}) {
    TORCH_CHECK_VALUE(t->dim() == 2, name, " must be a (T, d) tensor, got ", t->sym_sizes());
    TORCH_CHECK_VALUE(half_or_float(*t), name, " must be float32, float16 or bfloat16, got ", dtype_name(*t));
  }
  TORCH_CHECK_VALUE(a.sym_sizes() == b.sym_sizes(), "h_a and h_b must have one shape (pairs cut to the shorter branch), got ",
                    a.sym_sizes(), " and ", b.sym_sizes());
  TORCH_CHECK_VALUE(a.device() == b.device(), "h_a and h_b must be on one device, got ", a.device(), " and ",
                    b.device());
  TORCH_CHECK_VALUE(a.sym_size(1) > 0, "hidden size d must be >= 1, got 0");
  TORCH_CHECK_VALUE(cu.device() == a.device(), "cu_seqlens is on ", cu.device(), " but h_a is on ", a.device());
  TORCH_CHECK_VALUE(cu.scalar_type() == at::kInt, "cu_seqlens must be int32, got ", dtype_name(cu));
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.sym_numel() >= 1, "cu_seqlens must be 1-D with n + 1 >= 1 entries, got shape ",
                    cu.sym_sizes());
}

void check_merge(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lf,
                 const std::optional<at::Tensor>& bias, bool residual) {
  TORCH_CHECK_VALUE(x.dim() == 3, "local_merge: x must be (V, H*W, C_in), got shape ", x.sym_sizes());
  TORCH_CHECK_VALUE(x.sym_numel() > 0, "local_merge: x has an empty dimension: ", x.sym_sizes());
  const auto c_in = x.sym_size(2);
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.sym_size(1) == c_in && weight.sym_size(2) == 3 &&
                        weight.sym_size(3) == 3,
                    "local_merge: weight must be (C_out, ", c_in, ", 3, 3), got ", weight.sym_sizes());
  const auto c_out = weight.sym_size(0);
  TORCH_CHECK_VALUE(lf.dim() == 1 && lf.sym_size(0) == c_out, "local_merge: lf_token must be (", c_out, ",), got ",
                    lf.sym_sizes());
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK_VALUE(!has_bias || (bias->dim() == 1 && bias->sym_size(0) == c_out), "local_merge: bias must be (",
                    c_out, ",), got ", has_bias ? bias->sym_sizes() : c10::SymIntArrayRef());
  TORCH_CHECK_VALUE(!residual || c_in == c_out, "local_merge: residual needs C_in == C_out, got ", c_in, " -> ",
                    c_out);
  TORCH_CHECK_TYPE(half_or_float(x), "local_merge: x dtype ", dtype_name(x), " not supported (fp32, fp16, bf16)");
  const bool floating = weight.is_floating_point() && lf.is_floating_point() && (!has_bias || bias->is_floating_point());
  TORCH_CHECK_TYPE(floating, "local_merge: all tensors must be floating point, got ", dtype_name(weight), ", ",
                   dtype_name(lf), has_bias ? ", " + dtype_name(*bias) : std::string());
  const bool one_device = weight.device() == x.device() && lf.device() == x.device() &&
                          (!has_bias || bias->device() == x.device());
  TORCH_CHECK_VALUE(one_device, "local_merge: tensors on different devices ", x.device(), ", ", weight.device(), ", ",
                    lf.device());
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
                                                        std::optional<int64_t>, bool, double);
using AttentionBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, std::optional<int64_t>, std::optional<int64_t>, bool, double);

const c10::TypedOperatorHandle<AttentionSig>& attention_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fusedvlm::packed_attention", "").typed<AttentionSig>();
  return op;
}

std::tuple<at::Tensor, at::Tensor> attention_below_autograd(c10::DispatchKeySet ks, const at::Tensor& q,
                                                            const at::Tensor& k, const at::Tensor& v,
                                                            const at::Tensor& cu_q, const at::Tensor& cu_k,
                                                            std::optional<int64_t> max_q, std::optional<int64_t> max_k,
                                                            bool causal, double scale) {
  if (plain_cpu(ks) && cpp_selected()) return packed_attention_fwd(q, k, v, cu_q, cu_k, causal, scale);
  return attention_op().redispatch(ks & c10::after_autograd_keyset, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale);
}

struct PackedAttention : public torch::autograd::Function<PackedAttention> {
  static variable_list forward(AutogradContext* ctx, c10::DispatchKeySet ks, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& cu_q, const at::Tensor& cu_k,
                               std::optional<int64_t> max_q, std::optional<int64_t> max_k, bool causal,
                               double scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = attention_below_autograd(ks, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale);
    ctx->save_for_backward({q, k, v, out, lse, cu_q, cu_k});
    ctx->saved_data["max_q"] = max_q;
    ctx->saved_data["max_k"] = max_k;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
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
                                ctx->saved_data["scale"].toDouble());
    return {at::Tensor(), dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> packed_attention_autograd(c10::DispatchKeySet ks, const at::Tensor& q,
                                                             const at::Tensor& k, const at::Tensor& v,
                                                             const at::Tensor& cu_q, const at::Tensor& cu_k,
                                                             std::optional<int64_t> max_q,
                                                             std::optional<int64_t> max_k, bool causal, double scale) {
  check_attention(q, k, v, cu_q, cu_k);
  if (!any_requires_grad({&q, &k, &v})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return attention_below_autograd(ks, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale);
  }
  auto outs = PackedAttention::apply(ks, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale);
  return {outs[0], outs[1]};
}

// ------------------------------------------------------------------------- pairwise cosine

using StatsSig = Stats(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool);

// Statistics, never differentiated: the outputs carry no graph, as under the public function's
// torch.no_grad().
Stats pairwise_cosine_stats_autograd(c10::DispatchKeySet ks, const at::Tensor& a, const at::Tensor& b,
                                          const at::Tensor& cu, bool positive) {
  check_pairs(a, b, cu);
  at::AutoDispatchBelowADInplaceOrView guard;
  if (plain_cpu(ks) && cpp_selected()) return pairwise_cosine_stats(a, b, cu, positive);
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fusedvlm::pairwise_cosine_stats", "").typed<StatsSig>();
  return op.redispatch(ks & c10::after_autograd_keyset, a, b, cu, positive);
}

// ------------------------------------------------------------------------- local merge

using MergeSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            bool, int64_t, int64_t);
using MergeBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, bool, int64_t, int64_t, std::array<bool, 3>);

at::Tensor merge_below_autograd(c10::DispatchKeySet ks, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& lf, const std::optional<at::Tensor>& bias, bool residual, int64_t h,
                                int64_t w) {
  if (plain_cpu(ks) && cpp_selected()) return local_merge_fwd(x, weight, lf, bias, residual, h, w, std::nullopt);
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fusedvlm::local_merge", "").typed<MergeSig>();
  return op.redispatch(ks & c10::after_autograd_keyset, x, weight, lf, bias, residual, h, w);
}

struct LocalMerge : public torch::autograd::Function<LocalMerge> {
  static at::Tensor forward(AutogradContext* ctx, c10::DispatchKeySet ks, const at::Tensor& x,
                            const at::Tensor& weight, const at::Tensor& lf, const std::optional<at::Tensor>& bias,
                            bool residual, int64_t h, int64_t w) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = merge_below_autograd(ks, x, weight, lf, bias, residual, h, w);
    ctx->save_for_backward({x, weight});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["residual"] = residual;
    ctx->saved_data["h"] = h;
    ctx->saved_data["w"] = w;
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
                                     {need_x, need_w, need_lf});
    return {at::Tensor(), need_x ? dx : at::Tensor(), need_w ? dw : at::Tensor(), need_lf ? dlf : at::Tensor(),
            need_b ? db : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor local_merge_autograd(c10::DispatchKeySet ks, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& lf, const std::optional<at::Tensor>& bias, bool residual, int64_t h,
                                int64_t w) {
  check_merge(x, weight, lf, bias, residual);
  const at::Tensor none;
  if (!any_requires_grad({&x, &weight, &lf, bias.has_value() ? &*bias : &none})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return merge_below_autograd(ks, x, weight, lf, bias, residual, h, w);
  }
  return LocalMerge::apply(ks, x, weight, lf, bias, residual, h, w);
}

}  // namespace
}  // namespace fusedvlm

TORCH_LIBRARY_IMPL(fusedvlm, AutogradCPU, m) {
  m.impl("local_merge", TORCH_FN(fusedvlm::local_merge_autograd));
  m.impl("packed_attention", TORCH_FN(fusedvlm::packed_attention_autograd));
  m.impl("pairwise_cosine_stats", TORCH_FN(fusedvlm::pairwise_cosine_stats_autograd));
}
