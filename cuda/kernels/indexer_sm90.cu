// Host entry of the SM90 indexer: picks the instantiation for (Di, top_k, dtype).
#include "indexer_sm90.cuh"
#include "msa/launch.h"

// Hopper kernels use wgmma / setmaxnreg, which exist only in the arch-specific target.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "sm_90 without the 'a' suffix: set MSA_JAX_CUDA_ARCHS=90a"
#endif

namespace msa {
namespace indexer_sm90 {
#define MSA_INDEXER_EXTERN(DI, KEEP)                                                                     \
  extern template cudaError_t launch<DI, KEEP, cutlass::bfloat16_t>(const IndexerParams&, cudaStream_t); \
  extern template cudaError_t launch<DI, KEEP, cutlass::half_t>(const IndexerParams&, cudaStream_t);
MSA_INDEXER_EXTERN(64, 15)
MSA_INDEXER_EXTERN(64, 31)
MSA_INDEXER_EXTERN(128, 15)
MSA_INDEXER_EXTERN(128, 31)
#undef MSA_INDEXER_EXTERN

template <class Element>
cudaError_t launch_dtype(const IndexerParams& p, cudaStream_t stream) {
  const bool narrow = p.top_k <= 16;
  if (p.index_head_dim == 64) {
    return narrow ? launch<64, 15, Element>(p, stream) : launch<64, 31, Element>(p, stream);
  }
  return narrow ? launch<128, 15, Element>(p, stream) : launch<128, 31, Element>(p, stream);
}
}  // namespace indexer_sm90

bool indexer_sm90_supports(int index_head_dim, int block_size, int top_k) {
  return (index_head_dim == 64 || index_head_dim == 128) && block_size == indexer_sm90::kBlock &&
         top_k >= 1 && top_k <= 32;
}

cudaError_t launch_indexer_sm90(const IndexerParams& p, ElementType dtype, cudaStream_t stream) {
  if (!indexer_sm90_supports(p.index_head_dim, p.block_size, p.top_k)) return cudaErrorInvalidValue;
  return dtype == ElementType::kBFloat16 ? indexer_sm90::launch_dtype<cutlass::bfloat16_t>(p, stream)
                                         : indexer_sm90::launch_dtype<cutlass::half_t>(p, stream);
}

}  // namespace msa
