// Helpers the SM90 kernels share: the wgmma accumulator seen as (rows, cols) and as the A
// operand of a register-sourced wgmma, the register split check of the warp-specialised
// kernels, and the alignment test every launcher applies to its TMA / cp.async base pointers.
#pragma once

#include <cstdint>

#include <cute/tensor.hpp>

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

// TMA descriptors and cp.async need 16-byte aligned global addresses.
inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace msa::sm90
