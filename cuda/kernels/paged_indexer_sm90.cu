// Host entry of the SM90 paged index scan: picks the instantiation for (Di, index dtype, key
// storage).
#include "msa/launch.h"
#include "paged_indexer_sm90.cuh"

namespace msa {
namespace paged_indexer_sm90 {
#define MSA_PAGED_INDEXER_EXTERN(DI)                                                                            \
  extern template cudaError_t launch<DI, cutlass::bfloat16_t, false>(const PagedIndexerParams&, cudaStream_t); \
  extern template cudaError_t launch<DI, cutlass::bfloat16_t, true>(const PagedIndexerParams&, cudaStream_t);  \
  extern template cudaError_t launch<DI, cutlass::half_t, false>(const PagedIndexerParams&, cudaStream_t);     \
  extern template cudaError_t launch<DI, cutlass::half_t, true>(const PagedIndexerParams&, cudaStream_t);
MSA_PAGED_INDEXER_EXTERN(64)
MSA_PAGED_INDEXER_EXTERN(128)
#undef MSA_PAGED_INDEXER_EXTERN

template <class Element>
cudaError_t launch_dtype(const PagedIndexerParams& p, cudaStream_t stream) {
  const bool fp8 = p.index_k_scale != nullptr;
  if (p.index_head_dim == 64) {
    return fp8 ? launch<64, Element, true>(p, stream) : launch<64, Element, false>(p, stream);
  }
  return fp8 ? launch<128, Element, true>(p, stream) : launch<128, Element, false>(p, stream);
}
}  // namespace paged_indexer_sm90

bool paged_indexer_sm90_supports(int index_head_dim, int page_size, int top_k) {
  // top_k 1 keeps no list (msa_jax/paged_scan.py needs no scan); 32 is the indexer's limit too.
  return (index_head_dim == 64 || index_head_dim == 128) && page_size == paged_indexer_sm90::kPage && top_k >= 2 &&
         top_k <= 32;
}

cudaError_t launch_paged_indexer_sm90(const PagedIndexerParams& p, ElementType dtype, cudaStream_t stream) {
  if (!paged_indexer_sm90_supports(p.index_head_dim, p.page_size, p.top_k)) return cudaErrorInvalidValue;
  return dtype == ElementType::kBFloat16 ? paged_indexer_sm90::launch_dtype<cutlass::bfloat16_t>(p, stream)
                                         : paged_indexer_sm90::launch_dtype<cutlass::half_t>(p, stream);
}

}  // namespace msa
