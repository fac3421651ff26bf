// The KL index-alignment loss over the sparse support for SM90 (spec, "KL index-alignment loss
// and gradient detach"), KV-outer over the forward's work lists (msa_jax/kv_outer/worklist.py),
// in three passes (KLPass):
//   value (kValue): per (entry, key half) the partials (max u, sum exp(u - max),
//     sum P log P - P u, sum P); msa_jax/cuda.py merges them into the student's ilse and the
//     KL value (KL = sum(P log P - P u) + ilse * sum P, as msa_jax/pallas/kl.py);
//   student (kStudent): the same partials with the student's terms only, for ilse: no q, no K,
//     no S = Q Kᵀ, and one row per token (64 tokens a step, where the others take 64 / G');
//   gradient (kGradient, given ilse): du = R - P with R = exp(u - ilse), then
//     d index_q += si du Ki and d index_k += si duᵀ index_q, and each token's value terms
//     (sum P log P - P u, sum P), so that under differentiation student + gradient replace the
//     value pass (msa_jax/cuda.py, kl_fwd).
//
// One CTA per work item: one 128-key tile of kv head g and up to `count` (query, slot)
// entries that selected it. K and the tile's index keys are loaded once (TMA). A teacher step
// covers 64 matrix rows: 64 / G' query tokens x G' row slots, G' = G rounded up to a power of
// two (slots past G are padding rows that hold no head):
//   S = Q Kᵀ, P(row) = exp(s S - lse) (exact: lse is the row's over its whole support).
// Everything after P is per token, once per token and in registers: with G' a power of two a
// token's rows are a fixed set of accumulator lanes (G' <= 8: G' consecutive lane quads of one
// register row; G' = 16: both register rows of a whole warp), so a reduce-scatter over those
// lanes (`reduce_scatter`) sums the token's P over its heads and leaves each lane a few of the
// token's keys, where P̄ = sum / G.
//   The value and student passes (`kl_kernel`) lay the student's rows out like the teacher's
// (a token's index_q is gathered into its first, "lead", row only; the other rows stay zero),
// so one MMA shape serves both: U = IQ Kiᵀ beside S, reduce-scattered with P, and the value
// partials reduced over the token's lanes.
//   The gradient pass (`kl_grad_kernel`) batches the student side instead: index_q rows go
// to a buffer of 64 token rows (one per token, G' teacher steps fill it), each teacher step
// leaves its tokens' P̄ in shared memory (float32), and once per 64 tokens a student step runs
// U = IQ Kiᵀ, du = R - P̄ (written to shared memory in the index dtype) and both products,
// d index_q = du Ki and d index_k = duᵀ IQ, with every matrix row a token (at G = 16 the
// per-step student MMAs of the lead-row layout used one row in 16).
// Roles as in the backward (attention_bwd_sm90.cuh): warpgroup 0 gathers q and index_q rows by
// cp.async (warp w < kStages fills steps w, w + kStages, ...; lane 0 of warp 0 issues the
// TMA); warpgroups 1 and 2 each own one 64-key half of the tile and take every step.
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
// Floats per token row of the gradient pass's P̄ (a half's 64 keys): the padding spreads the
// 8 rows a warp reads at once over the banks.
constexpr int kPbarStride = kHalf + 8;
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
  // the compute side fits 216 (ptxas -v, nvcc 13.0). The gradient pass's gatherer also holds
  // its batch tokens; its compute side fits 208.
  static constexpr uint32_t kLoadRegisters = kGrad ? 88 : 72;
  static constexpr uint32_t kComputeRegisters = kGrad ? 208 : 216;
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
    // Gradient pass: each half's P̄ of the batch's tokens, float32 [half][token][key].
    array_aligned<float, kGrad ? 2 * kRows * kPbarStride : 4, 16> pbar;
    RowInfo info[kStages][kRows];  // the stage's rows (written by its gathering warp)
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

