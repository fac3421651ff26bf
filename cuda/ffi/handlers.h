// What the FFI handler files share: the handler symbols module.cc registers, the shape test
// and the helpers every handler's messages use.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <initializer_list>
#include <string>

#include "msa/launch.h"
#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(MsaSelectBlocks);
XLA_FFI_DECLARE_HANDLER_SYMBOL(MsaSparseAttentionPartials);
XLA_FFI_DECLARE_HANDLER_SYMBOL(MsaSparseAttentionBwd);
XLA_FFI_DECLARE_HANDLER_SYMBOL(MsaKLPartials);
XLA_FFI_DECLARE_HANDLER_SYMBOL(MsaKLBwd);
XLA_FFI_DECLARE_HANDLER_SYMBOL(MsaDenseKL);
XLA_FFI_DECLARE_HANDLER_SYMBOL(MsaPagedIndexScan);

namespace msa {

// Whether a buffer's dtype is one the kernels take (bfloat16 or float16), and which.
inline bool is_half_precision(xla::ffi::DataType dtype) {
  return dtype == xla::ffi::DataType::BF16 || dtype == xla::ffi::DataType::F16;
}
inline ElementType ElementTypeOf(xla::ffi::DataType dtype) {
  return dtype == xla::ffi::DataType::BF16 ? ElementType::kBFloat16 : ElementType::kFloat16;
}

// True iff a buffer's dimensions are exactly `want`.
inline bool has_dims(const xla::ffi::Span<const int64_t>& d, std::initializer_list<int64_t> want) {
  if (d.size() != want.size()) return false;
  size_t i = 0;
  for (int64_t w : want) {
    if (d[i++] != w) return false;
  }
  return true;
}

inline std::string dims_str(xla::ffi::Span<const int64_t> dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

inline std::string dims_str(int64_t a, const char* middle, int64_t c) {
  return std::to_string(a) + ", " + middle + ", " + std::to_string(c);
}

// cudaSuccess -> Success; anything else (a refused configuration, a launch failure) ->
// Internal with the op's name, so the Python caller sees which kernel failed and why.
inline xla::ffi::Error launch_error(const char* op, cudaError_t err) {
  if (err == cudaSuccess) return xla::ffi::Error::Success();
  return xla::ffi::Error::Internal(std::string(op) + ": kernel launch failed: " + cudaGetErrorString(err));
}

}  // namespace msa
