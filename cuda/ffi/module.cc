// The Python binding of the CUDA implementation: msa_jax._msa_cuda.
//
// It only hands XLA FFI handlers to Python (registrations()) and says what it was built with
// (build_info()); msa_jax/ffi/__init__.py registers the handlers, once, with XLA. Handlers
// live in cuda/ffi/*.cc, kernels in cuda/kernels/; nothing here launches anything.
#include <cuda_runtime_api.h>  // CUDART_VERSION
#include <nanobind/nanobind.h>

#include <type_traits>

#include "cutlass/version.h"
#include "handlers.h"
#include "xla/ffi/api/c_api.h"
#include "xla/ffi/api/ffi.h"

namespace nb = nanobind;

namespace {

// Wraps an XLA_FFI_DEFINE_HANDLER_SYMBOL for jax.ffi.register_ffi_target. The check turns
// "registered something that is not a handler" (a crash inside XLA) into a compile error.
template <typename T>
nb::capsule EncapsulateFfiHandler(T* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, T, XLA_FFI_CallFrame*>,
                "an FFI handler must be XLA_FFI_Error*(XLA_FFI_CallFrame*)");
  return nb::capsule(reinterpret_cast<void*>(fn));
}

nb::dict Registrations() {
  nb::dict targets;
  // One entry per handler (cuda/ffi/*.cc); msa_jax/ffi/ops.py calls them by these names.
  targets["msa_select_blocks"] = EncapsulateFfiHandler(MsaSelectBlocks);
  targets["msa_sparse_attention_partials"] = EncapsulateFfiHandler(MsaSparseAttentionPartials);
  targets["msa_sparse_attention_bwd"] = EncapsulateFfiHandler(MsaSparseAttentionBwd);
  targets["msa_kl_partials"] = EncapsulateFfiHandler(MsaKLPartials);
  targets["msa_kl_bwd"] = EncapsulateFfiHandler(MsaKLBwd);
  targets["msa_dense_kl"] = EncapsulateFfiHandler(MsaDenseKL);
  targets["msa_paged_index_scan"] = EncapsulateFfiHandler(MsaPagedIndexScan);
  return targets;
}

nb::dict BuildInfo() {
  nb::dict info;
  info["cuda_runtime_version"] = CUDART_VERSION;  // e.g. 13000 for CUDA 13.0
  info["xla_ffi_api_version"] = nb::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
  info["cuda_archs"] = MSA_JAX_CUDA_ARCHS;  // comma-separated, from CMake, e.g. "90a,100a"
  info["cutlass_version"] = nb::str("{}.{}.{}").format(CUTLASS_MAJOR, CUTLASS_MINOR,
                                                       CUTLASS_PATCH);
  return info;
}

}  // namespace

NB_MODULE(_msa_cuda, m) {
  m.doc() = "msa_jax CUDA kernels as XLA FFI handlers (load through msa_jax.ffi).";
  m.def("registrations", &Registrations,
        "Dict of XLA FFI target name -> capsule, for jax.ffi.register_ffi_target.");
  m.def("build_info", &BuildInfo,
        "Dict describing the toolchain this extension was compiled with.");
}