// The value and student passes.
template <class Cfg>
__global__ void __launch_bounds__(kThreads, 1) kl_kernel(const __grid_constant__ KernelArgs<Cfg> args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static_assert(!Cfg::kGrad, "the gradient pass is kl_grad_kernel");
  using Element = typename Cfg::Element;
  using IndexElement = typename Cfg::IndexElement;
  constexpr int kD = Cfg::kD;
  constexpr int kDi = Cfg::kDi;
  extern __shared__ __align__(1024) char smem_raw[];
  auto& smem = *reinterpret_cast<typename Cfg::SharedStorage*>(smem_raw);
  const KLParams& p = args.p;

  WorkItem w;
  if (!load_work_item(p, w)) return;
  const int g = w.g, b = w.b, start = w.start, count = w.count, tile = w.tile;
  const int group = w.group;
  const int slots = Cfg::kStudent ? 1 : row_slots(group);  // the student's rows: one per token
  const int tokens = kRows / slots;
  const int n_steps = (count + tokens - 1) / tokens;

  const int warp_group = threadIdx.x / 128;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  // index_q rows that are no token's lead row stay zero for the whole item (U reads them).
  kl_prologue<Cfg>(smem, group, slots, /*zero_iq=*/true);

  Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Cfg::SmemLayoutQ{});
  Tensor sIQ = make_tensor(make_smem_ptr(smem.iq.data()), typename Cfg::SmemLayoutIQ{});
  if (warp_group == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Cfg::kLoadRegisters>();
    if (warp == 0 && lane == 0) load_tile(args, smem, tile, g, b);
    if (warp >= kStages) return;
    const Element* q = static_cast<const Element*>(p.q) + int64_t(b) * p.q_len * p.num_q_heads * kD;
    const IndexElement* iq =
        static_cast<const IndexElement*>(p.index_q) + int64_t(b) * p.q_len * p.num_kv_heads * kDi;
    // Step c (c % kStages == warp): lane l finds the source rows of matrix rows l and l + 32
    // (q, and index_q of the row's token into its lead row); dead rows are zero-filled.
    for (int c = warp; c < n_steps; c += kStages) {
      const int s = c % kStages;
      int src_q[2], src_iq[2];
      RowInfo info[2];
      CUTE_UNROLL
      for (int h = 0; h < 2; ++h) {
        const int r = lane + 32 * h;
        src_q[h] = step_row<Cfg::kStudent>(p, b, g, start, count, group, slots, c, r, info[h]);
        // The index_q of rows other than a token's lead row stays zero.
        src_iq[h] = r % slots != 0 ? -2 : info[h].query < 0 ? -1 : (p.q_base + info[h].query) * p.num_kv_heads + g;
      }
      cutlass::arch::ClusterBarrier::wait(&smem.empty[s], ((c / kStages) & 1) ^ 1);
      smem.info[s][lane] = info[0];
      smem.info[s][lane + 32] = info[1];
      if constexpr (!Cfg::kStudent) gather_rows<Cfg::kChunks>(sQ(_, _, s), q, kD, src_q, lane);
      gather_rows<Cfg::kIChunks>(sIQ(_, _, s), iq, kDi, src_iq, lane);
      cute::cp_async_fence();
      cute::cp_async_wait<0>();
      // The gather and the zero fill are visible to wgmma (the async proxy) after a proxy fence.
      cutlass::arch::fence_view_async_shared();
      cutlass::arch::ClusterBarrier::arrive(&smem.full[s]);
    }
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<Cfg::kComputeRegisters>();
  const int half = warp_group - 1;  // this warpgroup's keys: tile + 64 * half + [0, 64)
  const int thread = threadIdx.x % 128;
  const int key0 = tile + kHalf * half;
  typename Cfg::MmaS mma_s;
  typename Cfg::MmaU mma_u;
  auto fragments = teacher_student_fragments<Cfg>(smem, half, thread);
  auto& tSrQ = get<0>(fragments);
  auto& tSrK = get<1>(fragments);
  auto& tUrIQ = get<2>(fragments);
  auto& tUrIK = get<3>(fragments);
  auto& cs = get<4>(fragments);

  const float scale_log2 = p.softmax_scale * float(M_LOG2E);
  const float iscale = p.index_softmax_scale;
  const float inv_group = 1.0f / float(group);
  const int my_row[2] = {get<0>(cs(0, 0)), get<0>(cs(1, 0))};  // of every step

  // One token's value partials (max u, sum exp(u - max), then the teacher terms, 0 in the
  // student pass) over the visible keys among this lane's n, combined over the kSpan lanes
  // sharing the token.
  auto token_partials = [&](auto n, auto span, const float* u, const float* pm, const bool* ok) {
    constexpr int kN = decltype(n)::value;
    constexpr int kSpan = decltype(span)::value;
    float m = -INFINITY;
    CUTE_UNROLL
    for (int j = 0; j < kN; ++j) {
      if (ok[j]) m = fmaxf(m, u[j]);
    }
    m = span_max<kSpan>(m);
    float l = 0.0f;
    float2 terms = make_float2(0.0f, 0.0f);
    if (m > -INFINITY) {
      CUTE_UNROLL
      for (int j = 0; j < kN; ++j) {
        if (ok[j]) l += exp2f((u[j] - m) * float(M_LOG2E));
      }
      if constexpr (!Cfg::kStudent) terms = teacher_terms<kN>(u, pm, ok);
    }
    if constexpr (Cfg::kStudent) return make_float4(m, span_sum<kSpan>(l), 0.0f, 0.0f);
    return make_float4(m, span_sum<kSpan>(l), span_sum<kSpan>(terms.x), span_sum<kSpan>(terms.y));
  };
  auto partial_at = [&](int64_t part_row) {
    return reinterpret_cast<float4*>(p.partial) + ((int64_t(b) * p.num_entries + part_row) * p.num_kv_heads + g) * 2 + half;
  };
  // The token work of one step with `slots` = kSlots rows per token (a compile-time power of two):
  // each token's P summed over its heads and its u, reduce-scattered over the token's lanes,
  // then the value partials for the keys each lane keeps.
  auto token_step = [&](auto slots_c, auto& ps, auto& us, const RowMeta (&cur)[2]) {
    constexpr int kSlots = decltype(slots_c)::value;
    constexpr int kCols = decltype(size<1>(ps))::value;   // a row's keys in this thread: 16
    constexpr int kLevels = kSlots >= 8 ? 3 : kSlots == 4 ? 2 : kSlots == 2 ? 1 : 0;
    constexpr int kOwn = kCols >> kLevels;                // keys per lane per token afterwards
    constexpr int kSpan = kSlots >= 8 ? 32 : 4 * kSlots;  // lanes sharing a token
    constexpr int kTokens = kSlots == 16 ? 1 : 2;         // tokens among this thread's two rows
    CUTE_UNROLL
    for (int t = 0; t < kTokens; ++t) {
      float pv[kCols], uv[kCols];
      CUTE_UNROLL
      for (int j = 0; j < kCols; ++j) {
        pv[j] = Cfg::kStudent ? 0.0f : kSlots == 16 ? ps(0, j) + ps(1, j) : ps(t, j);
        uv[j] = kSlots == 16 ? us(0, j) + us(1, j) : us(t, j);
      }
      const int base = reduce_scatter<kLevels, kCols>(lane, pv, uv);
      const RowMeta& tm = cur[t];  // any row of the token: they share its entry
      float u[kOwn], pm[kOwn];
      bool ok[kOwn];
      CUTE_UNROLL
      for (int k = 0; k < kOwn; ++k) {
        u[k] = uv[k] * iscale;
        pm[k] = pv[k] * inv_group;
        ok[k] = get<1>(cs(0, base + k)) < tm.visible;
      }
      const float4 part = token_partials(Int<kOwn>{}, Int<kSpan>{}, u, pm, ok);
      if (tm.part_row >= 0 && lane % kSpan == 0) *partial_at(tm.part_row) = part;
    }
  };

  cutlass::arch::ClusterTransactionBarrier::wait(&smem.tile_full, 0);
  for (int c = 0; c < n_steps; ++c) {
    const int s = c % kStages;
    cutlass::arch::ClusterBarrier::wait(&smem.full[s], (c / kStages) & 1);
    const RowMeta cur[2] = {row_meta(smem.info[s][my_row[0]], key0), row_meta(smem.info[s][my_row[1]], key0)};

    Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<kRows>, Int<kHalf>>{});
    Tensor acc_u = partition_fragment_C(mma_u, Shape<Int<kRows>, Int<kHalf>>{});
    warpgroup_fence_operand(acc_s);
    warpgroup_fence_operand(acc_u);
    warpgroup_arrive();
    if constexpr (!Cfg::kStudent) gemm_overwrite(mma_s, tSrQ(_, _, _, s), tSrK, acc_s);
    gemm_overwrite(mma_u, tUrIQ(_, _, _, s), tUrIK, acc_u);
    warpgroup_commit_batch();
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_s);
    warpgroup_fence_operand(acc_u);
    cutlass::arch::ClusterBarrier::arrive(&smem.empty[s]);  // its rows' info is in cur

    Tensor ps = make_tensor(acc_s.data(), sm90::acc_rows_by_cols(acc_s.layout()));
    Tensor us = make_tensor(acc_u.data(), sm90::acc_rows_by_cols(acc_u.layout()));
    if constexpr (Cfg::kStudent) {
      token_step(_1{}, ps, us, cur);
    } else {
      teacher_probabilities(ps, cs, cur, scale_log2);
      switch (slots) {
        case 1: token_step(_1{}, ps, us, cur); break;
        case 2: token_step(_2{}, ps, us, cur); break;
        case 4: token_step(_4{}, ps, us, cur); break;
        case 8: token_step(_8{}, ps, us, cur); break;
        default: token_step(_16{}, ps, us, cur); break;
      }
    }
  }
