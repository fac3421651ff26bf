// Toolchain probe: the smallest device code that pulls in CuTe. Until real kernels land it is
// what makes the compile check (.ci/cuda_compile_check.sh) prove that nvcc, the pinned CUTLASS
// headers and MSA_JAX_CUDA_ARCHS work together, and what puts SASS for each arch into the
// module (cuobjdump shows it). Never launched; delete it once cuda/kernels/ has a real kernel.
#include <cute/tensor.hpp>

// Hopper kernels use wgmma / setmaxnreg, which exist only in the arch-specific target.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "sm_90 without the 'a' suffix: set MSA_JAX_CUDA_ARCHS=90a"
#endif

namespace msa {

__global__ void toolchain_probe_kernel(float* out) {
  using namespace cute;
  // out viewed as a 32 x 4 column-major tile; thread i writes element (i % 32, i / 32).
  Tensor tile = make_tensor(make_gmem_ptr(out), make_layout(make_shape(Int<32>{}, Int<4>{})));
  tile(threadIdx.x % 32, threadIdx.x / 32 % 4) = static_cast<float>(threadIdx.x);
}

}  // namespace msa
