// One instantiation of the SM90 paged index scan (Di = 64, bfloat16 index heads, FP8 E4M3 keys with per-token scales):
// one file each, so the build compiles them in parallel.
#include "paged_indexer_sm90.cuh"

namespace msa::paged_indexer_sm90 {
template cudaError_t launch<64, cutlass::bfloat16_t, true>(const PagedIndexerParams&, cudaStream_t);
}  // namespace msa::paged_indexer_sm90
