// One instantiation of the SM90 indexer (Di = 128, up to top_k = 32, bfloat16 index heads): one
// file each, so the build compiles them in parallel.
#include "indexer_sm90.cuh"

namespace msa::indexer_sm90 {
template cudaError_t launch<128, 31, cutlass::bfloat16_t>(const IndexerParams&, cudaStream_t);
}  // namespace msa::indexer_sm90
