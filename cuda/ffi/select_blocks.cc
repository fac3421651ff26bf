// XLA FFI handler of select_blocks (the fused indexer), SM90: checks every shape, dtype and
// attribute the kernel relies on to stay in bounds, fills IndexerParams, launches, and turns
// a launch error into ffi::Error. Never aborts, never synchronises.
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

ffi::Error SelectBlocks(cudaStream_t stream,
                        ffi::AnyBuffer index_q,                          // [B, T, Hkv, Di] bf16 / fp16
                        ffi::AnyBuffer index_k,                          // [B, S, Di], index_q's dtype
                        ffi::Buffer<ffi::S32> q_offset,                  // [B]
                        ffi::Buffer<ffi::S32> kv_length,                 // [B]
                        ffi::Buffer<ffi::S32> doc,                       // [B, T]
                        ffi::Result<ffi::Buffer<ffi::S32>> block_indices,  // [B, T, Hkv, K]
                        int32_t top_k, int32_t block_size, float index_softmax_scale) {
  constexpr const char* kOp = "msa_select_blocks";
  const auto qd = index_q.dimensions();
  const auto kd = index_k.dimensions();
  const auto od = block_indices->dimensions();
  const ffi::DataType dtype = index_q.element_type();
  if (!is_half_precision(dtype) || index_k.element_type() != dtype) {
    return ffi::Error::InvalidArgument(std::string(kOp) +
                                       ": index_q and index_k must share one dtype, bfloat16 or float16");
  }
  if (qd.size() != 4) {
    return ffi::Error::InvalidArgument(std::string(kOp) + ": index_q must be [B, T, Hkv, Di], got rank " +
                                       std::to_string(qd.size()));
  }
  const int64_t B = qd[0], T = qd[1], Hkv = qd[2], Di = qd[3];
  // A mismatched index_k would let the TMA descriptor describe memory that is not there.
  if (kd.size() != 3 || kd[0] != B || kd[2] != Di) {
    return ffi::Error::InvalidArgument(std::string(kOp) + ": index_k must be [B, S, Di] = [" +
                                       dims_str(B, "S", Di) + "], got " + dims_str(kd));
  }
  const int64_t S = kd[1];
  if (q_offset.element_count() != static_cast<size_t>(B) || kv_length.element_count() != static_cast<size_t>(B)) {
    return ffi::Error::InvalidArgument(std::string(kOp) + ": q_offset and kv_length must have B = " +
                                       std::to_string(B) + " entries");
  }
  if (!has_dims(doc.dimensions(), {B, T})) {
    return ffi::Error::InvalidArgument(std::string(kOp) + ": doc must be [B, T] = [" + std::to_string(B) + ", " +
                                       std::to_string(T) + "], got " + dims_str(doc.dimensions()));
  }
  if (od.size() != 4 || od[0] != B || od[1] != T || od[2] != Hkv || od[3] != top_k) {
    return ffi::Error::InvalidArgument(std::string(kOp) + ": block_indices must be [B, T, Hkv, top_k], got " +
                                       dims_str(od));
  }
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  if (B < 1 || T < 1 || S < 1 || Hkv < 1 || B > 65535 || Hkv > 65535 || T > kMax || S > kMax) {
    return ffi::Error::InvalidArgument(std::string(kOp) + ": unsupported sizes B=" + std::to_string(B) +
                                       " T=" + std::to_string(T) + " S=" + std::to_string(S) +
                                       " Hkv=" + std::to_string(Hkv));
  }
  if (!indexer_sm90_supports(static_cast<int>(Di), block_size, top_k) || !(index_softmax_scale > 0.0f)) {
    return ffi::Error::InvalidArgument(std::string(kOp) + ": unsupported Di=" + std::to_string(Di) +
                                       " block_size=" + std::to_string(block_size) + " top_k=" +
                                       std::to_string(top_k) + " (Di 64 or 128, block 128, top_k 1..32)");
  }
  IndexerParams params;
  params.index_q = index_q.untyped_data();
  params.index_k = index_k.untyped_data();
  params.q_offset = q_offset.typed_data();
  params.kv_length = kv_length.typed_data();
  params.doc = doc.typed_data();
  params.block_indices = block_indices->typed_data();
  params.batch = static_cast<int>(B);
  params.q_len = static_cast<int>(T);
  params.kv_len = static_cast<int>(S);
  params.num_kv_heads = static_cast<int>(Hkv);
  params.index_head_dim = static_cast<int>(Di);
  params.block_size = block_size;
  params.top_k = top_k;
  params.index_softmax_scale = index_softmax_scale;
  return launch_error(kOp, launch_indexer_sm90(params, ElementTypeOf(dtype), stream));
}

}  // namespace
}  // namespace msa

XLA_FFI_DEFINE_HANDLER_SYMBOL(MsaSelectBlocks, msa::SelectBlocks,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()             // index_q
                                  .Arg<ffi::AnyBuffer>()             // index_k
                                  .Arg<ffi::Buffer<ffi::S32>>()      // q_offset
                                  .Arg<ffi::Buffer<ffi::S32>>()      // kv_length
                                  .Arg<ffi::Buffer<ffi::S32>>()      // doc
                                  .Ret<ffi::Buffer<ffi::S32>>()      // block_indices
                                  .Attr<int32_t>("top_k")
                                  .Attr<int32_t>("block_size")
                                  .Attr<float>("index_softmax_scale"));
