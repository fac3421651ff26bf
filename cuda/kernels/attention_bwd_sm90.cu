// Host entry of the SM90 KV-outer attention backward: picks the instantiation for (D, dtype).
#include "attention_bwd_sm90.cuh"
#include "msa/launch.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "sm_90 without the 'a' suffix: set MSA_JAX_CUDA_ARCHS=90a"
#endif

namespace msa {
namespace attention_bwd_sm90 {
extern template cudaError_t launch<64, cutlass::bfloat16_t>(const AttentionBwdParams&, cudaStream_t);
extern template cudaError_t launch<64, cutlass::half_t>(const AttentionBwdParams&, cudaStream_t);
extern template cudaError_t launch<128, cutlass::bfloat16_t>(const AttentionBwdParams&, cudaStream_t);
extern template cudaError_t launch<128, cutlass::half_t>(const AttentionBwdParams&, cudaStream_t);
}  // namespace attention_bwd_sm90

bool attention_bwd_sm90_supports(int head_dim, int block_size, int group) {
  return (head_dim == 64 || head_dim == 128) && block_size == attention_sm90::kBlock && group >= 1 &&
         group <= attention_sm90::kRows;
}

cudaError_t launch_attention_bwd_sm90(const AttentionBwdParams& p, ElementType dtype, cudaStream_t stream) {
  const int group = p.num_kv_heads > 0 ? p.num_q_heads / p.num_kv_heads : 0;
  if (!attention_bwd_sm90_supports(p.head_dim, p.block_size, group)) return cudaErrorInvalidValue;
  using attention_bwd_sm90::launch;
  const bool bf16 = dtype == ElementType::kBFloat16;
  if (p.head_dim == 64) {
    return bf16 ? launch<64, cutlass::bfloat16_t>(p, stream) : launch<64, cutlass::half_t>(p, stream);
  }
  return bf16 ? launch<128, cutlass::bfloat16_t>(p, stream) : launch<128, cutlass::half_t>(p, stream);
}

}  // namespace msa
