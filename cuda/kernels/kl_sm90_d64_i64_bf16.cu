// One (D, Di, dtype) per file, its value and gradient passes and the dense-mode kernel, and
// here the student pass of (Di, dtype): the builds run in parallel.
#include "dense_kl_sm90.cuh"
#include "kl_sm90.cuh"

namespace msa::kl_sm90 {
template cudaError_t launch<64, 64, cutlass::bfloat16_t, KLPass::kValue>(const KLParams&, cudaStream_t);
template cudaError_t launch<64, 64, cutlass::bfloat16_t, KLPass::kGradient>(const KLParams&, cudaStream_t);
template cudaError_t launch<64, 64, cutlass::bfloat16_t, KLPass::kStudent>(const KLParams&, cudaStream_t);
template cudaError_t launch_dense<64, 64, cutlass::bfloat16_t>(const DenseKLParams&, cudaStream_t);
}  // namespace msa::kl_sm90
