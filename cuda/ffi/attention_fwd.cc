// XLA FFI handler of the KV-outer block-sparse attention forward (slot partials), SM90:
// checks every shape, dtype and attribute the kernel relies on to stay in bounds, fills
// AttentionFwdParams, launches, and turns a launch error into ffi::Error. The work list's
// contents are bounds-checked by the kernel itself (it skips what would read out of range).
// Never aborts, never synchronises.
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

constexpr const char* kOp = "msa_sparse_attention_partials";

ffi::Error Invalid(const std::string& what) { return ffi::Error::InvalidArgument(std::string(kOp) + ": " + what); }

ffi::Error SparseAttentionPartials(cudaStream_t stream,
                                   ffi::AnyBuffer q,                       // [B, T, Hq, D]
                                   ffi::AnyBuffer k,                       // [B, S, Hkv, D]
                                   ffi::AnyBuffer v,                       // [B, S, Hkv, D]
                                   ffi::Buffer<ffi::S32> last_visible,     // [B, T]
                                   ffi::Buffer<ffi::S32> entry_query,      // [B, Hkv, E]
                                   ffi::Buffer<ffi::S32> entry_slot,       // [B, Hkv, E]
                                   ffi::Buffer<ffi::S32> item_start,       // [B, Hkv, I]
                                   ffi::Buffer<ffi::S32> item_count,       // [B, Hkv, I]
                                   ffi::Buffer<ffi::S32> item_tile,        // [B, Hkv, I]
                                   ffi::Result<ffi::AnyBuffer> out_partial,          // [B, R, D]
                                   ffi::Result<ffi::Buffer<ffi::F32>> lse_partial,   // [B, R]
                                   int32_t q_base, int32_t top_k, int32_t block_size, float softmax_scale) {
  const ffi::DataType dtype = q.element_type();
  if (!is_half_precision(dtype) || k.element_type() != dtype ||
      v.element_type() != dtype || out_partial->element_type() != dtype) {
    return Invalid("q, k, v and out_partial must share one dtype, bfloat16 or float16");
  }
  AttentionCallSizes n;
  if (ffi::Error err = CheckAttentionCall(kOp, attention_fwd_sm90_supports, q, k, v, last_visible, entry_query,
                                          entry_slot, item_start, item_count, item_tile, q_base, top_k, block_size,
                                          softmax_scale, n);
      err.failure()) {
    return err;
  }
  if (!has_dims(out_partial->dimensions(), {n.B, n.R, n.D}) || !has_dims(lse_partial->dimensions(), {n.B, n.R})) {
    return Invalid("out_partial must be [B, R, D] and lse_partial [B, R] with R = chunk * top_k * Hq = " +
                   std::to_string(n.R) + ", got " + dims_str(out_partial->dimensions()) + ", " +
                   dims_str(lse_partial->dimensions()));
  }
  AttentionFwdParams params;
  FillAttentionParams(params, n, q, k, v, last_visible, entry_query, entry_slot, item_start, item_count, item_tile,
                      q_base, top_k, block_size, softmax_scale);
  params.out_partial = out_partial->untyped_data();
  params.lse_partial = lse_partial->typed_data();
  return launch_error(kOp, launch_attention_fwd_sm90(params, ElementTypeOf(dtype), stream));
}

}  // namespace
}  // namespace msa

XLA_FFI_DEFINE_HANDLER_SYMBOL(MsaSparseAttentionPartials, msa::SparseAttentionPartials,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()           // q
                                  .Arg<ffi::AnyBuffer>()           // k
                                  .Arg<ffi::AnyBuffer>()           // v
                                  .Arg<ffi::Buffer<ffi::S32>>()    // last_visible
                                  .Arg<ffi::Buffer<ffi::S32>>()    // entry_query
                                  .Arg<ffi::Buffer<ffi::S32>>()    // entry_slot
                                  .Arg<ffi::Buffer<ffi::S32>>()    // item_start
                                  .Arg<ffi::Buffer<ffi::S32>>()    // item_count
                                  .Arg<ffi::Buffer<ffi::S32>>()    // item_tile
                                  .Ret<ffi::AnyBuffer>()           // out_partial
                                  .Ret<ffi::Buffer<ffi::F32>>()    // lse_partial
                                  .Attr<int32_t>("q_base")
                                  .Attr<int32_t>("top_k")
                                  .Attr<int32_t>("block_size")
                                  .Attr<float>("softmax_scale"));
