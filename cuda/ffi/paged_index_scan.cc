// XLA FFI handler of paged_select_blocks' scan (the paged index scan), SM90: checks every shape,
// dtype and attribute the kernel relies on to stay in bounds, fills PagedIndexerParams,
// launches, and turns a launch error into ffi::Error. Never aborts, never synchronises.
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

constexpr const char* kOp = "msa_paged_index_scan";

ffi::Error invalid(const std::string& what) { return ffi::Error::InvalidArgument(std::string(kOp) + ": " + what); }

// The key pages and their scales: [P, page, Di] in index_q's dtype with no scales (an empty
// buffer), or FP8 E4M3 with float32 scales [P, page]. A scale buffer of another shape would let
// the kernel read past it.
ffi::Error check_pages(ffi::DataType dtype, const ffi::AnyBuffer& keys, const ffi::Buffer<ffi::F32>& scale,
                       int64_t Di) {
  const auto kd = keys.dimensions();
  if (kd.size() != 3 || kd[2] != Di || kd[0] < 1) {
    return invalid("index_k_pages must be [P >= 1, page, Di = " + std::to_string(Di) + "], got " + dims_str(kd));
  }
  const ffi::DataType kdtype = keys.element_type();
  if (kdtype == ffi::DataType::F8E4M3FN) {
    if (!has_dims(scale.dimensions(), {kd[0], kd[1]})) {
      return invalid("index_k_scale must be [P, page] = [" + std::to_string(kd[0]) + ", " + std::to_string(kd[1]) +
                     "] for float8_e4m3fn pages, got " + dims_str(scale.dimensions()));
    }
  } else if (kdtype != dtype) {
    return invalid("index_k_pages must be float8_e4m3fn or index_q's dtype");
  } else if (scale.element_count() != 0) {
    return invalid("index_k_scale must be empty for pages in index_q's dtype, got " + dims_str(scale.dimensions()));
  }
  return ffi::Error::Success();
}

