// What the KL kernels share (cuda/kernels/kl_sm90.cuh: the passes, the value and student
// kernel and the launch; kl_grad_sm90.cuh: the gradient kernel): tile and stage constants,
// the per-pass Config and shared storage, the row metadata and the warp reductions, the
// gathers, the tile loads and the teacher / student fragments.
#pragma once

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>

#include "attention_rows_sm90.cuh"
#include "msa/params.h"
#include "sm90_common.cuh"

namespace msa::kl_sm90 {

using namespace cute;
using namespace attention_sm90;

constexpr int kHalf = kBlock / 2;  // keys per computing warpgroup
constexpr int kStages = 4;         // q (and index_q) stages of 64 rows; one gathering warp each
constexpr int kBatchBuffers = 2;   // the gradient pass's index_q batches of 64 token rows
constexpr int kThreads = 128 * 3;

constexpr int kMaxGroup = 16;     // a token's rows must lie within one warp (reduce_scatter)

// Row slots per token: G rounded up to a power of two.
__host__ __device__ constexpr int row_slots(int group) {
  int slots = 1;
  while (slots < group) slots *= 2;
  return slots;
}

// Row r of step c when a token takes `slots` rows: the token's (query, slot) entry and the
// row's head. Padding rows (r % slots >= G) carry their token's entry too; they hold no head.
template <class Params>
__device__ __forceinline__ RowEntry kl_row_entry(const Params& p, int b, int g, int start, int count, int group,
                                                 int slots, int c, int r) {
  RowEntry e = row_entry(p, b, g, start, count, slots, c, r);
  e.head = g * group + r % slots;
  return e;
}

// What the compute warpgroups need of a matrix row of a step besides its q: the gathering
// warp loads it with the row's source and writes it beside the stage, so its latency hides
// behind the gathers in flight and the compute side holds no registers for it.
struct RowInfo {
  float lse_log2;  // the teacher row's lse in log2 units
  int last_p;      // the last key the row's P covers (absolute): -1 for dead and padding rows
  int last;        // the last key the row's token sees (absolute): -1 for a dead token
  int query;       // the token's, relative to q_base; -1: dead token
  int part_row;    // the token's query * top_k + slot; -1: dead token
};

// The same for the compute side, relative to its warpgroup's 64-key half.
struct RowMeta {
  float lse_log2;
  int p_visible;  // keys of the half the row's P covers
  int visible;    // keys of the half the row's token sees
  int query;
  int part_row;
};
// A token row of the gradient pass's index_q batch, written beside it by the gathering warp
// of the token's step.
struct TokenInfo {
  float ilse;    // the student's lse of the token
  int last;      // the last key the token sees (absolute): -1 for a dead token or an unused row
  int query;     // relative to q_base; -1: dead token or unused row
  int part_row;  // query * top_k + slot; -1: dead token or unused row
};

// The TMA argument of a pass that loads no K (the student's).
struct NoTma {};

template <int kD_, int kDi_, class Element_, KLPass kPass>
struct Config {
  static constexpr int kD = kD_;
  static constexpr int kDi = kDi_;
  static constexpr bool kGrad = kPass == KLPass::kGradient;
  static constexpr bool kStudent = kPass == KLPass::kStudent;  // reads no q, k or lse
  // Registers per thread of the gathering and the computing warpgroups: 128 x load + 256 x
  // compute must stay within the 168 x 384 = 64512 the launch gives the CTA, or setmaxnreg.inc
  // waits forever (96 / 208, 65536, hung). The value and student passes: the gatherer (its
  // rows' sources and info across the stage wait, 2 x 32 cp.async a step) spills below 72,
  // the compute side fits 216 (ptxas -v, nvcc 13.0). The gradient pass's compute side (P̄, two
  // S accumulators and d index_k: 32 + 64 + Di / 2 floats a thread) fits 200; its gatherer
  // spilled at 88 (its rows' entries and lse across the stage wait, and the batch's tokens).
  static constexpr uint32_t kLoadRegisters = kGrad ? 96 : 72;
  static constexpr uint32_t kComputeRegisters = kGrad ? 200 : 216;
  static_assert(sm90::register_split_fits(kThreads, kLoadRegisters, kComputeRegisters));
  using Element = Element_;
  using IndexElement = Element_;  // index_q and index_k have q's dtype
  // index_q buffers: the stages' lead rows (value, student) or the gradient pass's token batches.
  static constexpr int kIQBuffers = kGrad ? kBatchBuffers : kStages;
  static constexpr int kChunks = kD * sizeof(Element) / 16;        // 16-byte pieces of a q row
  static constexpr int kIChunks = kDi * sizeof(IndexElement) / 16;  // ... of an index_q row
  using SmemLayoutQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                             Shape<Int<kRows>, Int<kD>, Int<kStages>>{}));
  using SmemLayoutIQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<IndexElement>{},
                                              Shape<Int<kRows>, Int<kDi>, Int<kIQBuffers>>{}));
  // index_q rows as the B operand of d index_k = duᵀ IQ: (N = Di, K = token rows, batch buffer).
  using SmemLayoutIQt = decltype(composition(
      SmemLayoutIQ{}, make_ordered_layout(Shape<Int<kDi>, Int<kRows>, Int<kIQBuffers>>{}, Step<_2, _1, _3>{})));
  using SmemLayoutHalf = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                                Shape<Int<kHalf>, Int<kD>>{}));
  using SmemLayoutK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                             Shape<Int<kHalf>, Int<kD>, _2>{}));
  using SmemLayoutIHalf = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<IndexElement>{},
                                                 Shape<Int<kHalf>, Int<kDi>>{}));
  using SmemLayoutIK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<IndexElement>{},
                                              Shape<Int<kHalf>, Int<kDi>, _2>{}));
  // Index keys as the B operand of d index_q = du Ki: (N = Di, K = keys, half).
  using SmemLayoutIKt = decltype(composition(
      SmemLayoutIK{}, make_ordered_layout(Shape<Int<kDi>, Int<kHalf>, _2>{}, Step<_2, _1, _3>{})));
  // duᵀ of one warpgroup: the A operand of d index_k, (M = keys, K = token rows), keys contiguous.
  using SmemLayoutDUt = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<IndexElement>{},
                                               Shape<Int<kHalf>, Int<kRows>>{}));

  // S = Q Kᵀ over one half (m64 n64 k16, both operands from shared memory).
  using MmaS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<Int<kRows>, Int<kHalf>, Int<kD>>,
                           GMMA::Major::K, GMMA::Major::K>()));
  // U = IQ Kiᵀ over one half.
  using MmaU = decltype(make_tiled_mma(
      GMMA::ss_op_selector<IndexElement, IndexElement, float, Shape<Int<kRows>, Int<kHalf>, Int<kDi>>,
                           GMMA::Major::K, GMMA::Major::K>()));
  // The same buffer as (M = token rows, K = keys), keys contiguous: the A operand of d index_q.
  using SmemLayoutDU = decltype(composition(
      SmemLayoutDUt{}, make_ordered_layout(Shape<Int<kRows>, Int<kHalf>>{}, Step<_2, _1>{})));
  // d index_q share = du Ki: du and Ki (read MN-major) from shared memory.
  using MmaDIQ = decltype(make_tiled_mma(
      GMMA::ss_op_selector<IndexElement, IndexElement, float, Shape<Int<kRows>, Int<kDi>, Int<kHalf>>,
                           GMMA::Major::K, GMMA::Major::MN>()));
  // d index_k += duᵀ IQ: M = the half's keys, N = Di, K = the step's token rows.
  using MmaDIK = decltype(make_tiled_mma(
      GMMA::ss_op_selector<IndexElement, IndexElement, float, Shape<Int<kHalf>, Int<kDi>, Int<kRows>>,
                           GMMA::Major::MN, GMMA::Major::MN>()));
  static constexpr uint32_t kTileBytes = kBlock * ((kStudent ? 0 : kD * sizeof(Element)) + kDi * sizeof(IndexElement));

  struct SharedStorage {
    array_aligned<Element, kStudent ? 8 : cosize_v<SmemLayoutQ>, 1024> q;
    array_aligned<IndexElement, cosize_v<SmemLayoutIQ>, 1024> iq;
    array_aligned<Element, kStudent ? 8 : cosize_v<SmemLayoutK>, 1024> k;
    array_aligned<IndexElement, cosize_v<SmemLayoutIK>, 1024> ik;
    array_aligned<IndexElement, kGrad ? 2 * cosize_v<SmemLayoutDUt> : 8, 1024> du;  // one du per warpgroup
    // The stage's rows, written by its gathering warp: value and student passes, their info;
    // gradient pass, their teacher lse in log2 units.
    RowInfo info[kGrad ? 1 : kStages][kRows];
    float lse_log2[kGrad ? kStages : 1][kRows];
    TokenInfo tokens[kGrad ? kBatchBuffers : 1][kRows];  // gradient pass: the batches' tokens
    // mbarrier: stage gathered (32 arrivals: every lane of the gathering warp arrives after its
    // own writes, so each write is ordered before the readers' wait)
    uint64_t full[kStages];
    uint64_t empty[kStages];  // mbarrier: stage read (256 arrivals: both computing warpgroups)
    // Gradient pass: batch m's student step is done (256 arrivals), on barrier m % kStages. One
    // barrier per buffer was not enough: with G' = 1 the gatherers run up to kStages batches
    // ahead, so a parity wait could take the completion of batch m - 2 * kBatchBuffers for the
    // one of batch m - kBatchBuffers (and overwrite a batch still being read). With kStages
    // barriers the two completions a waiter can see have different parities.
    uint64_t batch_empty[kStages];
    uint64_t tile_full;       // mbarrier: K and index keys landed (TMA transaction bytes)
  };

  static auto make_tma_k(const void* ptr, const KLParams& p) {
    return make_tma_copy(SM90_TMA_LOAD{}, kv_tensor<kD, Element>(ptr, p), SmemLayoutHalf{});
  }
  // index_k [B, S, Di] seen as (S, Di, B).
  static auto index_k_tensor(const void* ptr, const KLParams& p) {
    return make_tensor(make_gmem_ptr(static_cast<const IndexElement*>(ptr)), make_shape(p.kv_len, Int<kDi>{}, p.batch),
                       make_stride(int64_t(kDi), _1{}, int64_t(p.kv_len) * kDi));
  }
  static auto make_tma_ik(const void* ptr, const KLParams& p) {
    return make_tma_copy(SM90_TMA_LOAD{}, index_k_tensor(ptr, p), SmemLayoutIHalf{});
  }
  using TmaK = std::conditional_t<kStudent, NoTma, decltype(make_tma_k(nullptr, KLParams{}))>;
  using TmaIK = decltype(make_tma_ik(nullptr, KLParams{}));
  static TmaK tma_k(const KLParams& p) {
    if constexpr (kStudent) {
      return NoTma{};
    } else {
      return make_tma_k(p.k, p);
    }
  }
};

