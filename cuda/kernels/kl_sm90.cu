// Host entry of the SM90 KL passes and of the dense-mode KL: picks the instantiation for (D, Di,
// dtype, pass).
#include "dense_kl_sm90.cuh"
#include "kl_sm90.cuh"
#include "msa/launch.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "sm_90 without the 'a' suffix: set MSA_JAX_CUDA_ARCHS=90a"
#endif

namespace msa {
namespace kl_sm90 {
#define MSA_KL_EXTERN(D, DI, E)                                                                \
  extern template cudaError_t launch<D, DI, E, KLPass::kValue>(const KLParams&, cudaStream_t);    \
  extern template cudaError_t launch<D, DI, E, KLPass::kGradient>(const KLParams&, cudaStream_t);
MSA_KL_EXTERN(64, 64, cutlass::bfloat16_t)
MSA_KL_EXTERN(64, 64, cutlass::half_t)
MSA_KL_EXTERN(64, 128, cutlass::bfloat16_t)
MSA_KL_EXTERN(64, 128, cutlass::half_t)
MSA_KL_EXTERN(128, 64, cutlass::bfloat16_t)
MSA_KL_EXTERN(128, 64, cutlass::half_t)
MSA_KL_EXTERN(128, 128, cutlass::bfloat16_t)
MSA_KL_EXTERN(128, 128, cutlass::half_t)
#undef MSA_KL_EXTERN
// The student pass, one per (Di, dtype), in the D = 64 files (its D is nominal).
#define MSA_KL_STUDENT_EXTERN(DI, E) \
  extern template cudaError_t launch<64, DI, E, KLPass::kStudent>(const KLParams&, cudaStream_t);
MSA_KL_STUDENT_EXTERN(64, cutlass::bfloat16_t)
MSA_KL_STUDENT_EXTERN(64, cutlass::half_t)
MSA_KL_STUDENT_EXTERN(128, cutlass::bfloat16_t)
MSA_KL_STUDENT_EXTERN(128, cutlass::half_t)
#undef MSA_KL_STUDENT_EXTERN
#define MSA_DENSE_KL_EXTERN(D, DI) \
  extern template cudaError_t launch_dense<D, DI, cutlass::bfloat16_t>(const DenseKLParams&, cudaStream_t); \
  extern template cudaError_t launch_dense<D, DI, cutlass::half_t>(const DenseKLParams&, cudaStream_t);
MSA_DENSE_KL_EXTERN(64, 64)
MSA_DENSE_KL_EXTERN(64, 128)
MSA_DENSE_KL_EXTERN(128, 64)
MSA_DENSE_KL_EXTERN(128, 128)
#undef MSA_DENSE_KL_EXTERN

template <int kD, int kDi, class Element>
cudaError_t launch_pass(const KLParams& p, cudaStream_t stream) {
  switch (p.pass) {
    case KLPass::kValue: return launch<kD, kDi, Element, KLPass::kValue>(p, stream);
    case KLPass::kGradient: return launch<kD, kDi, Element, KLPass::kGradient>(p, stream);
    case KLPass::kStudent: return launch<64, kDi, Element, KLPass::kStudent>(p, stream);
  }
  return cudaErrorInvalidValue;
}

template <class Element>
cudaError_t launch_dtype(const KLParams& p, cudaStream_t stream) {
  if (p.head_dim == 64) {
    return p.index_head_dim == 64 ? launch_pass<64, 64, Element>(p, stream) : launch_pass<64, 128, Element>(p, stream);
  }
  return p.index_head_dim == 64 ? launch_pass<128, 64, Element>(p, stream) : launch_pass<128, 128, Element>(p, stream);
}

template <class Element>
cudaError_t launch_dense_dtype(const DenseKLParams& p, cudaStream_t stream) {
  if (p.head_dim == 64) {
    return p.index_head_dim == 64 ? launch_dense<64, 64, Element>(p, stream) : launch_dense<64, 128, Element>(p, stream);
  }
  return p.index_head_dim == 64 ? launch_dense<128, 64, Element>(p, stream) : launch_dense<128, 128, Element>(p, stream);
}
}  // namespace kl_sm90

bool kl_sm90_supports(int head_dim, int index_head_dim, int block_size, int group) {
  return (head_dim == 64 || head_dim == 128) && (index_head_dim == 64 || index_head_dim == 128) &&
         block_size == attention_sm90::kBlock && group >= 1 && group <= kl_sm90::kMaxGroup;
}

cudaError_t launch_kl_sm90(const KLParams& p, ElementType dtype, cudaStream_t stream) {
  const int group = p.num_kv_heads > 0 ? p.num_q_heads / p.num_kv_heads : 0;
  if (!kl_sm90_supports(p.head_dim, p.index_head_dim, p.block_size, group)) return cudaErrorInvalidValue;
  return dtype == ElementType::kBFloat16 ? kl_sm90::launch_dtype<cutlass::bfloat16_t>(p, stream)
                                         : kl_sm90::launch_dtype<cutlass::half_t>(p, stream);
}

// Any G: the dense kernel sums a group's heads in registers, one head a step.
bool dense_kl_sm90_supports(int head_dim, int index_head_dim, int group) {
  return (head_dim == 64 || head_dim == 128) && (index_head_dim == 64 || index_head_dim == 128) && group >= 1;
}

cudaError_t launch_dense_kl_sm90(const DenseKLParams& p, ElementType dtype, cudaStream_t stream) {
  const int group = p.num_kv_heads > 0 ? p.num_q_heads / p.num_kv_heads : 0;
  if (!dense_kl_sm90_supports(p.head_dim, p.index_head_dim, group)) return cudaErrorInvalidValue;
  return dtype == ElementType::kBFloat16 ? kl_sm90::launch_dense_dtype<cutlass::bfloat16_t>(p, stream)
                                         : kl_sm90::launch_dense_dtype<cutlass::half_t>(p, stream);
}

}  // namespace msa
