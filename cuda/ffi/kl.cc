// XLA FFI handlers of the KL passes over the sparse support, SM90 (cuda/kernels/kl_sm90.cuh):
// "msa_kl_partials" (the value pass, or with `student` the student-only pass for ilse) and
// "msa_kl_bwd" (the gradient pass with the value's terms, given the student's ilse); and of the
// dense-mode KL over the causal triangle (cuda/kernels/dense_kl_sm90.cuh): "msa_dense_kl". Each
// checks every shape, dtype and attribute the kernel relies on to stay in bounds, zeroes the
// float32 outputs (cudaMemsetAsync on the call's stream), fills KLParams, launches, and turns a
// launch error into ffi::Error. The work list's contents are bounds-checked by the
// kernel itself. Never aborts, never synchronises.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <limits>
#include <string>

#include "attention_call.h"
#include "handlers.h"
#include "msa/launch.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace msa {
namespace {

constexpr const char* kValueOp = "msa_kl_partials";
constexpr const char* kGradOp = "msa_kl_bwd";
constexpr const char* kDenseOp = "msa_dense_kl";

// The (D, block, G) part of kl_sm90_supports; Di is checked with the index tensors.
bool SupportsMain(int head_dim, int block_size, int group) {
  return kl_sm90_supports(head_dim, 64, block_size, group);
}

// Checks and fills what both passes read: q, k, lse, index_q, index_k, last_visible, the
// work list and the attributes. `n` receives the call's sizes and `di` the index head dim.
ffi::Error CheckInputs(const char* op, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::Buffer<ffi::F32> lse,
                       ffi::AnyBuffer index_q, ffi::AnyBuffer index_k, ffi::Buffer<ffi::S32> last_visible,
                       ffi::Buffer<ffi::S32> entry_query, ffi::Buffer<ffi::S32> entry_slot,
                       ffi::Buffer<ffi::S32> item_start, ffi::Buffer<ffi::S32> item_count,
                       ffi::Buffer<ffi::S32> item_tile, int32_t q_base, int32_t top_k, int32_t block_size,
                       float softmax_scale, float index_softmax_scale, AttentionCallSizes& n, KLParams& params,
                       ElementType& element) {
  auto invalid = [op](const std::string& what) { return ffi::Error::InvalidArgument(std::string(op) + ": " + what); };
  const ffi::DataType dtype = q.element_type();
  if (!is_half_precision(dtype) || k.element_type() != dtype) {
    return invalid("q and k must share one dtype, bfloat16 or float16");
  }
  if (index_q.element_type() != dtype || index_k.element_type() != dtype) {
    return invalid("index_q and index_k must have q's dtype");
  }
  // k stands in for v: the KL reads no values, and the shared check wants k and v alike.
  if (ffi::Error err = CheckAttentionCall(op, SupportsMain, q, k, k, last_visible, entry_query, entry_slot, item_start,
                                          item_count, item_tile, q_base, top_k, block_size, softmax_scale, n);
      err.failure()) {
    return err;
  }
  if (!has_dims(lse.dimensions(), {n.B, n.T, n.Hq})) {
    return invalid("lse must be [B, T, Hq], got " + dims_str(lse.dimensions()));
  }
  const auto iqd = index_q.dimensions();
  if (iqd.size() != 4 || iqd[0] != n.B || iqd[1] != n.T || iqd[2] != n.Hkv ||
      !has_dims(index_k.dimensions(), {n.B, n.S, iqd[3]})) {
    return invalid("index_q must be [B, T, Hkv, Di] and index_k [B, S, Di], got " + dims_str(iqd) + ", " +
                   dims_str(index_k.dimensions()));
  }
  const int64_t di = iqd[3];
  if (!kl_sm90_supports(static_cast<int>(n.D), static_cast<int>(di), block_size, static_cast<int>(n.Hq / n.Hkv)) ||
      !(index_softmax_scale > 0.0f) || n.T * n.Hkv > std::numeric_limits<int32_t>::max()) {
    return invalid("unsupported Di=" + std::to_string(di) + " index_softmax_scale=" +
                   std::to_string(index_softmax_scale) + " (Di 64 or 128, scale > 0)");
  }
  FillWorkParams(params, n, last_visible, entry_query, entry_slot, item_start, item_count, item_tile, q_base, top_k,
                 block_size, softmax_scale);
  params.q = q.untyped_data();
  params.k = k.untyped_data();
  params.lse = lse.typed_data();
  params.index_q = index_q.untyped_data();
  params.index_k = index_k.untyped_data();
  params.index_head_dim = static_cast<int>(di);
  params.index_softmax_scale = index_softmax_scale;
  params.ilse = nullptr;
  params.partial = nullptr;
  params.d_index_q = nullptr;
  params.d_index_k = nullptr;
  params.value_terms = nullptr;
  params.pass = KLPass::kValue;
  params.deterministic = false;
  element = ElementTypeOf(dtype);
  return ffi::Error::Success();
}

ffi::Error KLPartials(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::Buffer<ffi::F32> lse,
                      ffi::AnyBuffer index_q, ffi::AnyBuffer index_k, ffi::Buffer<ffi::S32> last_visible,
                      ffi::Buffer<ffi::S32> entry_query, ffi::Buffer<ffi::S32> entry_slot,
                      ffi::Buffer<ffi::S32> item_start, ffi::Buffer<ffi::S32> item_count,
                      ffi::Buffer<ffi::S32> item_tile,
                      ffi::Result<ffi::Buffer<ffi::F32>> partial,  // [B, E, Hkv, 2, 4]
                      int32_t q_base, int32_t top_k, int32_t block_size, float softmax_scale,
                      float index_softmax_scale, bool student) {
  AttentionCallSizes n;
  KLParams params;
  ElementType element;
  if (ffi::Error err = CheckInputs(kValueOp, q, k, lse, index_q, index_k, last_visible, entry_query, entry_slot,
                                   item_start, item_count, item_tile, q_base, top_k, block_size, softmax_scale,
                                   index_softmax_scale, n, params, element);
      err.failure()) {
    return err;
  }
  if (!has_dims(partial->dimensions(), {n.B, n.E, n.Hkv, 2, 4})) {
    return ffi::Error::InvalidArgument(std::string(kValueOp) + ": partial must be [B, E, Hkv, 2, 4], got " +
                                       dims_str(partial->dimensions()));
  }
  // Entries the work list leaves out are never written: start them at zero.
  if (ffi::Error err = ZeroOutput(kValueOp, partial, stream); err.failure()) return err;
  params.partial = partial->typed_data();
  params.pass = student ? KLPass::kStudent : KLPass::kValue;
  return launch_error(kValueOp, launch_kl_sm90(params, element, stream));
}

ffi::Error KLBwd(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::Buffer<ffi::F32> lse,
                 ffi::AnyBuffer index_q, ffi::AnyBuffer index_k, ffi::Buffer<ffi::F32> ilse,
                 ffi::Buffer<ffi::S32> last_visible, ffi::Buffer<ffi::S32> entry_query,
                 ffi::Buffer<ffi::S32> entry_slot, ffi::Buffer<ffi::S32> item_start,
                 ffi::Buffer<ffi::S32> item_count, ffi::Buffer<ffi::S32> item_tile,
                 ffi::Result<ffi::Buffer<ffi::F32>> d_index_q,  // [B, T, Hkv, Di] or [B, E, Hkv, Di]
                 ffi::Result<ffi::Buffer<ffi::F32>> d_index_k,    // [B, S, Hkv, Di]
                 ffi::Result<ffi::Buffer<ffi::F32>> value_terms,  // [B, T, Hkv, 2] or [B, E, Hkv, 2]
                 int32_t q_base, int32_t top_k, int32_t block_size, float softmax_scale, float index_softmax_scale,
                 bool deterministic) {
  AttentionCallSizes n;
  KLParams params;
  ElementType element;
  if (ffi::Error err = CheckInputs(kGradOp, q, k, lse, index_q, index_k, last_visible, entry_query, entry_slot,
                                   item_start, item_count, item_tile, q_base, top_k, block_size, softmax_scale,
                                   index_softmax_scale, n, params, element);
      err.failure()) {
    return err;
  }
  auto invalid = [](const std::string& what) {
    return ffi::Error::InvalidArgument(std::string(kGradOp) + ": " + what);
  };
  const int64_t di = params.index_head_dim;
  if (!has_dims(ilse.dimensions(), {n.B, n.T, n.Hkv})) {
    return invalid("ilse must be [B, T, Hkv], got " + dims_str(ilse.dimensions()));
  }
  const int64_t diq_rows = deterministic ? n.E : n.T;
  if (!has_dims(d_index_q->dimensions(), {n.B, diq_rows, n.Hkv, di})) {
    return invalid(std::string("d_index_q must be [B, ") + (deterministic ? "chunk * top_k" : "T") +
                   ", Hkv, Di], got " + dims_str(d_index_q->dimensions()));
  }
  if (!has_dims(d_index_k->dimensions(), {n.B, n.S, n.Hkv, di})) {
    return invalid("d_index_k must be [B, S, Hkv, Di], got " + dims_str(d_index_k->dimensions()));
  }
  if (!has_dims(value_terms->dimensions(), {n.B, diq_rows, n.Hkv, 2})) {
    return invalid(std::string("value_terms must be [B, ") + (deterministic ? "chunk * top_k" : "T") +
                   ", Hkv, 2], got " + dims_str(value_terms->dimensions()));
  }
  // The kernel adds into its outputs: start them at zero (rows no entry names stay zero).
  for (auto* out : {&d_index_q, &d_index_k, &value_terms}) {
    if (ffi::Error err = ZeroOutput(kGradOp, *out, stream); err.failure()) return err;
  }
  params.ilse = ilse.typed_data();
  params.d_index_q = d_index_q->typed_data();
  params.d_index_k = d_index_k->typed_data();
  params.value_terms = value_terms->typed_data();
  params.pass = KLPass::kGradient;
  params.deterministic = deterministic;
  return launch_error(kGradOp, launch_kl_sm90(params, element, stream));
}

// The dense-mode KL for dkl = 1: value shares, d index_q, d index_k (per kv head), given both
// log-sum-exps. Plain causal positions are the caller's promise (T == S is checked here).
ffi::Error DenseKL(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::Buffer<ffi::F32> lse,
                   ffi::AnyBuffer index_q, ffi::AnyBuffer index_k, ffi::Buffer<ffi::F32> ilse,
                   ffi::Result<ffi::Buffer<ffi::F32>> value,      // [B, Hkv, ceil(T / 128)]
                   ffi::Result<ffi::Buffer<ffi::F32>> d_index_q,  // [B, T, Hkv, Di]
                   ffi::Result<ffi::Buffer<ffi::F32>> d_index_k,  // [B, T, Hkv, Di]
                   float softmax_scale, float index_softmax_scale) {
  auto invalid = [](const std::string& what) {
    return ffi::Error::InvalidArgument(std::string(kDenseOp) + ": " + what);
  };
  const ffi::DataType dtype = q.element_type();
  if (!is_half_precision(dtype) || k.element_type() != dtype || index_q.element_type() != dtype ||
      index_k.element_type() != dtype) {
    return invalid("q, k, index_q and index_k must share one dtype, bfloat16 or float16");
  }
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  const auto iqd = index_q.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || iqd.size() != 4) {
    return invalid("q, k and index_q must be rank 4, got " + dims_str(qd) + ", " + dims_str(kd) + ", " +
                   dims_str(iqd));
  }
  const int64_t B = qd[0], T = qd[1], Hq = qd[2], D = qd[3], Hkv = kd[2], Di = iqd[3];
  if (!has_dims(kd, {B, T, Hkv, D}) || Hkv < 1 || Hq % Hkv != 0) {
    return invalid("k must be [B, T, Hkv, D] with Hkv dividing Hq (T == S: plain causal positions), got q " +
                   dims_str(qd) + ", k " + dims_str(kd));
  }
  if (!has_dims(iqd, {B, T, Hkv, Di}) || !has_dims(index_k.dimensions(), {B, T, Di})) {
    return invalid("index_q must be [B, T, Hkv, Di] and index_k [B, T, Di], got " + dims_str(iqd) + ", " +
                   dims_str(index_k.dimensions()));
  }
  if (!has_dims(lse.dimensions(), {B, T, Hq}) || !has_dims(ilse.dimensions(), {B, T, Hkv})) {
    return invalid("lse must be [B, T, Hq] and ilse [B, T, Hkv], got " + dims_str(lse.dimensions()) + ", " +
                   dims_str(ilse.dimensions()));
  }
  const int64_t tiles = (T + 127) / 128;
  if (!has_dims(value->dimensions(), {B, Hkv, tiles}) || !has_dims(d_index_q->dimensions(), {B, T, Hkv, Di}) ||
      !has_dims(d_index_k->dimensions(), {B, T, Hkv, Di})) {
    return invalid("outputs must be value [B, Hkv, ceil(T / 128)], d_index_q and d_index_k [B, T, Hkv, Di], got " +
                   dims_str(value->dimensions()) + ", " + dims_str(d_index_q->dimensions()) + ", " +
                   dims_str(d_index_k->dimensions()));
  }
  if (!dense_kl_sm90_supports(static_cast<int>(D), static_cast<int>(Di), static_cast<int>(Hq / Hkv)) ||
      !(softmax_scale > 0.0f) || !(index_softmax_scale > 0.0f) || T < 1 || B > 65535 || tiles > 65535 ||
      B * T * Hq > std::numeric_limits<int32_t>::max()) {
    return invalid("unsupported D=" + std::to_string(D) + " Di=" + std::to_string(Di) + " T=" + std::to_string(T) +
                   " or scales (D and Di 64 or 128, scales > 0)");
  }
  // d index_q receives one add per key tile and half: start it at zero.
  if (ffi::Error err = ZeroOutput(kDenseOp, d_index_q, stream); err.failure()) return err;
  DenseKLParams p;
  p.q = q.untyped_data();
  p.k = k.untyped_data();
  p.index_q = index_q.untyped_data();
  p.index_k = index_k.untyped_data();
  p.lse = lse.typed_data();
  p.ilse = ilse.typed_data();
  p.d_index_q = d_index_q->typed_data();
  p.d_index_k = d_index_k->typed_data();
  p.value = value->typed_data();
  p.batch = static_cast<int>(B);
  p.seq_len = static_cast<int>(T);
  p.num_q_heads = static_cast<int>(Hq);
  p.num_kv_heads = static_cast<int>(Hkv);
  p.head_dim = static_cast<int>(D);
  p.index_head_dim = static_cast<int>(Di);
  p.softmax_scale = softmax_scale;
  p.index_softmax_scale = index_softmax_scale;
  return launch_error(kDenseOp, launch_dense_kl_sm90(p, ElementTypeOf(dtype), stream));
}

}  // namespace
}  // namespace msa

