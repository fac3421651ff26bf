// Plain parameter structs, one per kernel family: what an FFI handler fills from XLA buffers
// and attributes, and all a launcher sees. No XLA or CuTe types; sizes and strides in
// elements; names as in shared/spec/msa.md (B, T, S, Hq, Hkv, D, Di, K).
#pragma once

#include <cstdint>

namespace msa {

// select_blocks: the fused indexer (spec, "Index branch"). Dense row-major tensors:
//   index_q [B, T, Hkv, Di], index_k [B, S, Di] (bf16), q_offset / kv_length [B] (int32),
//   block_indices [B, T, Hkv, top_k] (int32, written whole).
struct IndexerParams {
  const void* index_q;
  const void* index_k;
  const int32_t* q_offset;   // device pointer: key position of query 0, per row
  const int32_t* kv_length;  // device pointer: keys that exist, per row
  int32_t* block_indices;
  int batch;           // B
  int q_len;           // T
  int kv_len;          // S
  int num_kv_heads;    // Hkv (one index query head per group)
  int index_head_dim;  // Di
  int block_size;      // Bk
  int top_k;           // K, local block included
  float index_softmax_scale;  // si; ranking uses si * <index_q, index_k> as the spec does
};

}  // namespace msa
