// Block-sparse attention backward for SM90, KV-outer (spec, "Main branch"; design:
// shared/guide/kernels.md, "Backward"), over the forward's work lists (msa_jax/kv_outer/worklist.py).
//
// One CTA per work item: one 128-key tile of kv head g and up to `count` (query, slot) entries
// that selected it, walked 64 matrix rows (64 / G query tokens x G heads) a step. K and V of
// the tile are loaded once (TMA). Each step needs the rows' q and dout (gathered by cp.async)
// and their lse and delta = rowsum(dout * out) - dlse:
//   S = Q Kᵀ, P = exp(s S - lse) (exact: lse is the row's over its whole support),
//   dP = dO Vᵀ, dS = P (dP - delta),
//   dV += Pᵀ dO, dK += s dSᵀ Q (over the item's steps, in registers),
//   dQ(row) += s dS K (this tile's share of the row's gradient, added to the output row).
//
// Roles: warpgroup 0 gathers (warp w < kStages fills the steps w, w + kStages, ...; lane 0 of
// warp 0 also issues the K/V TMA) and writes each row's lse, delta and last visible key beside
// the stage; warpgroups 1 and 2 each own one 64-key half of the tile and both take every step:
// their S, dP, dK and dV cover their half. P and dS go through shared memory (transposed, by
// stmatrix) as the A operand of dV and dK; then the rows' dQ share over the whole tile is
// computed from both halves' dS and added to the rows: one add per (row, tile) instead of one
// per half halves the atomic traffic to dQ (the adds cost 28 of this kernel's 98 ms at 128K
// before; 91 ms after). At D = 128 each warpgroup takes 64 of dQ's columns, so both do the same
// products and adds a step; at D = 64 warpgroup 1 takes all of them (a 32-column slice of K
// would start inside a 128-byte swizzle row). dK and dV accumulate in registers over the item
// (64 x D each per warpgroup) and are added to the outputs at its end.
//
// Dead rows of a step (past the item's entries) are zero-filled by the gatherer, so they add
// nothing to dK / dV (a garbage dout row times P = 0 could still be NaN).
#pragma once

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>

#include "attention_rows_sm90.cuh"
#include "msa/params.h"
#include "sm90_common.cuh"