XLA_FFI_DEFINE_HANDLER_SYMBOL(MsaKLPartials, msa::KLPartials,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()         // q
                                  .Arg<ffi::AnyBuffer>()         // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::AnyBuffer>()         // index_q
                                  .Arg<ffi::AnyBuffer>()         // index_k
                                  .Arg<ffi::Buffer<ffi::S32>>()  // last_visible
                                  .Arg<ffi::Buffer<ffi::S32>>()  // entry_query
                                  .Arg<ffi::Buffer<ffi::S32>>()  // entry_slot
                                  .Arg<ffi::Buffer<ffi::S32>>()  // item_start
                                  .Arg<ffi::Buffer<ffi::S32>>()  // item_count
                                  .Arg<ffi::Buffer<ffi::S32>>()  // item_tile
                                  .Ret<ffi::Buffer<ffi::F32>>()  // partial
                                  .Attr<int32_t>("q_base")
                                  .Attr<int32_t>("top_k")
                                  .Attr<int32_t>("block_size")
                                  .Attr<float>("softmax_scale")
                                  .Attr<float>("index_softmax_scale")
                                  .Attr<bool>("student"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MsaKLBwd, msa::KLBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()         // q
                                  .Arg<ffi::AnyBuffer>()         // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::AnyBuffer>()         // index_q
                                  .Arg<ffi::AnyBuffer>()         // index_k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // ilse
                                  .Arg<ffi::Buffer<ffi::S32>>()  // last_visible
                                  .Arg<ffi::Buffer<ffi::S32>>()  // entry_query
                                  .Arg<ffi::Buffer<ffi::S32>>()  // entry_slot
                                  .Arg<ffi::Buffer<ffi::S32>>()  // item_start
                                  .Arg<ffi::Buffer<ffi::S32>>()  // item_count
                                  .Arg<ffi::Buffer<ffi::S32>>()  // item_tile
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_index_q
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_index_k
                                  .Ret<ffi::Buffer<ffi::F32>>()  // value_terms
                                  .Attr<int32_t>("q_base")
                                  .Attr<int32_t>("top_k")
                                  .Attr<int32_t>("block_size")
                                  .Attr<float>("softmax_scale")
                                  .Attr<float>("index_softmax_scale")
                                  .Attr<bool>("deterministic"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MsaDenseKL, msa::DenseKL,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()         // q
                                  .Arg<ffi::AnyBuffer>()         // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::AnyBuffer>()         // index_q
                                  .Arg<ffi::AnyBuffer>()         // index_k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // ilse
                                  .Ret<ffi::Buffer<ffi::F32>>()  // value
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_index_q
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_index_k
                                  .Attr<float>("softmax_scale")
                                  .Attr<float>("index_softmax_scale"));