ffi::Error PagedIndexScan(cudaStream_t stream,
                          ffi::AnyBuffer index_q,                    // [B, T, Hkv, Di] bf16 / fp16
                          ffi::AnyBuffer index_k_pages,              // [P, page, Di]: index_q's dtype or FP8 E4M3
                          ffi::Buffer<ffi::F32> index_k_scale,       // [P, page] for FP8 pages, else empty
                          ffi::Buffer<ffi::S32> page_table,          // [B, max_pages]
                          ffi::Buffer<ffi::S32> local_page,          // [B, T], -1 for padding queries
                          ffi::Result<ffi::Buffer<ffi::F32>> scores,  // [B, T * Hkv, splits, top_k - 1]
                          ffi::Result<ffi::Buffer<ffi::S32>> ids,     // [B, T * Hkv, splits, top_k - 1]
                          int32_t top_k, int32_t splits, int32_t pages_per_split, float index_softmax_scale) {
  const auto qd = index_q.dimensions();
  const ffi::DataType dtype = index_q.element_type();
  if (!is_half_precision(dtype)) return invalid("index_q must be bfloat16 or float16");
  if (qd.size() != 4) return invalid("index_q must be [B, T, Hkv, Di], got rank " + std::to_string(qd.size()));
  const int64_t B = qd[0], T = qd[1], Hkv = qd[2], Di = qd[3];
  if (ffi::Error err = check_pages(dtype, index_k_pages, index_k_scale, Di); err.failure()) return err;
  const int64_t P = index_k_pages.dimensions()[0], page = index_k_pages.dimensions()[1];
  const auto td = page_table.dimensions();
  if (td.size() != 2 || td[0] != B || td[1] < 1) {
    return invalid("page_table must be [B = " + std::to_string(B) + ", max_pages >= 1], got " + dims_str(td));
  }
  const int64_t max_pages = td[1];
  if (!has_dims(local_page.dimensions(), {B, T})) {
    return invalid("local_page must be [B, T] = [" + std::to_string(B) + ", " + std::to_string(T) + "], got " +
                   dims_str(local_page.dimensions()));
  }
  if (!paged_indexer_sm90_supports(static_cast<int>(Di), static_cast<int>(page), top_k) ||
      !(index_softmax_scale > 0.0f)) {
    return invalid("unsupported Di=" + std::to_string(Di) + " page=" + std::to_string(page) +
                   " top_k=" + std::to_string(top_k) +
                   " (Di 64 or 128, page 128, top_k 2..32, index_softmax_scale > 0)");
  }
  // Every page of the table must belong to some split (else it would never be scanned), and the
  // splits' page range must stay well inside int32.
  if (splits < 1 || pages_per_split < 1 || int64_t(splits) * pages_per_split < max_pages ||
      int64_t(splits) * pages_per_split > (int64_t(1) << 30)) {
    return invalid("splits=" + std::to_string(splits) + " x pages_per_split=" + std::to_string(pages_per_split) +
                   " must cover max_pages=" + std::to_string(max_pages) + " (and stay below 2^30)");
  }
  const int64_t rows = T * Hkv;
  const int64_t keep = top_k - 1;
  for (const auto out : {scores->dimensions(), ids->dimensions()}) {
    if (!has_dims(out, {B, rows, splits, keep})) {
      return invalid("scores and ids must be [B, T * Hkv, splits, top_k - 1] = [" + std::to_string(B) + ", " +
                     std::to_string(rows) + ", " + std::to_string(splits) + ", " + std::to_string(keep) + "], got " +
                     dims_str(out));
    }
  }
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  if (B < 1 || T < 1 || Hkv < 1 || B > 65535 || rows > (int64_t(1) << 30) || P > kMax || max_pages > kMax) {
    return invalid("unsupported sizes B=" + std::to_string(B) + " T=" + std::to_string(T) + " Hkv=" +
                   std::to_string(Hkv) + " P=" + std::to_string(P) + " max_pages=" + std::to_string(max_pages));
  }
  PagedIndexerParams params;
  params.index_q = index_q.untyped_data();
  params.index_k = index_k_pages.untyped_data();
  params.index_k_scale = index_k_pages.element_type() == ffi::DataType::F8E4M3FN ? index_k_scale.typed_data() : nullptr;
  params.page_table = page_table.typed_data();
  params.local_page = local_page.typed_data();
  params.scores = scores->typed_data();
  params.ids = ids->typed_data();
  params.batch = static_cast<int>(B);
  params.q_len = static_cast<int>(T);
  params.num_kv_heads = static_cast<int>(Hkv);
  params.index_head_dim = static_cast<int>(Di);
  params.num_pages = static_cast<int>(P);
  params.page_size = static_cast<int>(page);
  params.max_pages = static_cast<int>(max_pages);
  params.top_k = top_k;
  params.splits = splits;
  params.pages_per_split = pages_per_split;
  params.index_softmax_scale = index_softmax_scale;
  return launch_error(kOp, launch_paged_indexer_sm90(params, ElementTypeOf(dtype), stream));
}

}  // namespace
}  // namespace msa

XLA_FFI_DEFINE_HANDLER_SYMBOL(MsaPagedIndexScan, msa::PagedIndexScan,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()             // index_q
                                  .Arg<ffi::AnyBuffer>()             // index_k_pages
                                  .Arg<ffi::Buffer<ffi::F32>>()      // index_k_scale (empty unless FP8)
                                  .Arg<ffi::Buffer<ffi::S32>>()      // page_table
                                  .Arg<ffi::Buffer<ffi::S32>>()      // local_page
                                  .Ret<ffi::Buffer<ffi::F32>>()      // scores
                                  .Ret<ffi::Buffer<ffi::S32>>()      // ids
                                  .Attr<int32_t>("top_k")
                                  .Attr<int32_t>("splits")
                                  .Attr<int32_t>("pages_per_split")
                                  .Attr<float>("index_softmax_scale"));
