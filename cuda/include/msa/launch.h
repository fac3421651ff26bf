// Host entry points of the kernels, one per kernel family and architecture. Each checks
// what its instantiations cannot serve (returning cudaErrorInvalidValue, never aborting),
// builds its TMA descriptors, and launches on `stream` without synchronising.
#pragma once

#include <cuda_runtime_api.h>

#include "msa/params.h"

namespace msa {

enum class ElementType { kBFloat16, kFloat16 };

// Which (Di, top_k) the SM90 indexer is compiled for, index heads bfloat16 or float16; the FFI
// handler and Python's `supports` ask the same question (see indexer_sm90.cuh).
bool indexer_sm90_supports(int index_head_dim, int block_size, int top_k);
cudaError_t launch_indexer_sm90(const IndexerParams& params, ElementType dtype, cudaStream_t stream);

// Which (Di, page size, top_k) the SM90 paged index scan is compiled for (paged_indexer_sm90.cuh);
// index heads bfloat16 or float16, keys in their dtype or FP8 E4M3 (params.index_k_scale set).
bool paged_indexer_sm90_supports(int index_head_dim, int page_size, int top_k);
cudaError_t launch_paged_indexer_sm90(const PagedIndexerParams& params, ElementType dtype, cudaStream_t stream);

// Which (D, dtype) the SM90 KV-outer attention forward is compiled for (attention_fwd_sm90.cuh).
bool attention_fwd_sm90_supports(int head_dim, int block_size, int group);
cudaError_t launch_attention_fwd_sm90(const AttentionFwdParams& params, ElementType dtype, cudaStream_t stream);

// Which (D, G) the SM90 KV-outer attention backward is compiled for (attention_bwd_sm90.cuh).
bool attention_bwd_sm90_supports(int head_dim, int block_size, int group);
cudaError_t launch_attention_bwd_sm90(const AttentionBwdParams& params, ElementType dtype, cudaStream_t stream);

// Which (D, Di, G) the SM90 KL passes are compiled for (kl_sm90.cuh); the index tensors share
// q's dtype.
bool kl_sm90_supports(int head_dim, int index_head_dim, int block_size, int group);
cudaError_t launch_kl_sm90(const KLParams& params, ElementType dtype, cudaStream_t stream);

// Which (D, Di, G) the SM90 dense-mode KL is compiled for (dense_kl_sm90.cuh); one dtype for all
// four main and index tensors.
bool dense_kl_sm90_supports(int head_dim, int index_head_dim, int group);
cudaError_t launch_dense_kl_sm90(const DenseKLParams& params, ElementType dtype, cudaStream_t stream);

}  // namespace msa
