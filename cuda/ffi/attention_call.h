// What the KV-outer handlers (attention forward partials and backward, the KL passes) share:
// the checks of q, k, v, last_visible and the query chunk's work list that keep their kernels
// in bounds, and the filling of the parameter fields their kernel families name alike.
#pragma once

#include <cstdint>
#include <limits>
#include <string>

#include "handlers.h"
#include "msa/launch.h"
#include "msa/params.h"
#include "xla/ffi/api/ffi.h"

namespace msa {

// Sizes of one call, in the spec's letters; E = chunk * top_k entries, I work items,
// R = chunk * top_k * Hq slot rows.
struct AttentionCallSizes {
  int64_t B, T, Hq, D, S, Hkv, E, I, chunk, R;
};

// Checks the buffers the KV-outer kernels share and the attributes they read; `supports`
// is the kernel family's (D, block_size, G) test. On success fills `sizes`.
inline xla::ffi::Error CheckAttentionCall(
    const char* op, bool (*supports)(int, int, int), const xla::ffi::AnyBuffer& q, const xla::ffi::AnyBuffer& k,
    const xla::ffi::AnyBuffer& v, const xla::ffi::Buffer<xla::ffi::S32>& last_visible,
    const xla::ffi::Buffer<xla::ffi::S32>& entry_query, const xla::ffi::Buffer<xla::ffi::S32>& entry_slot,
    const xla::ffi::Buffer<xla::ffi::S32>& item_start, const xla::ffi::Buffer<xla::ffi::S32>& item_count,
    const xla::ffi::Buffer<xla::ffi::S32>& item_tile, int32_t q_base, int32_t top_k, int32_t block_size,
    float softmax_scale, AttentionCallSizes& sizes) {
  auto invalid = [op](const std::string& what) {
    return xla::ffi::Error::InvalidArgument(std::string(op) + ": " + what);
  };
  const auto qd = q.dimensions();
  if (qd.size() != 4) return invalid("q must be [B, T, Hq, D], got " + dims_str(qd));
  const int64_t B = qd[0], T = qd[1], Hq = qd[2], D = qd[3];
  const auto kd = k.dimensions();
  if (kd.size() != 4 || kd[0] != B || kd[3] != D || !has_dims(v.dimensions(), {kd[0], kd[1], kd[2], kd[3]})) {
    return invalid("k and v must both be [B, S, Hkv, D] with q's B and D, got k " + dims_str(kd) + ", v " +
                   dims_str(v.dimensions()));
  }
  const int64_t S = kd[1], Hkv = kd[2];
  if (Hkv < 1 || Hq % Hkv != 0) {
    return invalid("Hq=" + std::to_string(Hq) + " is not a multiple of Hkv=" + std::to_string(Hkv));
  }
  if (!has_dims(last_visible.dimensions(), {B, T})) {
    return invalid("last_visible must be [B, T], got " + dims_str(last_visible.dimensions()));
  }
  const auto ed = entry_query.dimensions();
  if (ed.size() != 3 || ed[0] != B || ed[1] != Hkv || !has_dims(entry_slot.dimensions(), {ed[0], ed[1], ed[2]})) {
    return invalid("entry_query and entry_slot must both be [B, Hkv, E], got " + dims_str(ed) + ", " +
                   dims_str(entry_slot.dimensions()));
  }
  const int64_t E = ed[2];
  const auto id = item_start.dimensions();
  if (id.size() != 3 || id[0] != B || id[1] != Hkv || !has_dims(item_count.dimensions(), {id[0], id[1], id[2]}) ||
      !has_dims(item_tile.dimensions(), {id[0], id[1], id[2]})) {
    return invalid("item_start, item_count and item_tile must all be [B, Hkv, I]");
  }
  const int64_t I = id[2];
  if (top_k < 1 || E % top_k != 0) {
    return invalid("E=" + std::to_string(E) + " entries is not a multiple of top_k=" + std::to_string(top_k));
  }
  const int64_t chunk = E / top_k;
  if (q_base < 0 || q_base + chunk > T) {
    return invalid("the chunk [" + std::to_string(q_base) + ", " + std::to_string(q_base + chunk) +
                   ") does not lie within T=" + std::to_string(T) + " queries");
  }
  const int64_t R = chunk * top_k * Hq;
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  if (B < 1 || T < 1 || S < 1 || I < 1 || chunk < 1 || B > 65535 || Hkv > 65535 || T > kMax || S > kMax ||
      I > kMax || R > kMax || E > kMax || T * Hq > kMax) {
    return invalid("unsupported sizes B=" + std::to_string(B) + " T=" + std::to_string(T) + " S=" +
                   std::to_string(S) + " items=" + std::to_string(I) + " partial rows=" + std::to_string(R) +
                   " (each of B, Hkv at most 65535; T, S, items, partial rows and T * Hq below 2^31)");
  }
  const int64_t G = Hq / Hkv;
  if (!supports(static_cast<int>(D), block_size, static_cast<int>(G)) || !(softmax_scale > 0.0f)) {
    return invalid("unsupported D=" + std::to_string(D) + " block_size=" + std::to_string(block_size) + " G=" +
                   std::to_string(G) + " softmax_scale=" + std::to_string(softmax_scale) +
                   " (D 64 or 128, block 128, G 1..64, scale > 0)");
  }
  sizes = AttentionCallSizes{B, T, Hq, D, S, Hkv, E, I, chunk, R};
  return xla::ffi::Error::Success();
}

// Zeroes a float32 output the kernel adds into (or writes only in part), on the call's stream.
inline xla::ffi::Error ZeroOutput(const char* op, xla::ffi::Result<xla::ffi::Buffer<xla::ffi::F32>>& out,
                                  cudaStream_t stream) {
  return launch_error(op, cudaMemsetAsync(out->untyped_data(), 0, out->size_bytes(), stream));
}

// The KVOuterParams part of a kernel's parameter struct (msa/params.h).
inline void FillWorkParams(KVOuterParams& p, const AttentionCallSizes& s, const xla::ffi::Buffer<xla::ffi::S32>& last_visible,
                    const xla::ffi::Buffer<xla::ffi::S32>& entry_query,
                    const xla::ffi::Buffer<xla::ffi::S32>& entry_slot,
                    const xla::ffi::Buffer<xla::ffi::S32>& item_start,
                    const xla::ffi::Buffer<xla::ffi::S32>& item_count,
                    const xla::ffi::Buffer<xla::ffi::S32>& item_tile, int32_t q_base, int32_t top_k,
                    int32_t block_size, float softmax_scale) {
  p.last_visible = last_visible.typed_data();
  p.entry_query = entry_query.typed_data();
  p.entry_slot = entry_slot.typed_data();
  p.item_start = item_start.typed_data();
  p.item_count = item_count.typed_data();
  p.item_tile = item_tile.typed_data();
  p.batch = static_cast<int>(s.B);
  p.q_len = static_cast<int>(s.T);
  p.q_base = q_base;
  p.kv_len = static_cast<int>(s.S);
  p.num_q_heads = static_cast<int>(s.Hq);
  p.num_kv_heads = static_cast<int>(s.Hkv);
  p.head_dim = static_cast<int>(s.D);
  p.block_size = block_size;
  p.top_k = top_k;
  p.num_entries = static_cast<int>(s.E);
  p.num_items = static_cast<int>(s.I);
  p.softmax_scale = softmax_scale;
}

// The fields AttentionFwdParams and AttentionBwdParams name alike (msa/params.h).
template <class Params>
void FillAttentionParams(Params& p, const AttentionCallSizes& s, const xla::ffi::AnyBuffer& q,
                         const xla::ffi::AnyBuffer& k, const xla::ffi::AnyBuffer& v,
                         const xla::ffi::Buffer<xla::ffi::S32>& last_visible,
                         const xla::ffi::Buffer<xla::ffi::S32>& entry_query,
                         const xla::ffi::Buffer<xla::ffi::S32>& entry_slot,
                         const xla::ffi::Buffer<xla::ffi::S32>& item_start,
                         const xla::ffi::Buffer<xla::ffi::S32>& item_count,
                         const xla::ffi::Buffer<xla::ffi::S32>& item_tile, int32_t q_base, int32_t top_k,
                         int32_t block_size, float softmax_scale) {
  p.q = q.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  FillWorkParams(p, s, last_visible, entry_query, entry_slot, item_start, item_count, item_tile, q_base, top_k,
                 block_size, softmax_scale);
  p.num_out_rows = static_cast<int>(s.R);
}

}  // namespace msa