#endif
}

// The gradient pass. Teacher steps as in kl_kernel, but the student side waits for 64 tokens:
// step c's tokens are rows (c % G') * 64 / G' + t of index_q batch (c / G') % 2, and their P̄
// rows the same rows of `pbar`; after a batch's last step (or the item's) a student step runs
// over all 64 rows.
template <class Cfg>
__global__ void __launch_bounds__(kThreads, 1) kl_grad_kernel(const __grid_constant__ KernelArgs<Cfg> args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static_assert(Cfg::kGrad, "the value and student passes are kl_kernel");
  using Element = typename Cfg::Element;
  using IndexElement = typename Cfg::IndexElement;
  constexpr int kD = Cfg::kD;
  constexpr int kDi = Cfg::kDi;
  extern __shared__ __align__(1024) char smem_raw[];
  auto& smem = *reinterpret_cast<typename Cfg::SharedStorage*>(smem_raw);
  const KLParams& p = args.p;

  WorkItem w;
  if (!load_work_item(p, w)) return;
  const int g = w.g, b = w.b, start = w.start, count = w.count, tile = w.tile;
  const int group = w.group;
  const int slots = row_slots(group);
  const int tokens = kRows / slots;  // per teacher step; a batch is `slots` steps
  const int n_steps = (count + tokens - 1) / tokens;

  const int warp_group = threadIdx.x / 128;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  // Every batch row is written before its student step reads it (unused rows of the item's
  // last batch zero-filled): the index_q buffers need no zeroing.
  kl_prologue<Cfg>(smem, group, slots, /*zero_iq=*/false);

  Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Cfg::SmemLayoutQ{});
  Tensor sIQ = make_tensor(make_smem_ptr(smem.iq.data()), typename Cfg::SmemLayoutIQ{});
  if (warp_group == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Cfg::kLoadRegisters>();
    if (warp == 0 && lane == 0) load_tile(args, smem, tile, g, b);
    if (warp >= kStages) return;
    const Element* q = static_cast<const Element*>(p.q) + int64_t(b) * p.q_len * p.num_q_heads * kD;
    const IndexElement* iq =
        static_cast<const IndexElement*>(p.index_q) + int64_t(b) * p.q_len * p.num_kv_heads * kDi;
    for (int c = warp; c < n_steps; c += kStages) {
      const int s = c % kStages;
      const int batch = c / slots, buf = batch % kBatchBuffers;
      const int row0 = (c % slots) * tokens;  // this step's tokens in the batch
      int src_q[2], src_iq[2];
      RowInfo info[2];
      TokenInfo token[2];
      CUTE_UNROLL
      for (int h = 0; h < 2; ++h) {
        const int r = lane + 32 * h;
        src_q[h] = step_row<false>(p, b, g, start, count, group, slots, c, r, info[h]);
        // Batch row r: token r - row0 of this step; past the item's last step's tokens, an
        // unused row (zero-filled: duᵀ IQ multiplies it by du = 0, and uninitialised or stale
        // bits could be non-finite); else another step's.
        const int t = r - row0;
        token[h] = TokenInfo{0.0f, -1, -1, -1};
        src_iq[h] = t >= tokens && c == n_steps - 1 ? -1 : -2;
        if (t >= 0 && t < tokens) {
          const RowEntry e = kl_row_entry(p, b, g, start, count, group, slots, c, t * slots);
          src_iq[h] = e.query < 0 ? -1 : (p.q_base + e.query) * p.num_kv_heads + g;
          if (e.query >= 0) {
            token[h] = TokenInfo{p.ilse[int64_t(b) * p.q_len * p.num_kv_heads + src_iq[h]], row_last_visible(p, b, e),
                                 e.query, e.query * p.top_k + e.slot};
          }
        }
      }
      cutlass::arch::ClusterBarrier::wait(&smem.empty[s], ((c / kStages) & 1) ^ 1);
      if (batch >= kBatchBuffers) {  // the buffer's last batch is read
        const int last = batch - kBatchBuffers;
        cutlass::arch::ClusterBarrier::wait(&smem.batch_empty[last % kStages], (last / kStages) & 1);
      }
      // The teacher's rows need only these two (the token's other fields are in `tokens`).
      CUTE_UNROLL
      for (int h = 0; h < 2; ++h) {
        smem.info[s][lane + 32 * h].lse_log2 = info[h].lse_log2;
        smem.info[s][lane + 32 * h].last_p = info[h].last_p;
      }
      CUTE_UNROLL
      for (int h = 0; h < 2; ++h) {
        if (src_iq[h] != -2) smem.tokens[buf][lane + 32 * h] = token[h];
      }
      gather_rows<Cfg::kChunks>(sQ(_, _, s), q, kD, src_q, lane);
      gather_rows<Cfg::kIChunks>(sIQ(_, _, buf), iq, kDi, src_iq, lane);
      cute::cp_async_fence();
      cute::cp_async_wait<0>();
      cutlass::arch::fence_view_async_shared();
      cutlass::arch::ClusterBarrier::arrive(&smem.full[s]);
    }
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<Cfg::kComputeRegisters>();
  const int half = warp_group - 1;  // this warpgroup's keys: tile + 64 * half + [0, 64)
  const int thread = threadIdx.x % 128;
  const int key0 = tile + kHalf * half;
  typename Cfg::MmaS mma_s;
  typename Cfg::MmaU mma_u;
  auto fragments = teacher_student_fragments<Cfg>(smem, half, thread);
  auto& tSrQ = get<0>(fragments);
  auto& tSrK = get<1>(fragments);
  auto& tUrIQ = get<2>(fragments);
  auto& tUrIK = get<3>(fragments);
  auto& cs = get<4>(fragments);

  typename Cfg::MmaDIQ mma_diq;
  typename Cfg::MmaDIK mma_dik;
  auto thr_diq = mma_diq.get_thread_slice(thread);
  auto thr_dik = mma_dik.get_thread_slice(thread);
  IndexElement* du_base = smem.du.data() + half * cosize_v<typename Cfg::SmemLayoutDUt>;
  Tensor sDUt = make_tensor(make_smem_ptr(du_base), typename Cfg::SmemLayoutDUt{});  // (keys, rows)
  Tensor sDU = make_tensor(make_smem_ptr(du_base), typename Cfg::SmemLayoutDU{});    // (rows, keys)
  Tensor sIKt = make_tensor(make_smem_ptr(smem.ik.data()), typename Cfg::SmemLayoutIKt{})(_, _, half);
  Tensor sIQt = make_tensor(make_smem_ptr(smem.iq.data()), typename Cfg::SmemLayoutIQt{});
  Tensor tDIQrDU = thr_diq.make_fragment_A(thr_diq.partition_A(sDU));    // (MMA, MMA_M, MMA_K)
  Tensor tDIQrIKt = thr_diq.make_fragment_B(thr_diq.partition_B(sIKt));  // (MMA, MMA_N, MMA_K)
  Tensor tDIKrDUt = thr_dik.make_fragment_A(thr_dik.partition_A(sDUt));  // (MMA, MMA_M, MMA_K)
  Tensor tDIKrIQt = thr_dik.make_fragment_B(thr_dik.partition_B(sIQt));  // (MMA, MMA_N, MMA_K, batch buffers)
  Tensor coord_iq = thr_diq.partition_C(make_identity_tensor(Shape<Int<kRows>, Int<kDi>>{}));
  Tensor ciq = make_tensor(coord_iq.data(), sm90::acc_rows_by_cols(coord_iq.layout()));
  Tensor coord_ik = thr_dik.partition_C(make_identity_tensor(Shape<Int<kHalf>, Int<kDi>>{}));
  Tensor cik = make_tensor(coord_ik.data(), sm90::acc_rows_by_cols(coord_ik.layout()));
  Tensor acc_dik = partition_fragment_C(mma_dik, Shape<Int<kHalf>, Int<kDi>>{});
  clear(acc_dik);
  mma_dik.accumulate_ = GMMA::ScaleOut::One;

  const float scale_log2 = p.softmax_scale * float(M_LOG2E);
  const float iscale = p.index_softmax_scale;
  const float inv_group = 1.0f / float(group);
  const int my_row[2] = {get<0>(cs(0, 0)), get<0>(cs(1, 0))};  // of every step and batch
  const cutlass::arch::NamedBarrier warpgroup_sync(128, half);  // this warpgroup only
  float* pbar = smem.pbar.data() + half * kRows * kPbarStride;   // this half's [token][key]

  // A row of a token's d index_q and value terms: a slot partial (deterministic) or the
  // token's own row.
  auto token_out_row = [&](int query, int part_row) {
    return p.deterministic ? (int64_t(b) * p.num_entries + part_row) * p.num_kv_heads + g
                           : (int64_t(b) * p.q_len + p.q_base + query) * p.num_kv_heads + g;
  };
  // A teacher step's tokens' P̄ (kSlots = G' rows a token, a compile-time power of two): each
  // token's P summed over its heads, reduce-scattered over its lanes, / G, to its batch row.
  auto teacher_means = [&](auto slots_c, auto& ps, int row0) {
    constexpr int kSlots = decltype(slots_c)::value;
    constexpr int kCols = decltype(size<1>(ps))::value;  // a row's keys in this thread: 16
    constexpr int kLevels = kSlots >= 8 ? 3 : kSlots == 4 ? 2 : kSlots == 2 ? 1 : 0;
    constexpr int kOwn = kCols >> kLevels;               // keys per lane per token afterwards
    constexpr int kTokens = kSlots == 16 ? 1 : 2;        // tokens among this thread's two rows
    CUTE_UNROLL
    for (int t = 0; t < kTokens; ++t) {
      float pv[kCols];
      CUTE_UNROLL
      for (int j = 0; j < kCols; ++j) pv[j] = kSlots == 16 ? ps(0, j) + ps(1, j) : ps(t, j);
      const int base = reduce_scatter<kLevels, kCols>(lane, pv);
      float* row = pbar + (row0 + my_row[t] / kSlots) * kPbarStride;
      CUTE_UNROLL
      for (int k = 0; k < kOwn; ++k) row[get<1>(cs(0, base + k))] = pv[k] * inv_group;
    }
  };
  // The student step of batch `batch` (in buffer batch % kBatchBuffers), every row a token:
  // U = IQ Kiᵀ, du = R - P̄ and the value terms, then d index_k += duᵀ IQ and this half's
  // d index_q share = du Ki.
  auto student_step = [&](int batch) {
    const int buf = batch % kBatchBuffers;
    // Every warp's P̄ of the batch is written, and every warp is past the last batch's
    // products (which read du).
    warpgroup_sync.arrive_and_wait();
    Tensor acc_u = partition_fragment_C(mma_u, Shape<Int<kRows>, Int<kHalf>>{});
    warpgroup_fence_operand(acc_u);
    warpgroup_arrive();
    gemm_overwrite(mma_u, tUrIQ(_, _, _, buf), tUrIK, acc_u);
    warpgroup_commit_batch();
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_u);
    Tensor us = make_tensor(acc_u.data(), sm90::acc_rows_by_cols(acc_u.layout()));
    constexpr int kCols = decltype(size<1>(us))::value;  // a row's keys in this thread: 16
    TokenInfo token[2];
    CUTE_UNROLL
    for (int i = 0; i < 2; ++i) {
      token[i] = smem.tokens[buf][my_row[i]];
      const int visible = min(max(token[i].last - key0 + 1, 0), kHalf);
      const float* prow = pbar + my_row[i] * kPbarStride;
      float u[kCols], pm[kCols];
      bool ok[kCols];
      CUTE_UNROLL
      for (int j = 0; j < kCols; ++j) {
        const int key = get<1>(cs(i, j));
        ok[j] = key < visible;
        u[j] = us(i, j) * iscale;
        pm[j] = ok[j] ? prow[key] : 0.0f;
        const float du = ok[j] ? exp2f((u[j] - token[i].ilse) * float(M_LOG2E)) - pm[j] : 0.0f;
        sDU(my_row[i], key) = IndexElement(du);
      }
      // The token's value terms over this half: one add per (token, half), from its quad.
      const float2 terms = teacher_terms<kCols>(u, pm, ok);
      const float a = span_sum<4>(terms.x), psum = span_sum<4>(terms.y);
      if (token[i].part_row >= 0 && lane % 4 == 0) {
        add_pair(p.value_terms + 2 * token_out_row(token[i].query, token[i].part_row), a, psum);
      }
    }
    // du is complete and visible to wgmma.
    cutlass::arch::fence_view_async_shared();
    warpgroup_sync.arrive_and_wait();
    Tensor acc_diq = partition_fragment_C(mma_diq, Shape<Int<kRows>, Int<kDi>>{});
    warpgroup_fence_operand(acc_diq);
    warpgroup_fence_operand(acc_dik);
    warpgroup_arrive();
    CUTE_UNROLL
    for (int kb = 0; kb < size<2>(tDIKrDUt); ++kb) {
      cute::gemm(mma_dik, tDIKrDUt(_, _, kb), tDIKrIQt(_, _, kb, buf), acc_dik);
    }
    gemm_overwrite(mma_diq, tDIQrDU, tDIQrIKt, acc_diq);
    warpgroup_commit_batch();
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_diq);
    warpgroup_fence_operand(acc_dik);
    cutlass::arch::ClusterBarrier::arrive(&smem.batch_empty[batch % kStages]);  // index_q and the rows' info are read

    // This half's share of each token's d index_q, scaled, added to its row.
    Tensor diq = make_tensor(acc_diq.data(), sm90::acc_rows_by_cols(acc_diq.layout()));  // (2, Di/4)
    CUTE_UNROLL
    for (int i = 0; i < 2; ++i) {
      if (token[i].query < 0) continue;
      float* out = p.d_index_q + token_out_row(token[i].query, token[i].part_row) * kDi;
      CUTE_UNROLL
      for (int j = 0; j < size<1>(diq); j += 2) {
        add_pair(out + get<1>(ciq(i, j)), iscale * diq(i, j), iscale * diq(i, j + 1));
      }
    }
  };

  // Step c's S = Q Kᵀ (stage c % kStages, once gathered) issued into acc and committed.
  auto issue_s = [&](int c, auto& acc) {
    cutlass::arch::ClusterBarrier::wait(&smem.full[c % kStages], (c / kStages) & 1);
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    gemm_overwrite(mma_s, tSrQ(_, _, _, c % kStages), tSrK, acc);
    warpgroup_commit_batch();
  };
  // Teacher step c on acc (S complete), in the batch that ends before step c_end: step c + 1's
  // S is issued into acc_next first and waited for at the end, so the tensor cores run it under
  // this step's exp and reduce-scatter while no wgmma is in flight across a loop edge (ptxas
  // serialised every wgmma (C7514) when one was). `which` only makes the two calls below
  // distinct instantiations, each inlined once (one instantiation called twice was compiled
  // as a call with the accumulators on the stack).
  auto step = [&](int c, auto which, auto& acc, auto& acc_next, int c_end) {
    const int s = c % kStages;
    const RowMeta cur[2] = {row_meta(smem.info[s][my_row[0]], key0), row_meta(smem.info[s][my_row[1]], key0)};
    if (c + 1 < c_end) issue_s(c + 1, acc_next);
    cutlass::arch::ClusterBarrier::arrive(&smem.empty[s]);  // q is read; its rows' info is in cur
    // P in registers of its own: writing it over S (the accumulator) while the next wgmma is
    // in flight serialised every wgmma (ptxas C7515).
    Tensor ps = make_tensor_like(make_tensor(acc.data(), sm90::acc_rows_by_cols(acc.layout())));
    copy(make_tensor(acc.data(), sm90::acc_rows_by_cols(acc.layout())), ps);
    teacher_probabilities(ps, cs, cur, scale_log2);
    const int row0 = (c % slots) * tokens;
    switch (slots) {
      case 1: teacher_means(_1{}, ps, row0); break;
      case 2: teacher_means(_2{}, ps, row0); break;
      case 4: teacher_means(_4{}, ps, row0); break;
      case 8: teacher_means(_8{}, ps, row0); break;
      default: teacher_means(_16{}, ps, row0); break;
    }
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_next);
  };

  cutlass::arch::ClusterTransactionBarrier::wait(&smem.tile_full, 0);
  for (int c0 = 0; c0 < n_steps; c0 += slots) {
    const int c_end = min(c0 + slots, n_steps);
    {
      // Two S accumulators take turns within the batch (its steps unrolled by two so that each
      // is a fixed set of registers); scoped to it, so that they are not live across the
      // student step (which then spilled).
      Tensor acc_a = partition_fragment_C(mma_s, Shape<Int<kRows>, Int<kHalf>>{});
      Tensor acc_b = partition_fragment_C(mma_s, Shape<Int<kRows>, Int<kHalf>>{});
      issue_s(c0, acc_a);
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_a);
      for (int c = c0; c < c_end; c += 2) {
        step(c, _0{}, acc_a, acc_b, c_end);
        if (c + 1 < c_end) step(c + 1, _1{}, acc_b, acc_a, c_end);
      }
    }
    student_step(c0 / slots);
  }

  // The item's d index_k (scaled) of this half, added to the tile's keys that exist.
  Tensor dik = make_tensor(acc_dik.data(), sm90::acc_rows_by_cols(acc_dik.layout()));  // (2, Di/4)
  CUTE_UNROLL
  for (int i = 0; i < 2; ++i) {
    const int key = key0 + get<0>(cik(i, 0));
    if (key >= p.kv_len) continue;
    float* out = p.d_index_k + ((int64_t(b) * p.kv_len + key) * p.num_kv_heads + g) * kDi;
    CUTE_UNROLL
    for (int j = 0; j < size<1>(dik); j += 2) {
      add_pair(out + get<1>(cik(i, j)), iscale * dik(i, j), iscale * dik(i, j + 1));
    }
  }