template <class Cfg>
struct KernelArgs {
  KLParams p;
  typename Cfg::TmaK tma_k;
  typename Cfg::TmaIK tma_ik;
};

// Gathers the 64 rows of one stage, 16 bytes a lane at a time: row r comes from source row
// src[r / 32] of lane r % 32 (-1: zero fill, -2: left as it is), `row_elems` elements per
// source row.
template <int kChunks, class Tensor, class Element>
__device__ __forceinline__ void gather_rows(Tensor&& stage, const Element* base, int row_elems, const int (&src)[2],
                                            int lane) {
  constexpr int kPieces = kRows * kChunks / 32;  // per lane
  constexpr int kRowsPerPiece = 32 / kChunks;
  static_assert(32 % kChunks == 0, "one gather instruction covers whole rows");
  CUTE_UNROLL
  for (int k = 0; k < kPieces; ++k) {
    const int i = k * 32 + lane;
    const int r = i / kChunks;
    const int col = (i % kChunks) * (16 / sizeof(Element));
    const int row = __shfl_sync(0xffffffff, src[(k * kRowsPerPiece) / 32], r % 32);
    if (row >= 0) {
      cp_async_16(cute::cast_smem_ptr_to_uint(&stage(r, col)), base + int64_t(row) * row_elems + col);
    } else if (row == -1) {
      *reinterpret_cast<uint4*>(&stage(r, col)) = make_uint4(0, 0, 0, 0);
    }
  }
}

