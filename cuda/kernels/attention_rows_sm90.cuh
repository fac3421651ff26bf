// What the KV-outer attention kernels (forward and backward) share: a CTA's work item, the
// k / v view their TMA descriptors use, and the row mapping: step c of a work item covers 64
// matrix rows, 64 / G query tokens x G heads, and each row derives its (query, slot, head)
// and its query's last visible key from global memory. Templated on the kernel's parameter
// struct, which names the same fields in both.
#pragma once

#include <cstdint>

#include <cute/tensor.hpp>

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

// The work item of this CTA (grid: item, kv head, batch row) and what follows from it.
struct WorkItem {
  int g, b;          // kv head, batch row
  int start, count;  // its entries in the (b, g) work list
  int tile;          // first key of its tile
  int group;         // G
  int tokens;        // query tokens per 64-row step: 64 / G
  int n_steps;
};

// Reads this CTA's work item. False for an item to skip: unused items (the grid is a static
// upper bound) have count 0, and an item that would read past its entries or name a tile
// outside the keys is skipped too, so no content of the work list can send an access out of
// bounds.
template <class Params>
__device__ __forceinline__ bool load_work_item(const Params& p, WorkItem& w) {
  const int item = blockIdx.x;
  w.g = blockIdx.y;
  w.b = blockIdx.z;
  const int64_t at = (int64_t(w.b) * p.num_kv_heads + w.g) * p.num_items + item;
  w.count = p.item_count[at];
  w.start = p.item_start[at];
  w.tile = p.item_tile[at];
  // A tile may start at any key (packed documents lay their block grids from each document's
  // first key); its TMA box zero-fills past S and the kernels mask or skip keys >= S.
  if (w.count <= 0 || w.start < 0 || w.count > p.num_entries - w.start || w.tile < 0 || w.tile >= p.kv_len) {
    return false;
  }
  w.group = p.num_q_heads / p.num_kv_heads;
  w.tokens = kRows / w.group;
  w.n_steps = (w.count + w.tokens - 1) / w.tokens;
  return true;
}

// k, v [B, S, Hkv, D] seen as (S, D, Hkv, B), the view their TMA descriptors are built on.
template <int kD, class Params>
CUTE_HOST_DEVICE auto kv_shape(const Params& p) {
  return cute::make_shape(p.kv_len, cute::Int<kD>{}, p.num_kv_heads, p.batch);
}

template <int kD, class Element, class Params>
auto kv_tensor(const void* ptr, const Params& p) {
  return cute::make_tensor(cute::make_gmem_ptr(static_cast<const Element*>(ptr)), kv_shape<kD>(p),
                           cute::make_stride(int64_t(p.num_kv_heads) * kD, cute::_1{}, int64_t(kD),
                                             int64_t(p.kv_len) * p.num_kv_heads * kD));
}

// Adds a pair of float32 values to out[0..1] (8-byte aligned) with one vector atomic (sm_90).
// Where an element receives at most two adds onto zero, the sum does not depend on their order.
__device__ __forceinline__ void add_pair(float* out, float a, float b) {
  atomicAdd(reinterpret_cast<float2*>(out), make_float2(a, b));
}

__device__ __forceinline__ void cp_async_16(uint32_t smem_addr, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr), "l"(gmem));
}

}  // namespace msa::attention_sm90
