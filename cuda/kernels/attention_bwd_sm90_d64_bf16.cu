// One instantiation per file: the builds run in parallel.
#include "attention_bwd_sm90.cuh"

namespace msa::attention_bwd_sm90 {
template cudaError_t launch<64, cutlass::bfloat16_t>(const AttentionBwdParams&, cudaStream_t);
}  // namespace msa::attention_bwd_sm90
