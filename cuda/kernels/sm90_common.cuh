// Helpers the SM90 kernels share: the wgmma accumulator seen as (rows, cols) and as the A
// operand of a register-sourced wgmma, the register split check of the warp-specialised
// kernels, and the alignment test every launcher applies to its TMA / cp.async base pointers.
#pragma once

#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

namespace msa::sm90 {

// ((2 cols, 2 rows, N/8), MMA_M, MMA_N) accumulator layout of SM90 wgmma -> (rows, cols):
// a thread's two rows (lane / 4 and lane / 4 + 8 of its warp's 16) by its columns.
template <class Layout>
CUTE_HOST_DEVICE auto acc_rows_by_cols(Layout const& l) {
  using cute::get;
  using cute::make_layout;
  auto v = get<0>(l);
  return make_layout(make_layout(get<1>(v), get<1>(l)), make_layout(get<0>(v), get<2>(v), get<2>(l)));
}

// The registers of an m64nNk16 accumulator, converted to the input dtype, read as the A
// operand of an RS wgmma over K = N: ((2 cols, 2 rows, 2 col groups), MMA_M, N/16). partition_fragment_C
// lays the accumulator out compactly, ((2, 2, N/8), 1, 1) : ((1, 2, 4), 0, 0); the A operand
// of one k16 step is two consecutive 8-column groups, so the layout is a reshape.
template <int kN>
using AccAsAOperand = cute::Layout<cute::Shape<cute::Shape<cute::_2, cute::_2, cute::_2>, cute::_1, cute::Int<kN / 16>>,
                                   cute::Stride<cute::Stride<cute::_1, cute::_2, cute::_4>, cute::_0, cute::_8>>;

// Registers per thread that a CTA of `threads` threads launched with
// __launch_bounds__(threads, 1) gets: 65536 / threads, rounded down to a multiple of 8.
constexpr int launch_registers(int threads) { return 65536 / threads / 8 * 8; }

// Whether setmaxnreg can give the loading warpgroup (128 threads) `load` registers a thread
// and the other threads `compute`: the split must stay within what the launch gave the CTA.
// One that does not (the KL gradient pass tried 96 / 208 with 384 threads: 65536 against
// 64512) made setmaxnreg.inc wait forever on the H100.
constexpr bool register_split_fits(int threads, int load, int compute) {
  return 128 * load + (threads - 128) * compute <= launch_registers(threads) * threads;
}

// A warpgroup's m64 x N float accumulator, seen as (rows, cols) by acc_rows_by_cols, converted
// to Element and stored to shared memory by stmatrix: one instruction per 16 columns (four 8 x 8
// matrices: rows 0-7 and 8-15 of the warp's 16, by two 8-column groups) where element-wise
// stores take 16. `at(row, col)` is the address of element (row, col); a row's 8-column groups
// (col a multiple of 8) must be 16 contiguous bytes: the matrix in a K-major layout, or its
// transpose in an MN-major one (the backward's Pᵀ and dSᵀ operands), in any 16-byte swizzle.
template <class Element, class Acc, class Addr>
__device__ __forceinline__ void store_acc_rows(Acc const& acc, Addr const& at) {
  static_assert(sizeof(Element) == 2, "stmatrix stores 16-bit elements");
  constexpr int kGroups = decltype(cute::size<1>(acc))::value / 4;  // 16-column groups
  const int lane = threadIdx.x % 32;
  const int matrix = lane / 8;  // whose row address this lane gives
  const int row = (threadIdx.x % 128) / 32 * 16 + (matrix % 2) * 8 + lane % 8;
  auto pack = [](float a, float b) {
    return uint32_t(Element(a).raw()) | (uint32_t(Element(b).raw()) << 16);
  };
  CUTE_UNROLL
  for (int n = 0; n < kGroups; ++n) {
    const uint32_t addr = cute::cast_smem_ptr_to_uint(at(row, 16 * n + 8 * (matrix / 2)));
    asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr),
                 "r"(pack(acc(0, 4 * n), acc(0, 4 * n + 1))), "r"(pack(acc(1, 4 * n), acc(1, 4 * n + 1))),
                 "r"(pack(acc(0, 4 * n + 2), acc(0, 4 * n + 3))), "r"(pack(acc(1, 4 * n + 2), acc(1, 4 * n + 3))));
  }
}

// TMA descriptors and cp.async need 16-byte aligned global addresses.
inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace msa::sm90
