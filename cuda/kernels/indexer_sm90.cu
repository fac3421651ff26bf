// Host entry of the SM90 indexer: picks the instantiation for (Di, top_k).
#include "indexer_sm90.cuh"
#include "msa/launch.h"

// Hopper kernels use wgmma / setmaxnreg, which exist only in the arch-specific target.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "sm_90 without the 'a' suffix: set MSA_JAX_CUDA_ARCHS=90a"
#endif

namespace msa {
namespace indexer_sm90 {
extern template cudaError_t launch<64, 15>(const IndexerParams&, cudaStream_t);
extern template cudaError_t launch<64, 31>(const IndexerParams&, cudaStream_t);
extern template cudaError_t launch<128, 15>(const IndexerParams&, cudaStream_t);
extern template cudaError_t launch<128, 31>(const IndexerParams&, cudaStream_t);
}  // namespace indexer_sm90

bool indexer_sm90_supports(int index_head_dim, int block_size, int top_k) {
  return (index_head_dim == 64 || index_head_dim == 128) && block_size == indexer_sm90::kBlock &&
         top_k >= 1 && top_k <= 32;
}

cudaError_t launch_indexer_sm90(const IndexerParams& p, cudaStream_t stream) {
  if (!indexer_sm90_supports(p.index_head_dim, p.block_size, p.top_k)) return cudaErrorInvalidValue;
  const bool narrow = p.top_k <= 16;
  if (p.index_head_dim == 64) {
    return narrow ? indexer_sm90::launch<64, 15>(p, stream) : indexer_sm90::launch<64, 31>(p, stream);
  }
  return narrow ? indexer_sm90::launch<128, 15>(p, stream) : indexer_sm90::launch<128, 31>(p, stream);
}

}  // namespace msa