// x reduced over the kSpan lanes (a power of two <= 32) that share a token.
template <int kSpan>
__device__ __forceinline__ float span_max(float x) {
  CUTE_UNROLL
  for (int o = 1; o < kSpan; o *= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, o));
  return x;
}

template <int kSpan>
__device__ __forceinline__ float span_sum(float x) {
  CUTE_UNROLL
  for (int o = 1; o < kSpan; o *= 2) x += __shfl_xor_sync(0xffffffff, x, o);
  return x;
}

// Sums each array's a[k] (k < kN, the same kN columns in every lane) over the lanes that
// differ in lane bits 2 .. 1 + kLevels, halving the columns a lane keeps at each level: after
// it a[k] for k < kN >> kLevels holds the sum of column `base + k`, base returned. The lanes
// of such a set hold kN >> kLevels distinct columns each, together all kN.
template <int kLevels, int kN, class... Arrays>
__device__ __forceinline__ int reduce_scatter(int lane, Arrays&... arrays) {
  int base = 0;
  for_each(make_seq<kLevels>{}, [&](auto level) {
    constexpr int kKeep = kN >> (decltype(level)::value + 1);
    constexpr int kMask = 4 << (kLevels - 1 - decltype(level)::value);
    const bool upper = (lane & kMask) != 0;
    CUTE_UNROLL
    for (int k = 0; k < kKeep; ++k) {
      auto exchange = [&](float(&a)[kN]) {
        const float send = upper ? a[k] : a[k + kKeep];
        a[k] = (upper ? a[k + kKeep] : a[k]) + __shfl_xor_sync(0xffffffff, send, kMask);
      };
      (exchange(arrays), ...);
    }
    if (upper) base += kKeep;
  });
  return base;
}

