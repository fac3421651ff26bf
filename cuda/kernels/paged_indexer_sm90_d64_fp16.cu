// One instantiation of the SM90 paged index scan (Di = 64, float16 index heads, keys in the same dtype):
// one file each, so the build compiles them in parallel.
#include "paged_indexer_sm90.cuh"

namespace msa::paged_indexer_sm90 {
template cudaError_t launch<64, cutlass::half_t, false>(const PagedIndexerParams&, cudaStream_t);
}  // namespace msa::paged_indexer_sm90
