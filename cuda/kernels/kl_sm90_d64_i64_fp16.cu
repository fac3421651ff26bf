// One (D, Di, dtype) per file, both passes: the builds run in parallel.
#include "kl_sm90.cuh"

namespace msa::kl_sm90 {
template cudaError_t launch<64, 64, cutlass::half_t, false>(const KLParams&, cudaStream_t);
template cudaError_t launch<64, 64, cutlass::half_t, true>(const KLParams&, cudaStream_t);
}  // namespace msa::kl_sm90
