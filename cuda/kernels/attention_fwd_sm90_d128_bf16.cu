// One instantiation per file: the builds run in parallel.
#include "attention_fwd_sm90.cuh"

namespace msa::attention_fwd_sm90 {
template cudaError_t launch<128, cutlass::bfloat16_t>(const AttentionFwdParams&, cudaStream_t);
}  // namespace msa::attention_fwd_sm90
