// The work-list row mapping that the KV-outer attention kernels (forward and backward) share:
// step c of a work item covers 64 matrix rows, 64 / G query tokens x G heads, and each row
// derives its (query, slot, head) and its query's last visible key from global memory.
// Templated on the kernel's parameter struct, which names the same fields in both.
#pragma once

#include <cstdint>

namespace msa::attention_sm90 {

constexpr int kBlock = 128;  // keys per tile (block_size must be 128)
constexpr int kRows = 64;    // matrix rows per step: one wgmma M

// Matrix row r of step c of a work item: the (query, slot) entry it serves and its kv
// head's query head. Dead rows (past the item's entries, past tokens * G, or naming an entry
// out of range) have query = -1.
struct RowEntry {
  int query;  // relative to q_base, -1: dead row
  int slot;
  int head;
};

template <class Params>
__device__ __forceinline__ RowEntry row_entry(const Params& p, int b, int g, int start, int count, int group,
                                              int c, int r) {
  const int tokens = kRows / group;
  const int token = r / group;
  const int e = c * tokens + token;  // entry within the item
  RowEntry info{-1, 0, g * group + r % group};
  if (token >= tokens || e >= count) return info;
  const int64_t entry = (int64_t(b) * p.num_kv_heads + g) * p.num_entries + start + e;
  const int query = p.entry_query[entry];
  const int slot = p.entry_slot[entry];
  if (query < 0 || query >= p.num_entries / p.top_k || slot < 0 || slot >= p.top_k) return info;
  info.query = query;
  info.slot = slot;
  return info;
}

// Row of a live row in its batch row's q, seen as [T * Hq, D] (the handlers keep T * Hq < 2^31).
template <class Params>
__device__ __forceinline__ int row_src(const Params& p, RowEntry e) {
  return (p.q_base + e.query) * p.num_q_heads + e.head;
}

// The slot-partial row of a live row: ((query * K + slot) * Hq + head); -1 for a dead row.
template <class Params>
__device__ __forceinline__ int row_out(const Params& p, RowEntry e) {
  return e.query < 0 ? -1 : (e.query * p.top_k + e.slot) * p.num_q_heads + e.head;
}

// The last visible key of a row's query (absolute); a dead row sees nothing.
template <class Params>
__device__ __forceinline__ int row_last_visible(const Params& p, int b, RowEntry e) {
  return e.query < 0 ? -1 : p.last_visible[int64_t(b) * p.q_len + p.q_base + e.query];
}

// The checks every kernel makes on its work item before touching memory: unused items (the
// grid is a static upper bound) have count 0, and an item that would read past its entries
// or name a tile outside the keys is skipped, so no content of the work list can send an
// access out of bounds.
__device__ __forceinline__ bool item_in_bounds(int count, int start, int num_entries, int tile, int kv_len) {
  return count > 0 && start >= 0 && count <= num_entries - start && tile >= 0 && tile < kv_len &&
         tile % kBlock == 0;
}

__device__ __forceinline__ void cp_async_16(uint32_t smem_addr, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr), "l"(gmem));
}

}  // namespace msa::attention_sm90
