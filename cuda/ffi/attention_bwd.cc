// XLA FFI handler of the KV-outer block-sparse attention backward, SM90: checks every shape,
// dtype and attribute the kernel relies on to stay in bounds, zeroes the float32 outputs it
// adds into (cudaMemsetAsync on the call's stream), fills AttentionBwdParams, launches, and
// turns a launch error into ffi::Error. The work list's contents are bounds-checked by the
// kernel itself. Never aborts, never synchronises.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <limits>
#include <string>

#include "handlers.h"
#include "msa/launch.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace msa {
namespace {

constexpr const char* kOp = "msa_sparse_attention_bwd";

ffi::Error Invalid(const std::string& what) { return ffi::Error::InvalidArgument(std::string(kOp) + ": " + what); }

ffi::Error SparseAttentionBwd(cudaStream_t stream,
                              ffi::AnyBuffer q,                     // [B, T, Hq, D]
                              ffi::AnyBuffer k,                     // [B, S, Hkv, D]
                              ffi::AnyBuffer v,                     // [B, S, Hkv, D]
                              ffi::AnyBuffer dout,                  // [B, T, Hq, D]
                              ffi::Buffer<ffi::F32> lse,            // [B, T, Hq]
                              ffi::Buffer<ffi::F32> delta,          // [B, T, Hq]
                              ffi::Buffer<ffi::S32> last_visible,   // [B, T]
                              ffi::Buffer<ffi::S32> entry_query,    // [B, Hkv, E]
                              ffi::Buffer<ffi::S32> entry_slot,     // [B, Hkv, E]
                              ffi::Buffer<ffi::S32> item_start,     // [B, Hkv, I]
                              ffi::Buffer<ffi::S32> item_count,     // [B, Hkv, I]
                              ffi::Buffer<ffi::S32> item_tile,      // [B, Hkv, I]
                              ffi::Result<ffi::Buffer<ffi::F32>> dq,  // [B, T * Hq, D] or [B, R, D]
                              ffi::Result<ffi::Buffer<ffi::F32>> dk,  // [B, S, Hkv, D]
                              ffi::Result<ffi::Buffer<ffi::F32>> dv,  // [B, S, Hkv, D]
                              int32_t q_base, int32_t top_k, int32_t block_size, float softmax_scale,
                              bool deterministic) {
  const ffi::DataType dtype = q.element_type();
  if ((dtype != ffi::DataType::BF16 && dtype != ffi::DataType::F16) || k.element_type() != dtype ||
      v.element_type() != dtype || dout.element_type() != dtype) {
    return Invalid("q, k, v and dout must share one dtype, bfloat16 or float16");
  }
  const auto qd = q.dimensions();
  if (qd.size() != 4) return Invalid("q must be [B, T, Hq, D], got " + dims_str(qd));
  const int64_t B = qd[0], T = qd[1], Hq = qd[2], D = qd[3];
  if (!has_dims(dout.dimensions(), {B, T, Hq, D})) {
    return Invalid("dout must have q's shape " + dims_str(qd) + ", got " + dims_str(dout.dimensions()));
  }
  const auto kd = k.dimensions();
  if (kd.size() != 4 || kd[0] != B || kd[3] != D || !has_dims(v.dimensions(), {kd[0], kd[1], kd[2], kd[3]})) {
    return Invalid("k and v must both be [B, S, Hkv, D] with q's B and D, got k " + dims_str(kd) + ", v " +
                   dims_str(v.dimensions()));
  }
  const int64_t S = kd[1], Hkv = kd[2];
  if (Hkv < 1 || Hq % Hkv != 0) {
    return Invalid("Hq=" + std::to_string(Hq) + " is not a multiple of Hkv=" + std::to_string(Hkv));
  }
  if (!has_dims(lse.dimensions(), {B, T, Hq}) || !has_dims(delta.dimensions(), {B, T, Hq})) {
    return Invalid("lse and delta must both be [B, T, Hq], got " + dims_str(lse.dimensions()) + ", " +
                   dims_str(delta.dimensions()));
  }
  if (!has_dims(last_visible.dimensions(), {B, T})) {
    return Invalid("last_visible must be [B, T], got " + dims_str(last_visible.dimensions()));
  }
  const auto ed = entry_query.dimensions();
  if (ed.size() != 3 || ed[0] != B || ed[1] != Hkv || !has_dims(entry_slot.dimensions(), {ed[0], ed[1], ed[2]})) {
    return Invalid("entry_query and entry_slot must both be [B, Hkv, E], got " + dims_str(ed) + ", " +
                   dims_str(entry_slot.dimensions()));
  }
  const int64_t E = ed[2];
  const auto id = item_start.dimensions();
  if (id.size() != 3 || id[0] != B || id[1] != Hkv || !has_dims(item_count.dimensions(), {id[0], id[1], id[2]}) ||
      !has_dims(item_tile.dimensions(), {id[0], id[1], id[2]})) {
    return Invalid("item_start, item_count and item_tile must all be [B, Hkv, I]");
  }
  const int64_t I = id[2];
  if (top_k < 1 || E % top_k != 0) {
    return Invalid("E=" + std::to_string(E) + " entries is not a multiple of top_k=" + std::to_string(top_k));
  }
  const int64_t chunk = E / top_k;
  if (q_base < 0 || q_base + chunk > T) {
    return Invalid("the chunk [" + std::to_string(q_base) + ", " + std::to_string(q_base + chunk) +
                   ") does not lie within T=" + std::to_string(T) + " queries");
  }
  // Deterministic dQ goes to slot partials of this chunk; otherwise every row adds into dq.
  const int64_t R = chunk * top_k * Hq;
  const int64_t dq_rows = deterministic ? R : T * Hq;
  if (!has_dims(dq->dimensions(), {B, dq_rows, D})) {
    return Invalid(std::string("dq must be [B, ") + (deterministic ? "chunk * top_k * Hq" : "T * Hq") +
                   ", D] = [" + dims_str(B, std::to_string(dq_rows).c_str(), D) + "], got " +
                   dims_str(dq->dimensions()));
  }
  if (!has_dims(dk->dimensions(), {B, S, Hkv, D}) || !has_dims(dv->dimensions(), {B, S, Hkv, D})) {
    return Invalid("dk and dv must both be [B, S, Hkv, D] = k's shape, got " + dims_str(dk->dimensions()) + ", " +
                   dims_str(dv->dimensions()));
  }
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  if (B < 1 || T < 1 || S < 1 || I < 1 || chunk < 1 || B > 65535 || Hkv > 65535 || T > kMax || S > kMax ||
      I > kMax || R > kMax || E > kMax || T * Hq > kMax) {
    return Invalid("unsupported sizes B=" + std::to_string(B) + " T=" + std::to_string(T) + " S=" +
                   std::to_string(S) + " items=" + std::to_string(I) + " partial rows=" + std::to_string(R) +
                   " (each of B, Hkv at most 65535; T, S, items, partial rows and T * Hq below 2^31)");
  }
  const int64_t G = Hq / Hkv;
  if (!attention_bwd_sm90_supports(static_cast<int>(D), block_size, static_cast<int>(G)) || !(softmax_scale > 0.0f)) {
    return Invalid("unsupported D=" + std::to_string(D) + " block_size=" + std::to_string(block_size) + " G=" +
                   std::to_string(G) + " softmax_scale=" + std::to_string(softmax_scale) +
                   " (D 64 or 128, block 128, G 1..64, scale > 0)");
  }
  // The kernel adds into its outputs: start them at zero (rows no entry names stay zero).
  for (auto* out : {&dq, &dk, &dv}) {
    cudaError_t err = cudaMemsetAsync((*out)->untyped_data(), 0, (*out)->size_bytes(), stream);
    if (err != cudaSuccess) return launch_error(kOp, err);
  }
  AttentionBwdParams params;
  params.q = q.untyped_data();
  params.k = k.untyped_data();
  params.v = v.untyped_data();
  params.dout = dout.untyped_data();
  params.lse = lse.typed_data();
  params.delta = delta.typed_data();
  params.last_visible = last_visible.typed_data();
  params.entry_query = entry_query.typed_data();
  params.entry_slot = entry_slot.typed_data();
  params.item_start = item_start.typed_data();
  params.item_count = item_count.typed_data();
  params.item_tile = item_tile.typed_data();
  params.dq = dq->typed_data();
  params.dk = dk->typed_data();
  params.dv = dv->typed_data();
  params.batch = static_cast<int>(B);
  params.q_len = static_cast<int>(T);
  params.q_base = q_base;
  params.kv_len = static_cast<int>(S);
  params.num_q_heads = static_cast<int>(Hq);
  params.num_kv_heads = static_cast<int>(Hkv);
  params.head_dim = static_cast<int>(D);
  params.block_size = block_size;
  params.top_k = top_k;
  params.num_entries = static_cast<int>(E);
  params.num_items = static_cast<int>(I);
  params.num_out_rows = static_cast<int>(R);
  params.softmax_scale = softmax_scale;
  params.deterministic = deterministic;
  const ElementType element = dtype == ffi::DataType::BF16 ? ElementType::kBFloat16 : ElementType::kFloat16;
  return launch_error(kOp, launch_attention_bwd_sm90(params, element, stream));
}

}  // namespace
}  // namespace msa

XLA_FFI_DEFINE_HANDLER_SYMBOL(MsaSparseAttentionBwd, msa::SparseAttentionBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()           // q
                                  .Arg<ffi::AnyBuffer>()           // k
                                  .Arg<ffi::AnyBuffer>()           // v
                                  .Arg<ffi::AnyBuffer>()           // dout
                                  .Arg<ffi::Buffer<ffi::F32>>()    // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()    // delta
                                  .Arg<ffi::Buffer<ffi::S32>>()    // last_visible
                                  .Arg<ffi::Buffer<ffi::S32>>()    // entry_query
                                  .Arg<ffi::Buffer<ffi::S32>>()    // entry_slot
                                  .Arg<ffi::Buffer<ffi::S32>>()    // item_start
                                  .Arg<ffi::Buffer<ffi::S32>>()    // item_count
                                  .Arg<ffi::Buffer<ffi::S32>>()    // item_tile
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dv
                                  .Attr<int32_t>("q_base")
                                  .Attr<int32_t>("top_k")
                                  .Attr<int32_t>("block_size")
                                  .Attr<float>("softmax_scale")
                                  .Attr<bool>("deterministic"));
