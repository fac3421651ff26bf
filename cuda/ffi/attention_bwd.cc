// XLA FFI handler of the KV-outer block-sparse attention backward, SM90: checks every shape,
// dtype and attribute the kernel relies on to stay in bounds, zeroes the float32 outputs it
// adds into (cudaMemsetAsync on the call's stream), fills AttentionBwdParams, launches, and
// turns a launch error into ffi::Error. The work list's contents are bounds-checked by the
// kernel itself. Never aborts, never synchronises.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "attention_call.h"
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
  if (!is_half_precision(dtype) || k.element_type() != dtype ||
      v.element_type() != dtype || dout.element_type() != dtype) {
    return Invalid("q, k, v and dout must share one dtype, bfloat16 or float16");
  }
  AttentionCallSizes n;
  if (ffi::Error err = CheckAttentionCall(kOp, attention_bwd_sm90_supports, q, k, v, last_visible, entry_query,
                                          entry_slot, item_start, item_count, item_tile, q_base, top_k, block_size,
                                          softmax_scale, n);
      err.failure()) {
    return err;
  }
  if (!has_dims(dout.dimensions(), {n.B, n.T, n.Hq, n.D})) {
    return Invalid("dout must have q's shape " + dims_str(q.dimensions()) + ", got " + dims_str(dout.dimensions()));
  }
  if (!has_dims(lse.dimensions(), {n.B, n.T, n.Hq}) || !has_dims(delta.dimensions(), {n.B, n.T, n.Hq})) {
    return Invalid("lse and delta must both be [B, T, Hq], got " + dims_str(lse.dimensions()) + ", " +
                   dims_str(delta.dimensions()));
  }
  // Deterministic dQ goes to slot partials of this chunk; otherwise every row adds into dq.
  const int64_t dq_rows = deterministic ? n.R : n.T * n.Hq;
  if (!has_dims(dq->dimensions(), {n.B, dq_rows, n.D})) {
    return Invalid(std::string("dq must be [B, ") + (deterministic ? "chunk * top_k * Hq" : "T * Hq") +
                   ", D] = [" + dims_str(n.B, std::to_string(dq_rows).c_str(), n.D) + "], got " +
                   dims_str(dq->dimensions()));
  }
  if (!has_dims(dk->dimensions(), {n.B, n.S, n.Hkv, n.D}) || !has_dims(dv->dimensions(), {n.B, n.S, n.Hkv, n.D})) {
    return Invalid("dk and dv must both be [B, S, Hkv, D] = k's shape, got " + dims_str(dk->dimensions()) + ", " +
                   dims_str(dv->dimensions()));
  }
  // The kernel adds into its outputs: start them at zero (rows no entry names stay zero).
  for (auto* out : {&dq, &dk, &dv}) {
    if (ffi::Error err = ZeroOutput(kOp, *out, stream); err.failure()) return err;
  }
  AttentionBwdParams params;
  FillAttentionParams(params, n, q, k, v, last_visible, entry_query, entry_slot, item_start, item_count, item_tile,
                      q_base, top_k, block_size, softmax_scale);
  params.dout = dout.untyped_data();
  params.lse = lse.typed_data();
  params.delta = delta.typed_data();
  params.dq = dq->typed_data();
  params.dk = dk->typed_data();
  params.dv = dv->typed_data();
  params.deterministic = deterministic;
  return launch_error(kOp, launch_attention_bwd_sm90(params, ElementTypeOf(dtype), stream));
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