// Before either kernel's roles split: the stages' mbarriers, the zero padding rows of q (the
// teacher's products read them; made visible to wgmma by the proxy fence), then a
// __syncthreads. `zero_iq`: the index_q buffers start zero (the lead-row layout reads rows no
// token writes).
template <class Cfg>
__device__ __forceinline__ void kl_prologue(typename Cfg::SharedStorage& smem, int group, int slots, bool zero_iq) {
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      cutlass::arch::ClusterBarrier::init(&smem.full[s], 32);
      cutlass::arch::ClusterBarrier::init(&smem.empty[s], 256);
    }
    for (int i = 0; i < kStages; ++i) cutlass::arch::ClusterBarrier::init(&smem.batch_empty[i], 256);
    cutlass::arch::ClusterTransactionBarrier::init(&smem.tile_full, 1);
  }
  if (zero_iq) {
    uint4* iq = reinterpret_cast<uint4*>(smem.iq.data());
    for (int i = threadIdx.x; i < int(sizeof(smem.iq) / 16); i += kThreads) iq[i] = make_uint4(0, 0, 0, 0);
  }
  if (!Cfg::kStudent && slots != group) {
    uint4* q = reinterpret_cast<uint4*>(smem.q.data());
    for (int i = threadIdx.x; i < int(sizeof(smem.q) / 16); i += kThreads) q[i] = make_uint4(0, 0, 0, 0);
  }
  cutlass::arch::fence_view_async_shared();
  cutlass::arch::fence_barrier_init();
  __syncthreads();
}