namespace msa::attention_bwd_sm90 {

using namespace cute;
using namespace attention_sm90;

constexpr int kHalf = kBlock / 2;  // keys per computing warpgroup
constexpr int kStages = 3;         // (q, dout) buffers of 64 rows; one gathering warp each
constexpr int kThreads = 128 * 3;
// 128 x 40 + 256 x 232 <= 168 x 384 = 64512, what the launch gives the CTA.
constexpr int kLoadRegisters = 40;
constexpr int kComputeRegisters = 232;
static_assert(sm90::register_split_fits(kThreads, kLoadRegisters, kComputeRegisters));

// What the compute warpgroups need of a matrix row of a step besides its q and dout; the
// gathering warp loads it with the row's source and writes it beside the stage, so its
// latency hides behind the gathers in flight and the compute side holds no registers for it.
struct RowInfo {
  int64_t dq_row;  // where its dQ share goes; -1: dead row
  float lse_log2;  // the row's lse in log2 units
  float delta;     // rowsum(dout * out) - dlse
  int last;        // its query's last visible key (absolute); -1: dead row
};

template <int kD_, class Element_>
struct Config {
  static constexpr int kD = kD_;
  using Element = Element_;
  static constexpr int kChunks = kD * sizeof(Element) / 16;  // 16-byte pieces of one row
  // q and dout of a step: (rows, D, stage), D contiguous.
  using SmemLayoutQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                             Shape<Int<kRows>, Int<kD>, Int<kStages>>{}));
  // The same buffers as the B operand of dV = Pᵀ dO and dK = dSᵀ Q: (N = D, K = rows, stage).
  using SmemLayoutQt = decltype(composition(
      SmemLayoutQ{}, make_ordered_layout(Shape<Int<kD>, Int<kRows>, Int<kStages>>{}, Step<_2, _1, _3>{})));
  // K and V of the tile as two 64-key halves: (keys, D, half), D contiguous.
  using SmemLayoutHalf = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                                Shape<Int<kHalf>, Int<kD>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                              Shape<Int<kHalf>, Int<kD>, _2>{}));
  // K as the B operand of dQ = dS K: (N = D, K = keys, half).
  using SmemLayoutKt = decltype(composition(
      SmemLayoutKV{}, make_ordered_layout(Shape<Int<kD>, Int<kHalf>, _2>{}, Step<_2, _1, _3>{})));
  // Pᵀ or dSᵀ of one warpgroup: the A operand of dV / dK, (M = keys, K = rows), keys contiguous.
  using SmemLayoutPt = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Element>{},
                                              Shape<Int<kHalf>, Int<kRows>>{}));

  // S = Q Kᵀ and dP = dO Vᵀ over one half: m64 n64 k16, both operands from shared memory.
  using MmaS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<Int<kRows>, Int<kHalf>, Int<kD>>,
                           GMMA::Major::K, GMMA::Major::K>()));
  // Both halves' dSᵀ (the ds buffer, half outermost) read as (M = rows, K = keys, half), keys
  // contiguous: the A operand of dQ.
  using SmemLayoutDS = decltype(composition(
      tile_to_shape(GMMA::Layout_MN_SW128_Atom<Element>{}, Shape<Int<kHalf>, Int<kRows>, _2>{}),
      make_ordered_layout(Shape<Int<kRows>, Int<kHalf>, _2>{}, Step<_2, _1, _3>{})));
  // dQ share = dS K over one half's keys (called for both halves): dS and K (read MN-major)
  // from shared memory, kDQCols of dQ's columns per warpgroup that computes it.
  static constexpr bool kSplitDQ = kD % 128 == 0;
  static constexpr int kDQCols = kSplitDQ ? kD / 2 : kD;
  using MmaDQ = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<Int<kRows>, Int<kDQCols>, Int<kHalf>>,
                           GMMA::Major::K, GMMA::Major::MN>()));
  // dV += Pᵀ dO and dK += dSᵀ Q: M = the half's keys, N = D, K = the step's rows.
  using MmaDKV = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<Int<kHalf>, Int<kD>, Int<kRows>>,
                           GMMA::Major::MN, GMMA::Major::MN>()));
  static_assert(cosize_v<SmemLayoutDS> == 2 * cosize_v<SmemLayoutPt>, "the two halves' dSᵀ lie back to back");
  static constexpr uint32_t kKVBytes = 2 * kBlock * kD * sizeof(Element);

  struct SharedStorage {
    array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> q;
    array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> dout;
    array_aligned<Element, cosize_v<SmemLayoutKV>, 1024> k;
    array_aligned<Element, cosize_v<SmemLayoutKV>, 1024> v;
    array_aligned<Element, 2 * cosize_v<SmemLayoutPt>, 1024> p;   // one Pᵀ per warpgroup
    array_aligned<Element, 2 * cosize_v<SmemLayoutPt>, 1024> ds;  // one dSᵀ per warpgroup
    RowInfo info[kStages][kRows];  // the stage's rows (written by its gathering warp)
    // mbarrier: stage gathered (32 arrivals: every lane of the gathering warp arrives after its
    // own writes, so each write is ordered before the readers' wait)
    uint64_t full[kStages];
    uint64_t empty[kStages];  // mbarrier: stage read (256 arrivals: both computing warpgroups)
    uint64_t kv_full;         // mbarrier: K and V landed (TMA transaction bytes)
  };

  static auto make_tma(const void* ptr, const AttentionBwdParams& p) {
    return make_tma_copy(SM90_TMA_LOAD{}, kv_tensor<kD, Element>(ptr, p), SmemLayoutHalf{});
  }
  using Tma = decltype(make_tma(nullptr, AttentionBwdParams{}));
};