#endif
}

// The student pass reads no q or k: its kD is nominal (kl_sm90.cu instantiates it once per
// (Di, dtype)) and p.head_dim is not checked against it.
template <int kD, int kDi, class Element, KLPass kPass>
cudaError_t launch(const KLParams& p, cudaStream_t stream) {
  using Cfg = Config<kD, kDi, Element, kPass>;
  const int group = p.num_kv_heads > 0 ? p.num_q_heads / p.num_kv_heads : 0;
  // TMA and cp.async need 16-byte aligned bases; the float4 stores and float2 adds too.
  const bool outputs_ok = Cfg::kGrad ? sm90::aligned16(p.d_index_q) && sm90::aligned16(p.d_index_k) &&
                                           sm90::aligned16(p.value_terms) && p.ilse != nullptr
                                     : sm90::aligned16(p.partial);
  const bool main_ok = Cfg::kStudent || (sm90::aligned16(p.q) && sm90::aligned16(p.k) && p.head_dim == kD);
  if (!main_ok || !sm90::aligned16(p.index_q) || !sm90::aligned16(p.index_k) || !outputs_ok ||
      p.index_head_dim != kDi || p.block_size != kBlock || group < 1 || group > kMaxGroup ||
      group * p.num_kv_heads != p.num_q_heads || p.batch < 1 || p.batch > 65535 || p.num_kv_heads > 65535 ||
      p.num_items < 1 || p.top_k < 1 || p.kv_len < 1 || p.q_len < 1) {
    return cudaErrorInvalidValue;
  }
  KernelArgs<Cfg> args{p, Cfg::tma_k(p), Cfg::make_tma_ik(p.index_k, p)};
  auto* kernel = [] {
    if constexpr (Cfg::kGrad) {
      return &kl_grad_kernel<Cfg>;
    } else {
      return &kl_kernel<Cfg>;
    }
  }();
  constexpr int smem_bytes = sizeof(typename Cfg::SharedStorage);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) return err;
  dim3 grid(p.num_items, p.num_kv_heads, p.batch);
  kernel<<<grid, kThreads, smem_bytes, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace msa::kl_sm90