// One thread: the tile's index keys and (except in the student pass) keys, both halves, by TMA
// on the tile's transaction barrier.
template <class Cfg>
__device__ __forceinline__ void load_tile(const KernelArgs<Cfg>& args, typename Cfg::SharedStorage& smem, int tile,
                                          int g, int b) {
  const KLParams& p = args.p;
  constexpr int kD = Cfg::kD;
  constexpr int kDi = Cfg::kDi;
  cute::prefetch_tma_descriptor(args.tma_ik.get_tma_descriptor());
  Tensor sIK = make_tensor(make_smem_ptr(smem.ik.data()), typename Cfg::SmemLayoutIK{});
  cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&smem.tile_full, Cfg::kTileBytes);
  auto tik = args.tma_ik.get_slice(0);
  Tensor mIK = args.tma_ik.get_tma_tensor(make_shape(p.kv_len, Int<kDi>{}, p.batch));
  CUTE_UNROLL
  for (int h = 0; h < 2; ++h) {
    Tensor gIK = local_tile(domain_offset(make_coord(tile, 0), mIK(_, _, b)), Shape<Int<kHalf>, Int<kDi>>{},
                            make_coord(h, 0));
    copy(args.tma_ik.with(smem.tile_full), tik.partition_S(gIK), tik.partition_D(sIK(_, _, h)));
  }
  if constexpr (!Cfg::kStudent) {
    cute::prefetch_tma_descriptor(args.tma_k.get_tma_descriptor());
    Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Cfg::SmemLayoutK{});
    auto tk = args.tma_k.get_slice(0);
    Tensor mK = args.tma_k.get_tma_tensor(kv_shape<kD>(p));
    CUTE_UNROLL
    for (int h = 0; h < 2; ++h) {
      Tensor gK = local_tile(domain_offset(make_coord(tile, 0), mK(_, _, g, b)), Shape<Int<kHalf>, Int<kD>>{},
                             make_coord(h, 0));
      copy(args.tma_k.with(smem.tile_full), tk.partition_S(gK), tk.partition_D(sK(_, _, h)));
    }
  }
}

// Matrix row r of step c as its gathering warp sees it: the row's info (teacher lse, last keys,
// the token's entry) and q's source row, returned: -2 for a padding row (left zero), -1 for a
// dead row (zero-filled).
template <bool kStudent>
__device__ __forceinline__ int step_row(const KLParams& p, int b, int g, int start, int count, int group, int slots,
                                        int c, int r, RowInfo& info) {
  const RowEntry e = kl_row_entry(p, b, g, start, count, group, slots, c, r);
  const bool token_live = e.query >= 0;
  const bool head_live = !kStudent && token_live && r % slots < group;
  info.last = row_last_visible(p, b, e);
  info.last_p = head_live ? info.last : -1;
  info.lse_log2 =
      head_live ? p.lse[int64_t(b) * p.q_len * p.num_q_heads + row_src(p, e)] * float(M_LOG2E) : 0.0f;
  info.query = e.query;
  info.part_row = token_live ? e.query * p.top_k + e.slot : -1;
  return r % slots >= group ? -2 : e.query < 0 ? -1 : row_src(p, e);
}

// A row's metadata relative to the 64-key half starting at key0.
__device__ __forceinline__ RowMeta row_meta(const RowInfo& info, int key0) {
  return RowMeta{info.lse_log2, min(max(info.last_p - key0 + 1, 0), kHalf), min(max(info.last - key0 + 1, 0), kHalf),
                 info.query, info.part_row};
}

