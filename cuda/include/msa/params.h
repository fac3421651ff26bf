// Plain parameter structs, one per kernel family: what an FFI handler fills from XLA buffers
// and attributes, and all a launcher sees. No XLA or CuTe types; sizes and strides in
// elements; names as in shared/spec/msa.md (B, T, S, Hq, Hkv, D, Di, K).
#pragma once

#include <cstdint>

namespace msa {

// select_blocks: the fused indexer (spec, "Index branch"). Dense row-major tensors:
//   index_q [B, T, Hkv, Di], index_k [B, S, Di] (bf16), q_offset / kv_length [B] (int32),
//   doc [B, T] (int32), block_indices [B, T, Hkv, top_k] (int32, written whole).
struct IndexerParams {
  const void* index_q;
  const void* index_k;
  const int32_t* q_offset;   // device pointer: key position of query 0, per row
  const int32_t* kv_length;  // device pointer: keys that exist, per row
  const int32_t* doc;        // device pointer [B, T]: first key of each query's document (0 without packed documents)
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

// paged_select_blocks: the paged index scan (spec, "Inference"), one list per (batch row, split).
// Dense row-major tensors:
//   index_q [B, T, Hkv, Di] (bf16 or fp16), read as [B, rows, Di] with rows = T * Hkv, row
//     r = t * Hkv + g;
//   index_k [P, page, Di] pages, index_q's dtype, or FP8 E4M3 iff index_k_scale is set, with
//     index_k_scale [P, page] float32 (one scale per token);
//   page_table [B, max_pages] int32 (entries clamped into [0, P) when read);
//   local_page [B, T] int32: each query's local page L(i), -1 for padding queries;
//   scores [B, rows, splits, top_k - 1] float32 and ids (same shape, int32), written whole:
//     split s scans logical pages [s * pages_per_split, (s + 1) * pages_per_split); each row's
//     list holds its best top_k - 1 candidate pages (j < L(i)) of that range, unranked, by
//     score si * max over the page's keys of <index_q, index_k> (times the key's scale for
//     FP8); unused entries are (-inf, -1).
struct PagedIndexerParams {
  const void* index_q;
  const void* index_k;
  const float* index_k_scale;  // nullptr: keys in index_q's dtype
  const int32_t* page_table;
  const int32_t* local_page;
  float* scores;
  int32_t* ids;
  int batch;            // B
  int q_len;            // T
  int num_kv_heads;     // Hkv
  int index_head_dim;   // Di
  int num_pages;        // P, >= 1
  int page_size;        // page = Bk
  int max_pages;        // page-table columns
  int top_k;            // K, local page included (lists hold K - 1)
  int splits;           // lists per row
  int pages_per_split;  // splits * pages_per_split >= max_pages
  float index_softmax_scale;  // si > 0
};

// What every KV-outer kernel (attention forward and backward, the KL passes) reads alike:
// sizes, positions and the work list of one query chunk [q_base, q_base + num_entries /
// top_k), as msa_jax/kv_outer/worklist.py builds it: entry_query / entry_slot
// [B, Hkv, num_entries] (query relative to q_base; sorted by tile), item_start / item_count /
// item_tile [B, Hkv, num_items]; last_visible [B, q_len] (int32: the last key each query may
// see, -1 for none).
struct KVOuterParams {
  const int32_t* last_visible;
  const int32_t* entry_query;
  const int32_t* entry_slot;
  const int32_t* item_start;
  const int32_t* item_count;
  const int32_t* item_tile;
  int batch;         // B
  int q_len;         // queries in q (all chunks)
  int q_base;        // first query of this chunk
  int kv_len;        // S
  int num_q_heads;   // Hq
  int num_kv_heads;  // Hkv
  int head_dim;      // D
  int block_size;    // Bk
  int top_k;         // K
  int num_entries;   // chunk * K
  int num_items;
  float softmax_scale;  // s > 0
};

// block_sparse_attention forward, KV-outer slot partials (spec, "Main branch"). Inputs:
//   q [B, q_len, Hq, D], k, v [B, S, Hkv, D] (bf16 or fp16) and the KVOuterParams.
// Outputs, row (query * top_k + slot) * Hq + head of the chunk, written only for live entries:
//   out_partial [B, num_out_rows, D] (normalised, q's dtype), lse_partial [B, num_out_rows] f32.
struct AttentionFwdParams : KVOuterParams {
  const void* q;
  const void* k;
  const void* v;
  void* out_partial;
  float* lse_partial;
  int num_out_rows;  // chunk * K * Hq
};

// block_sparse_attention backward, KV-outer (spec, "Main branch"), over the same work lists as
// the forward. Inputs: q, dout [B, q_len, Hq, D] and k, v [B, S, Hkv, D] (one dtype, bf16 or
// fp16); lse and delta [B, q_len, Hq] f32 (delta = rowsum(dout * out) - dlse; lse finite for
// every row an entry names); the KVOuterParams. Outputs, float32, zeroed by the caller; every
// contribution is an atomic add:
//   dk, dv [B, S, Hkv, D]: each item adds its tile's sums;
//   dq: deterministic = false: [B, q_len * Hq, D], each row receives one add per (tile, key
//       half) it selected; deterministic = true: [B, num_out_rows, D] slot partials, row
//       (query * top_k + slot) * Hq + head receives the two halves of its one tile.
// deterministic = true also requires one work item per (tile, kv head). Then no element gets
// more than two adds onto zero, and a + b = b + a, so repeated calls give identical bits.
struct AttentionBwdParams : KVOuterParams {
  const void* q;
  const void* k;
  const void* v;
  const void* dout;
  const float* lse;
  const float* delta;
  float* dq;
  float* dk;
  float* dv;
  int num_out_rows;  // chunk * K * Hq (deterministic dq rows)
  bool deterministic;
};

// The KL index-alignment loss over the sparse support (spec, "KL index-alignment loss"), KV-outer
// over the forward's work lists. Inputs: q [B, q_len, Hq, D] and k [B, S, Hkv, D] (bf16 or
// fp16), lse [B, q_len, Hq] f32 (the teacher's, finite for every row an entry names),
// index_q [B, q_len, Hkv, Di] and index_k [B, S, Di] (q's dtype), the KVOuterParams. One entry
// is one (query, slot) of kv head g: E = chunk * top_k, row e = query * top_k + slot.
// Three passes (KLPass):
// kValue, written per entry and key half (plain stores, zeroed by the caller), partial
//   [B, E, Hkv, 2, 4] f32: (max u, sum exp(u - max), sum P log P - P u, sum P) over the half's
//   visible keys, P the group-mean teacher, u = si <index_q, index_k>.
// kStudent: the same partial with only the student's terms (max u, sum exp(u - max), 0, 0);
//   reads neither q, k nor lse.
// kGradient: ilse [B, q_len, Hkv] f32 (the student's log-sum-exp over the whole support, finite
//   for every live entry) and du = exp(u - ilse) - P (for dkl = 1):
//   d_index_q: deterministic = false: [B, q_len, Hkv, Di] atomic sums over tiles;
//              deterministic = true: [B, E, Hkv, Di] slot partials (two adds each, the halves);
//   d_index_k: [B, S, Hkv, Di], each item adds its tile's keys (one term per kv head, summed
//              over heads by the caller);
//   value_terms: the value's terms (sum P log P - P u, sum P), rows as d_index_q's, [.., Hkv, 2].
enum class KLPass : int { kValue = 0, kGradient = 1, kStudent = 2 };

struct KLParams : KVOuterParams {
  const void* q;
  const void* k;
  const float* lse;
  const void* index_q;
  const void* index_k;
  const float* ilse;
  float* partial;
  float* d_index_q;
  float* d_index_k;
  float* value_terms;
  int index_head_dim;         // Di
  float index_softmax_scale;  // si > 0
  KLPass pass;
  bool deterministic;
};

// The KL over every visible key in dense mode with plain causal positions (T == S, query t at
// key t, every key present, one document): no work list (cuda/kernels/dense_kl_sm90.cuh).
// Inputs: q [B, T, Hq, D], k [B, T, Hkv, D], index_q [B, T, Hkv, Di], index_k [B, T, Di] (one
// dtype, bf16 or fp16), lse [B, T, Hq] f32 (the teacher's, finite), ilse [B, T, Hkv] f32 (the
// student's over keys 0..t, finite). For dkl = 1, float32:
//   d_index_q [B, T, Hkv, Di]: atomic sums over key tiles, zeroed by the caller;
//   d_index_k [B, T, Hkv, Di]: written whole (each key and kv head by one CTA), per kv head
//     (the caller sums the heads);
//   value [B, Hkv, ceil(T / 128)]: each CTA's share of the sum of KL(P̄ || R) over its keys,
//     written whole (the caller sums them).
struct DenseKLParams {
  const void* q;
  const void* k;
  const void* index_q;
  const void* index_k;
  const float* lse;
  const float* ilse;
  float* d_index_q;
  float* d_index_k;
  float* value;
  int batch;           // B
  int seq_len;         // T == S
  int num_q_heads;     // Hq
  int num_kv_heads;    // Hkv
  int head_dim;        // D
  int index_head_dim;  // Di
  float softmax_scale;        // s > 0
  float index_softmax_scale;  // si > 0
};

}  // namespace msa
