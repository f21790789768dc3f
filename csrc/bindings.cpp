// Python entry points of the CPU kernels. The fusedvlm:: operator schemas, fake kernels, autograd
// and FLOP formulas are registered in Python (kernels/*.py) so that they exist, with a torch
// fallback, on machines that cannot build this extension.
#include "common.h"

namespace fusedvlm {
std::tuple<at::Tensor, at::Tensor> packed_attention_fwd(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                        const at::Tensor&, const at::Tensor&, bool, double);
std::tuple<at::Tensor, at::Tensor, at::Tensor> packed_attention_bwd(const at::Tensor&, const at::Tensor&,
                                                                    const at::Tensor&, const at::Tensor&,
                                                                    const at::Tensor&, const at::Tensor&,
                                                                    const at::Tensor&, const at::Tensor&, bool, double);
at::Tensor pairwise_cosine_stats(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool);
}  // namespace fusedvlm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("packed_attention_fwd", &fusedvlm::packed_attention_fwd);
  m.def("packed_attention_bwd", &fusedvlm::packed_attention_bwd);
  m.def("pairwise_cosine_stats", &fusedvlm::pairwise_cosine_stats);
  m.def("have_blas", &fusedvlm::have_blas);
}