// P = exp(s S - lse) per head row over its visible keys (0 elsewhere, a select: masked S may be
// anything), in place of S.
template <class TensorP, class TensorC>
__device__ __forceinline__ void teacher_probabilities(TensorP& ps, const TensorC& cs, const RowMeta (&rows)[2],
                                                      float scale_log2) {
  CUTE_UNROLL
  for (int i = 0; i < 2; ++i) {
    CUTE_UNROLL
    for (int j = 0; j < size<1>(ps); ++j) {
      ps(i, j) = get<1>(cs(i, j)) < rows[i].p_visible ? exp2f(ps(i, j) * scale_log2 - rows[i].lse_log2) : 0.0f;
    }
  }
}

// The value's teacher terms (sum P̄ log P̄ - P̄ u, sum P̄) over the keys among a lane's n that
// are `ok`.
template <int kN>
__device__ __forceinline__ float2 teacher_terms(const float* u, const float* pm, const bool* ok) {
  float a = 0.0f, psum = 0.0f;
  CUTE_UNROLL
  for (int j = 0; j < kN; ++j) {
    if (!ok[j]) continue;
    a += (pm[j] > 0.0f ? pm[j] * logf(pm[j]) : 0.0f) - pm[j] * u[j];
    psum += pm[j];
  }
  return make_float2(a, psum);
}

// acc = A Bᵀ over the K mode of the fragments (SS wgmma), overwriting acc; the caller fences,
// commits and waits.
template <class Mma, class FragA, class FragB, class Acc>
__device__ __forceinline__ void gemm_overwrite(Mma& mma, const FragA& a, const FragB& b, Acc& acc) {
  mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int kb = 0; kb < size<2>(a); ++kb) {
    cute::gemm(mma, a(_, _, kb), b(_, _, kb), acc);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
}

// What both kernels' compute warpgroups read S = Q Kᵀ and U = IQ Kiᵀ from: the operand
// fragments (q and index_q per stage or batch buffer, this half's keys and index keys) and
// the (row, key) coordinates of an m64 n64 accumulator, (2, 16) per thread, which S and U share.
template <class Cfg>
__device__ __forceinline__ auto teacher_student_fragments(typename Cfg::SharedStorage& smem, int half, int thread) {
  auto thr_s = typename Cfg::MmaS{}.get_thread_slice(thread);
  auto thr_u = typename Cfg::MmaU{}.get_thread_slice(thread);
  Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Cfg::SmemLayoutQ{});
  Tensor sIQ = make_tensor(make_smem_ptr(smem.iq.data()), typename Cfg::SmemLayoutIQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Cfg::SmemLayoutK{})(_, _, half);
  Tensor sIK = make_tensor(make_smem_ptr(smem.ik.data()), typename Cfg::SmemLayoutIK{})(_, _, half);
  Tensor coord = thr_s.partition_C(make_identity_tensor(Shape<Int<kRows>, Int<kHalf>>{}));
  return cute::make_tuple(thr_s.make_fragment_A(thr_s.partition_A(sQ)),    // (MMA, MMA_M, MMA_K, stages)
                          thr_s.make_fragment_B(thr_s.partition_B(sK)),    // (MMA, MMA_N, MMA_K)
                          thr_u.make_fragment_A(thr_u.partition_A(sIQ)),   // (MMA, MMA_M, MMA_K, buffers)
                          thr_u.make_fragment_B(thr_u.partition_B(sIK)),   // (MMA, MMA_N, MMA_K)
                          make_tensor(coord.data(), sm90::acc_rows_by_cols(coord.layout())));
}