template <class Cfg>
struct KernelArgs {
  AttentionBwdParams p;
  typename Cfg::Tma tma_k;
  typename Cfg::Tma tma_v;
};

// Gradient adds go through add_pair (attention_rows_sm90.cuh). In the deterministic mode an
// output element receives at most one add in a launch (a dq slot row: its one tile; dk, dv:
// the one item of its tile), so repeated calls give identical bits.

template <class Cfg>
__global__ void __launch_bounds__(kThreads, 1)
    attention_bwd_kernel(const __grid_constant__ KernelArgs<Cfg> args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Element = typename Cfg::Element;
  constexpr int kD = Cfg::kD;
  extern __shared__ __align__(1024) char smem_raw[];
  auto& smem = *reinterpret_cast<typename Cfg::SharedStorage*>(smem_raw);
  const AttentionBwdParams& p = args.p;

  WorkItem w;
  if (!load_work_item(p, w)) return;
  const int g = w.g, b = w.b, start = w.start, count = w.count, tile = w.tile;
  const int group = w.group, n_steps = w.n_steps;

  const int warp_group = threadIdx.x / 128;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      cutlass::arch::ClusterBarrier::init(&smem.full[s], 32);
      cutlass::arch::ClusterBarrier::init(&smem.empty[s], 256);
    }
    cutlass::arch::ClusterTransactionBarrier::init(&smem.kv_full, 1);
  }
  cutlass::arch::fence_barrier_init();
  __syncthreads();

  Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Cfg::SmemLayoutQ{});
  Tensor sDO = make_tensor(make_smem_ptr(smem.dout.data()), typename Cfg::SmemLayoutQ{});
  if (warp_group == 0) {
    cutlass::arch::warpgroup_reg_dealloc<kLoadRegisters>();
    if (warp == 0 && lane == 0) {
      cute::prefetch_tma_descriptor(args.tma_k.get_tma_descriptor());
      cute::prefetch_tma_descriptor(args.tma_v.get_tma_descriptor());
      Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Cfg::SmemLayoutKV{});
      Tensor sV = make_tensor(make_smem_ptr(smem.v.data()), typename Cfg::SmemLayoutKV{});
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&smem.kv_full, Cfg::kKVBytes);
      CUTE_UNROLL
      for (int h = 0; h < 2; ++h) {
        auto half_of = [&](auto const& tma) {
          Tensor m = tma.get_tma_tensor(kv_shape<kD>(p));
          return local_tile(domain_offset(make_coord(tile, 0), m(_, _, g, b)), Shape<Int<kHalf>, Int<kD>>{},
                            make_coord(h, 0));
        };
        auto tk = args.tma_k.get_slice(0);
        auto tv = args.tma_v.get_slice(0);
        copy(args.tma_k.with(smem.kv_full), tk.partition_S(half_of(args.tma_k)), tk.partition_D(sK(_, _, h)));
        copy(args.tma_v.with(smem.kv_full), tv.partition_S(half_of(args.tma_v)), tv.partition_D(sV(_, _, h)));
      }
    }
    if (warp >= kStages) return;
    const int64_t batch_rows = int64_t(b) * p.q_len * p.num_q_heads;
    const Element* q = static_cast<const Element*>(p.q) + batch_rows * kD;
    const Element* dout = static_cast<const Element*>(p.dout) + batch_rows * kD;
    // Step c (c % kStages == warp): lane l finds the source rows of matrix rows l and l + 32
    // and their RowInfo, then the warp gathers q and dout of the step, each lane taking its
    // 16-byte pieces' rows from the lane that found them; dead rows are zero-filled.
    for (int c = warp; c < n_steps; c += kStages) {
      const int s = c % kStages;
      int src[2];
      RowInfo info[2];
      CUTE_UNROLL
      for (int h = 0; h < 2; ++h) {
        const RowEntry e = row_entry(p, b, g, start, count, group, c, lane + 32 * h);
        const bool live = e.query >= 0;
        src[h] = live ? row_src(p, e) : -1;
        info[h].dq_row = !live ? -1
                         : p.deterministic ? int64_t(b) * p.num_out_rows + row_out(p, e)
                                           : batch_rows + src[h];
        info[h].lse_log2 = live ? p.lse[batch_rows + src[h]] * float(M_LOG2E) : 0.0f;
        info[h].delta = live ? p.delta[batch_rows + src[h]] : 0.0f;
        info[h].last = row_last_visible(p, b, e);
      }
      cutlass::arch::ClusterBarrier::wait(&smem.empty[s], ((c / kStages) & 1) ^ 1);
      smem.info[s][lane] = info[0];
      smem.info[s][lane + 32] = info[1];
      constexpr int kPieces = kRows * Cfg::kChunks / 32;  // per lane
      static_assert(32 % Cfg::kChunks == 0, "one gather instruction covers whole rows");
      CUTE_UNROLL
      for (int k = 0; k < kPieces; ++k) {
        const int i = k * 32 + lane;
        const int r = i / Cfg::kChunks;
        const int col = (i % Cfg::kChunks) * (16 / sizeof(Element));
        constexpr int kRowsPerPiece = 32 / Cfg::kChunks;
        const int row = __shfl_sync(0xffffffff, src[(k * kRowsPerPiece) / 32], r % 32);
        if (row >= 0) {
          cp_async_16(cute::cast_smem_ptr_to_uint(&sQ(r, col, s)), q + int64_t(row) * kD + col);
          cp_async_16(cute::cast_smem_ptr_to_uint(&sDO(r, col, s)), dout + int64_t(row) * kD + col);
        } else {
          *reinterpret_cast<uint4*>(&sQ(r, col, s)) = make_uint4(0, 0, 0, 0);
          *reinterpret_cast<uint4*>(&sDO(r, col, s)) = make_uint4(0, 0, 0, 0);
        }
      }
      cute::cp_async_fence();
      cute::cp_async_wait<0>();
      // The gather and the zero fill are visible to wgmma (the async proxy) after a proxy fence.
      cutlass::arch::fence_view_async_shared();
      cutlass::arch::ClusterBarrier::arrive(&smem.full[s]);
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<kComputeRegisters>();
    // This warpgroup's keys: tile + 64 * half + [0, 64). Broadcast from lane 0 so that ptxas
    // sees a warp-uniform value: with `warp_group - 1` it took the dQ branch below for a
    // divergent path and serialised every wgmma of the kernel (warning C7520).
    const int half = __shfl_sync(0xffffffff, warp_group, 0) - 1;
    const int thread = threadIdx.x % 128;
    const int key0 = tile + kHalf * half;
    typename Cfg::MmaS mma_s;
    typename Cfg::MmaDQ mma_dq;
    typename Cfg::MmaDKV mma_kv;
    auto thr_s = mma_s.get_thread_slice(thread);
    auto thr_dq = mma_dq.get_thread_slice(thread);
    auto thr_kv = mma_kv.get_thread_slice(thread);
    Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Cfg::SmemLayoutKV{})(_, _, half);
    Tensor sV = make_tensor(make_smem_ptr(smem.v.data()), typename Cfg::SmemLayoutKV{})(_, _, half);
    // dQ's columns this warpgroup computes: [dq_col0, dq_col0 + kDQCols) of K over both halves.
    constexpr bool kSplitDQ = Cfg::kSplitDQ;
    constexpr int kDQCols = Cfg::kDQCols;
    const bool does_dq = kSplitDQ || half == 0;
    const int dq_col0 = kSplitDQ ? half * kDQCols : 0;
    Tensor sKt = local_tile(make_tensor(make_smem_ptr(smem.k.data()), typename Cfg::SmemLayoutKt{}),
                            Shape<Int<kDQCols>, Int<kHalf>, _2>{}, make_coord(kSplitDQ ? half : 0, 0, 0));
    Tensor sQt = make_tensor(make_smem_ptr(smem.q.data()), typename Cfg::SmemLayoutQt{});
    Tensor sDOt = make_tensor(make_smem_ptr(smem.dout.data()), typename Cfg::SmemLayoutQt{});
    constexpr int kPtSize = cosize_v<typename Cfg::SmemLayoutPt>;
    Tensor sPt = make_tensor(make_smem_ptr(smem.p.data() + half * kPtSize), typename Cfg::SmemLayoutPt{});
    Tensor sDSt = make_tensor(make_smem_ptr(smem.ds.data() + half * kPtSize), typename Cfg::SmemLayoutPt{});
    // Both halves' dS as (rows, keys, half): what warpgroup 1's dQ reads.
    Tensor sDS = make_tensor(make_smem_ptr(smem.ds.data()), typename Cfg::SmemLayoutDS{});

    Tensor tSrQ = thr_s.make_fragment_A(thr_s.partition_A(sQ));     // (MMA, MMA_M, MMA_K, stages)
    Tensor tSrDO = thr_s.make_fragment_A(thr_s.partition_A(sDO));
    Tensor tSrK = thr_s.make_fragment_B(thr_s.partition_B(sK));     // (MMA, MMA_N, MMA_K)
    Tensor tSrV = thr_s.make_fragment_B(thr_s.partition_B(sV));
    Tensor tQrKt = thr_dq.make_fragment_B(thr_dq.partition_B(sKt));  // (MMA, MMA_N, MMA_K, half)
    Tensor tQrDS = thr_dq.make_fragment_A(thr_dq.partition_A(sDS));  // (MMA, MMA_M, MMA_K, half)
    Tensor tKVrPt = thr_kv.make_fragment_A(thr_kv.partition_A(sPt));  // (MMA, MMA_M, MMA_K)
    Tensor tKVrDSt = thr_kv.make_fragment_A(thr_kv.partition_A(sDSt));
    Tensor tKVrDOt = thr_kv.make_fragment_B(thr_kv.partition_B(sDOt));  // (MMA, MMA_N, MMA_K, stages)
    Tensor tKVrQt = thr_kv.make_fragment_B(thr_kv.partition_B(sQt));

    Tensor coord_s = thr_s.partition_C(make_identity_tensor(Shape<Int<kRows>, Int<kHalf>>{}));
    Tensor cs = make_tensor(coord_s.data(), sm90::acc_rows_by_cols(coord_s.layout()));  // (2, 16)
    Tensor coord_q = thr_dq.partition_C(make_identity_tensor(Shape<Int<kRows>, Int<kDQCols>>{}));
    Tensor cq = make_tensor(coord_q.data(), sm90::acc_rows_by_cols(coord_q.layout()));
    Tensor coord_kv = thr_kv.partition_C(make_identity_tensor(Shape<Int<kHalf>, Int<kD>>{}));
    Tensor ckv = make_tensor(coord_kv.data(), sm90::acc_rows_by_cols(coord_kv.layout()));

    Tensor acc_dk = partition_fragment_C(mma_kv, Shape<Int<kHalf>, Int<kD>>{});
    Tensor acc_dv = partition_fragment_C(mma_kv, Shape<Int<kHalf>, Int<kD>>{});
    clear(acc_dk);
    clear(acc_dv);
    mma_kv.accumulate_ = GMMA::ScaleOut::One;

    const float scale = p.softmax_scale;
    const float scale_log2 = scale * float(M_LOG2E);
    const int my_row[2] = {get<0>(cs(0, 0)), get<0>(cs(1, 0))};  // of every step
    const cutlass::arch::NamedBarrier compute_sync(256, 2);  // both computing warpgroups

    cutlass::arch::ClusterTransactionBarrier::wait(&smem.kv_full, 0);
    for (int c = 0; c < n_steps; ++c) {
      const int s = c % kStages;
      cutlass::arch::ClusterBarrier::wait(&smem.full[s], (c / kStages) & 1);
      // This thread's two rows: where dQ goes, their lse (log2 units), delta, visible keys.
      int64_t dq_row[2];
      float lse_log2[2], delta[2];
      int visible[2];
      CUTE_UNROLL
      for (int i = 0; i < 2; ++i) {
        const RowInfo info = smem.info[s][my_row[i]];
        dq_row[i] = info.dq_row;
        lse_log2[i] = info.lse_log2;
        delta[i] = info.delta;
        visible[i] = min(max(info.last - key0 + 1, 0), kHalf);
      }

      // S = Q Kᵀ and dP = dO Vᵀ over this half's keys.
      Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<kRows>, Int<kHalf>>{});
      Tensor acc_dp = partition_fragment_C(mma_s, Shape<Int<kRows>, Int<kHalf>>{});
      warpgroup_fence_operand(acc_s);
      warpgroup_fence_operand(acc_dp);
      warpgroup_arrive();
      mma_s.accumulate_ = GMMA::ScaleOut::Zero;
      CUTE_UNROLL
      for (int kb = 0; kb < size<2>(tSrQ); ++kb) {
        cute::gemm(mma_s, tSrQ(_, _, kb, s), tSrK(_, _, kb), acc_s);
        mma_s.accumulate_ = GMMA::ScaleOut::One;
      }
      mma_s.accumulate_ = GMMA::ScaleOut::Zero;
      CUTE_UNROLL
      for (int kb = 0; kb < size<2>(tSrDO); ++kb) {
        cute::gemm(mma_s, tSrDO(_, _, kb, s), tSrV(_, _, kb), acc_dp);
        mma_s.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_s);
      warpgroup_fence_operand(acc_dp);

      // P = exp(s S - lse) and dS = P (dP - delta) where the key is visible, else 0 (a
      // select, not a product: masked entries of S or dP may be anything).
      Tensor ps = make_tensor(acc_s.data(), sm90::acc_rows_by_cols(acc_s.layout()));
      Tensor dps = make_tensor(acc_dp.data(), sm90::acc_rows_by_cols(acc_dp.layout()));
      CUTE_UNROLL
      for (int i = 0; i < 2; ++i) {
        CUTE_UNROLL
        for (int j = 0; j < size<1>(ps); ++j) {
          const bool seen = get<1>(cs(i, j)) < visible[i];
          const float pv = seen ? exp2f(ps(i, j) * scale_log2 - lse_log2[i]) : 0.0f;
          dps(i, j) = seen ? pv * (dps(i, j) - delta[i]) : 0.0f;
          ps(i, j) = pv;
        }
      }
      // Pᵀ and dSᵀ into this warpgroup's buffers, once every warp of both warpgroups is past
      // the previous step's products that read them (the dQ products read both halves' dS).
      // A row's keys are contiguous there, so stmatrix stores them in 16-byte pieces.
      compute_sync.arrive_and_wait();
      sm90::store_acc_rows<Element>(ps, [&](int row, int key) { return &sPt(key, row); });
      sm90::store_acc_rows<Element>(dps, [&](int row, int key) { return &sDSt(key, row); });
      cutlass::arch::fence_view_async_shared();
      compute_sync.arrive_and_wait();

      Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<kRows>, Int<kDQCols>>{});
      warpgroup_fence_operand(acc_dq);
      warpgroup_fence_operand(acc_dk);
      warpgroup_fence_operand(acc_dv);
      warpgroup_arrive();
      CUTE_UNROLL
      for (int kb = 0; kb < size<2>(tKVrPt); ++kb) {
        cute::gemm(mma_kv, tKVrPt(_, _, kb), tKVrDOt(_, _, kb, s), acc_dv);
      }
      CUTE_UNROLL
      for (int kb = 0; kb < size<2>(tKVrDSt); ++kb) {
        cute::gemm(mma_kv, tKVrDSt(_, _, kb), tKVrQt(_, _, kb, s), acc_dk);
      }
      if (does_dq) {  // the rows' dQ share over the whole tile, this warpgroup's columns
        warpgroup_arrive();  // acc_dq is first written here (ptxas would insert this fence itself)
        mma_dq.accumulate_ = GMMA::ScaleOut::Zero;
        CUTE_UNROLL
        for (int h = 0; h < 2; ++h) {
          CUTE_UNROLL
          for (int kb = 0; kb < size<2>(tQrDS); ++kb) {
            cute::gemm(mma_dq, tQrDS(_, _, kb, h), tQrKt(_, _, kb, h), acc_dq);
            mma_dq.accumulate_ = GMMA::ScaleOut::One;
          }
        }
      }
      warpgroup_commit_batch();
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_dq);
      warpgroup_fence_operand(acc_dk);
      warpgroup_fence_operand(acc_dv);
      cutlass::arch::ClusterBarrier::arrive(&smem.empty[s]);  // q and dout of the stage are read

      // The tile's share of each live row's dQ, scaled, added to the row's columns computed here.
      Tensor dq = make_tensor(acc_dq.data(), sm90::acc_rows_by_cols(acc_dq.layout()));  // (2, kDQCols/4)
      CUTE_UNROLL
      for (int i = 0; i < 2; ++i) {
        if (!does_dq || dq_row[i] < 0) continue;
        float* out = p.dq + dq_row[i] * kD + dq_col0;
        CUTE_UNROLL
        for (int j = 0; j < size<1>(dq); j += 2) {
          add_pair(out + get<1>(cq(i, j)), scale * dq(i, j), scale * dq(i, j + 1));
        }
      }
    }

    // The item's dK (scaled) and dV of this half, added to the tile's keys that exist.
    Tensor dk = make_tensor(acc_dk.data(), sm90::acc_rows_by_cols(acc_dk.layout()));  // (2, D/4)
    Tensor dv = make_tensor(acc_dv.data(), sm90::acc_rows_by_cols(acc_dv.layout()));
    CUTE_UNROLL
    for (int i = 0; i < 2; ++i) {
      const int key = key0 + get<0>(ckv(i, 0));
      if (key >= p.kv_len) continue;
      const int64_t at = ((int64_t(b) * p.kv_len + key) * p.num_kv_heads + g) * kD;
      CUTE_UNROLL
      for (int j = 0; j < size<1>(dk); j += 2) {
        const int col = get<1>(ckv(i, j));
        add_pair(p.dk + at + col, scale * dk(i, j), scale * dk(i, j + 1));
        add_pair(p.dv + at + col, dv(i, j), dv(i, j + 1));
      }
    }
  }
