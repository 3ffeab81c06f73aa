// The fused kernels for float32: their launches, instantiated here (pka_fused_typed.cuh).
#include "pka_fused_typed.cuh"

namespace pka {
namespace fused {

template bool fwd_typed<float>(const Inputs&, const Dims&, double, double,
                               const std::optional<Tensor>&, Tensor&, Tensor&);
template bool bwd_typed<float>(const Inputs&, const Dims&, double, double,
                               const std::optional<Tensor>&, const BwdTensors&);

}  // namespace fused
}  // namespace pka