// The student products of both gradient kernels (kl_grad_kernel, dense_kl_kernel): d index_k +=
// duᵀ IQ and this half's d index_q share du Ki, over the warpgroup's du buffer (written as (rows,
// keys), read as both A operands), the index_q buffers and this half's index keys. Returns (A
// and B of d index_q, A and B (per index_q buffer) of d index_k, the (row, Di) coordinates of
// d index_q's and d index_k's accumulators).
template <class Cfg>
__device__ __forceinline__ auto student_product_fragments(typename Cfg::SharedStorage& smem, int half, int thread) {
  auto thr_diq = typename Cfg::MmaDIQ{}.get_thread_slice(thread);
  auto thr_dik = typename Cfg::MmaDIK{}.get_thread_slice(thread);
  auto* du_base = smem.du.data() + half * cosize_v<typename Cfg::SmemLayoutDUt>;
  Tensor sDUt = make_tensor(make_smem_ptr(du_base), typename Cfg::SmemLayoutDUt{});  // (keys, rows)
  Tensor sDU = make_tensor(make_smem_ptr(du_base), typename Cfg::SmemLayoutDU{});    // (rows, keys)
  Tensor sIKt = make_tensor(make_smem_ptr(smem.ik.data()), typename Cfg::SmemLayoutIKt{})(_, _, half);
  Tensor sIQt = make_tensor(make_smem_ptr(smem.iq.data()), typename Cfg::SmemLayoutIQt{});
  Tensor coord_iq = thr_diq.partition_C(make_identity_tensor(Shape<Int<kRows>, Int<Cfg::kDi>>{}));
  Tensor coord_ik = thr_dik.partition_C(make_identity_tensor(Shape<Int<kHalf>, Int<Cfg::kDi>>{}));
  return cute::make_tuple(thr_diq.make_fragment_A(thr_diq.partition_A(sDU)),    // (MMA, MMA_M, MMA_K)
                          thr_diq.make_fragment_B(thr_diq.partition_B(sIKt)),   // (MMA, MMA_N, MMA_K)
                          thr_dik.make_fragment_A(thr_dik.partition_A(sDUt)),   // (MMA, MMA_M, MMA_K)
                          thr_dik.make_fragment_B(thr_dik.partition_B(sIQt)),   // (MMA, MMA_N, MMA_K, buffers)
                          make_tensor(coord_iq.data(), sm90::acc_rows_by_cols(coord_iq.layout())),
                          make_tensor(coord_ik.data(), sm90::acc_rows_by_cols(coord_ik.layout())));
}

// acc_dik += duᵀ IQ (index_q buffer `buf`) and acc_diq = du Ki, issued and waited for; du must
// be complete in shared memory and fenced for the async proxy.
template <class MmaDIK, class MmaDIQ, class Fragments, class AccDIK, class AccDIQ>
__device__ __forceinline__ void student_products(MmaDIK& mma_dik, MmaDIQ& mma_diq, const Fragments& f, int buf,
                                                 AccDIK& acc_dik, AccDIQ& acc_diq) {
  warpgroup_fence_operand(acc_diq);
  warpgroup_fence_operand(acc_dik);
  warpgroup_arrive();
  CUTE_UNROLL
  for (int kb = 0; kb < size<2>(get<2>(f)); ++kb) {
    cute::gemm(mma_dik, get<2>(f)(_, _, kb), get<3>(f)(_, _, kb, buf), acc_dik);
  }
  gemm_overwrite(mma_diq, get<0>(f), get<1>(f), acc_diq);
  warpgroup_commit_batch();
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc_diq);
  warpgroup_fence_operand(acc_dik);
}

// Row r of a d index_q share (diq and its coordinates ciq in the (rows, cols) view), scaled,
// added to `out`, the row's Di floats.
template <class Acc, class Coord>
__device__ __forceinline__ void add_row_share(float* out, const Acc& diq, const Coord& ciq, int r, float scale) {
  CUTE_UNROLL
  for (int j = 0; j < size<1>(diq); j += 2) {
    add_pair(out + get<1>(ciq(r, j)), scale * diq(r, j), scale * diq(r, j + 1));
  }
}

}  // namespace msa::kl_sm90