#endif
}

template <int kD, class Element>
cudaError_t launch(const AttentionBwdParams& p, cudaStream_t stream) {
  using Cfg = Config<kD, Element>;
  const int group = p.num_kv_heads > 0 ? p.num_q_heads / p.num_kv_heads : 0;
  // TMA and cp.async need 16-byte aligned bases; the float2 adds need 8-byte aligned outputs.
  if (!sm90::aligned16(p.q) || !sm90::aligned16(p.k) || !sm90::aligned16(p.v) || !sm90::aligned16(p.dout) ||
      !sm90::aligned16(p.dq) || !sm90::aligned16(p.dk) || !sm90::aligned16(p.dv) || p.head_dim != kD ||
      p.block_size != kBlock || group < 1 || group > kRows || group * p.num_kv_heads != p.num_q_heads ||
      p.batch < 1 || p.batch > 65535 || p.num_kv_heads > 65535 || p.num_items < 1 || p.top_k < 1 ||
      p.kv_len < 1 || p.q_len < 1) {
    return cudaErrorInvalidValue;
  }
  KernelArgs<Cfg> args{p, Cfg::make_tma(p.k, p), Cfg::make_tma(p.v, p)};
  auto* kernel = &attention_bwd_kernel<Cfg>;
  constexpr int smem_bytes = sizeof(typename Cfg::SharedStorage);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) return err;
  dim3 grid(p.num_items, p.num_kv_heads, p.batch);
  kernel<<<grid, kThreads, smem_bytes, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace msa::attention_bwd_sm90
