// Block-sparse attention forward for SM90, KV-outer (spec, "Main branch"; design:
// shared/guide/kernels.md and msa_jax/kv_outer/worklist.py, which builds the inputs).
//
// One CTA per work item: one 128-key tile of one kv head g and up to `count` (query, slot)
// entries that selected it. K and V of the tile are loaded once (TMA); the entries are
// walked 64 matrix rows at a time: 64 / G query tokens x G heads, gathered from q by
// cp.async. Each step computes the attention of those rows over this one tile alone, so
// there is no running rescale: S = Q Kᵀ, one softmax, O = P V, and O / l (in q's dtype) and
// lse = scale * max + log l go to the row's own slot partial; combine merges a query's
// slots by log-sum-exp afterwards (msa_jax/pallas/attention_fwd.py, `combine`).
//
// Roles: warpgroup 0 gathers (warp w fills the steps w, w + 4, ...; lane 0 of warp 0 also
// issues the K/V TMA), warpgroups 1 and 2 compute alternate steps, each on its own 64-row
// stage, so one's softmax overlaps the other's matrix products.
// Stages: 8 Q buffers of 64 x D. Step c uses buffer c % 8; warp c % 4 fills it and keeps two
// steps in flight (cp.async groups), so a gather's latency is hidden behind seven others.
// Each consumer loads the row metadata of its next step while it computes the current one
// (entries at the step's start, the dependent last-visible key after its first product), and
// writes partial rows through its own staging buffer in shared memory: one bulk copy
// (cp.async.bulk, the TMA unit) per 128- or 256-byte row instead of scattered 4-byte stores.
#pragma once

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>

#include "attention_rows_sm90.cuh"
#include "msa/params.h"
#include "sm90_common.cuh"

namespace msa::attention_fwd_sm90 {

using namespace cute;
using namespace attention_sm90;
constexpr int kStages = 8;
constexpr int kLoadWarps = 4;
constexpr int kThreads = 128 * 3;
// 128 x 56 + 256 x 224 <= 168 x 384 = 64512, what the launch gives the CTA.
constexpr int kLoadRegisters = 56;
constexpr int kComputeRegisters = 224;
static_assert(sm90::register_split_fits(kThreads, kLoadRegisters, kComputeRegisters));

template <int kD_, class Element_>
struct Config {
  static constexpr int kD = kD_;
  using Element = Element_;
  static constexpr int kChunks = kD * sizeof(Element) / 16;  // 16-byte pieces of one q row
  using SmemLayoutQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                             Shape<Int<kRows>, Int<kD>, Int<kStages>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                              Shape<Int<kBlock>, Int<kD>>{}));
  // V read as the B operand of P V: (N = D, K = keys), D contiguous (MN-major).
  using SmemLayoutVt = decltype(composition(
      SmemLayoutKV{}, make_ordered_layout(Shape<Int<kD>, Int<kBlock>>{}, Step<_2, _1>{})));
  using MmaS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<Int<kRows>, Int<kBlock>, Int<kD>>,
                           GMMA::Major::K, GMMA::Major::K>()));
  using MmaO = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<Int<kRows>, Int<kD>, Int<kBlock>>,
                           GMMA::Major::K, GMMA::Major::MN>()));
  static constexpr uint32_t kKVBytes = 2 * kBlock * kD * sizeof(Element);
  static constexpr int kStageRow = kD + 8;  // elements per row of the output staging buffer

  struct SharedStorage {
    array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> q;
    array_aligned<Element, cosize_v<SmemLayoutKV>, 1024> k;
    array_aligned<Element, cosize_v<SmemLayoutKV>, 1024> v;
    // One per consumer: its step's normalised rows, row-major with 16 bytes of padding per row
    // (so a quad's 4-byte writes to 8 rows hit 32 distinct banks), copied out row by row.
    array_aligned<Element, 2 * kRows * kStageRow, 128> o;
    uint64_t full[kStages];        // mbarrier: stage gathered (1 arrival: the warp's lane 0)
    uint64_t empty[kStages];       // mbarrier: stage read (128 arrivals: the computing warpgroup)
    uint64_t kv_full;              // mbarrier: K and V landed (TMA transaction bytes)
  };

  static auto make_tma(const void* ptr, const AttentionFwdParams& p) {
    return make_tma_copy(SM90_TMA_LOAD{}, kv_tensor<kD, Element>(ptr, p), SmemLayoutKV{});
  }
  using Tma = decltype(make_tma(nullptr, AttentionFwdParams{}));
};

template <class Cfg>
struct KernelArgs {
  AttentionFwdParams p;
  typename Cfg::Tma tma_k;
  typename Cfg::Tma tma_v;
};

template <class Cfg>
__global__ void __launch_bounds__(kThreads, 1)
    attention_fwd_kernel(const __grid_constant__ KernelArgs<Cfg> args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Element = typename Cfg::Element;
  constexpr int kD = Cfg::kD;
  extern __shared__ __align__(1024) char smem_raw[];
  auto& smem = *reinterpret_cast<typename Cfg::SharedStorage*>(smem_raw);
  const AttentionFwdParams& p = args.p;

  WorkItem w;
  if (!load_work_item(p, w)) return;
  const int g = w.g, b = w.b, start = w.start, count = w.count, tile = w.tile;
  const int group = w.group, n_steps = w.n_steps;

  const int warp_group = threadIdx.x / 128;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      cutlass::arch::ClusterBarrier::init(&smem.full[s], 1);
      cutlass::arch::ClusterBarrier::init(&smem.empty[s], 128);
    }
    cutlass::arch::ClusterTransactionBarrier::init(&smem.kv_full, 1);
  }
  cutlass::arch::fence_barrier_init();
  __syncthreads();

  if (warp_group == 0) {
    cutlass::arch::warpgroup_reg_dealloc<kLoadRegisters>();
    if (warp == 0 && lane == 0) {
      cute::prefetch_tma_descriptor(args.tma_k.get_tma_descriptor());
      cute::prefetch_tma_descriptor(args.tma_v.get_tma_descriptor());
      Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Cfg::SmemLayoutKV{});
      Tensor sV = make_tensor(make_smem_ptr(smem.v.data()), typename Cfg::SmemLayoutKV{});
      auto tile_of = [&](auto const& tma) {
        Tensor m = tma.get_tma_tensor(kv_shape<kD>(p));
        return local_tile(domain_offset(make_coord(tile, 0), m(_, _, g, b)), Shape<Int<kBlock>, Int<kD>>{},
                          make_coord(0, 0));
      };
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&smem.kv_full, Cfg::kKVBytes);
      auto tk = args.tma_k.get_slice(0);
      auto tv = args.tma_v.get_slice(0);
      copy(args.tma_k.with(smem.kv_full), tk.partition_S(tile_of(args.tma_k)), tk.partition_D(sK));
      copy(args.tma_v.with(smem.kv_full), tv.partition_S(tile_of(args.tma_v)), tv.partition_D(sV));
    }
    Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Cfg::SmemLayoutQ{});
    const Element* q = static_cast<const Element*>(p.q) + int64_t(b) * p.q_len * p.num_q_heads * kD;
    // Step c of this warp: lane l finds the q offsets of rows l and l + 32, then the warp
    // gathers the step's rows (one cp.async group per step), each lane taking its 16-byte
    // pieces' row offsets from the lane that found them.
    auto issue = [&](int c) {
      const int s = c % kStages;
      int src[2];
      CUTE_UNROLL
      for (int h = 0; h < 2; ++h) {
        const RowEntry e = row_entry(p, b, g, start, count, group, c, lane + 32 * h);
        src[h] = e.query < 0 ? -1 : row_src(p, e);
      }
      cutlass::arch::ClusterBarrier::wait(&smem.empty[s], ((c / kStages) & 1) ^ 1);
      constexpr int kPieces = kRows * Cfg::kChunks / 32;  // per lane
      static_assert(32 % Cfg::kChunks == 0, "one gather instruction covers whole rows");
      CUTE_UNROLL
      for (int k = 0; k < kPieces; ++k) {
        const int i = k * 32 + lane;
        const int r = i / Cfg::kChunks;
        const int col = (i % Cfg::kChunks) * (16 / sizeof(Element));
        // All rows of piece k lie in the same half (compile-time), so every lane reads the
        // same register of its source lane.
        constexpr int kRowsPerPiece = 32 / Cfg::kChunks;
        const int row = __shfl_sync(0xffffffff, src[(k * kRowsPerPiece) / 32], r % 32);
        // A dead row keeps whatever the buffer held: its rows of S and O are never stored.
        if (row >= 0) cp_async_16(cute::cast_smem_ptr_to_uint(&sQ(r, col, s)), q + int64_t(row) * kD + col);
      }
      cute::cp_async_fence();
    };
    // The gather is visible to wgmma (the async proxy) after the wait and a proxy fence.
    auto publish = [&](int c) {
      cutlass::arch::fence_view_async_shared();
      __syncwarp();
      if (lane == 0) cutlass::arch::ClusterBarrier::arrive(&smem.full[c % kStages]);
    };
    int pending = -1;
    for (int c = warp; c < n_steps; c += kLoadWarps) {
      issue(c);
      if (pending >= 0) {
        cute::cp_async_wait<1>();
        publish(pending);
      }
      pending = c;
    }
    if (pending >= 0) {
      cute::cp_async_wait<0>();
      publish(pending);
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<kComputeRegisters>();
    const int consumer = warp_group - 1;
    const int thread = threadIdx.x % 128;
    typename Cfg::MmaS mma_s;
    typename Cfg::MmaO mma_o;
    auto thr_s = mma_s.get_thread_slice(thread);
    auto thr_o = mma_o.get_thread_slice(thread);
    Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Cfg::SmemLayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Cfg::SmemLayoutKV{});
    Tensor sVt = make_tensor(make_smem_ptr(smem.v.data()), typename Cfg::SmemLayoutVt{});
    Tensor tSrQ = thr_s.make_fragment_A(thr_s.partition_A(sQ));   // (MMA, MMA_M, MMA_K, stages)
    Tensor tSrK = thr_s.make_fragment_B(thr_s.partition_B(sK));   // (MMA, MMA_N, MMA_K)
    Tensor tOrV = thr_o.make_fragment_B(thr_o.partition_B(sVt));  // (MMA, MMA_N, MMA_K)
    Tensor coord_s = thr_s.partition_C(make_identity_tensor(Shape<Int<kRows>, Int<kBlock>>{}));
    Tensor cs = make_tensor(coord_s.data(), sm90::acc_rows_by_cols(coord_s.layout()));
    Tensor coord_o = thr_o.partition_C(make_identity_tensor(Shape<Int<kRows>, Int<kD>>{}));
    Tensor co = make_tensor(coord_o.data(), sm90::acc_rows_by_cols(coord_o.layout()));
    const float scale_log2 = p.softmax_scale * float(M_LOG2E);
    Element* out = static_cast<Element*>(p.out_partial) + int64_t(b) * p.num_out_rows * kD;
    float* lse_out = p.lse_partial + int64_t(b) * p.num_out_rows;

    // This thread's two rows of every step (rows lane / 4 and lane / 4 + 8 of its warp's 16)
    // and their metadata, one step ahead: step c's entries and last visible keys are loaded
    // during this consumer's previous step c - 2.
    const int my_row[2] = {get<0>(cs(0, 0)), get<0>(cs(1, 0))};
    int next_out[2], last[2];  // of this consumer's next step
    CUTE_UNROLL
    for (int i = 0; i < 2; ++i) {
      const RowEntry e = row_entry(p, b, g, start, count, group, consumer, my_row[i]);
      next_out[i] = row_out(p, e);
      last[i] = row_last_visible(p, b, e);
    }
    Element* stage = smem.o.data() + consumer * kRows * Cfg::kStageRow;
    const int quad_lane = lane % 4;

    cutlass::arch::ClusterTransactionBarrier::wait(&smem.kv_full, 0);
    for (int c = consumer; c < n_steps; c += 2) {
      const int s = c % kStages;
      int out_row[2], visible[2];
      RowEntry next[2];
      CUTE_UNROLL
      for (int i = 0; i < 2; ++i) {
        out_row[i] = next_out[i];
        visible[i] = min(max(last[i] - tile + 1, 0), kBlock);
        next[i] = row_entry(p, b, g, start, count, group, c + 2, my_row[i]);  // in flight during S = Q K^T
      }
      cutlass::arch::ClusterBarrier::wait(&smem.full[s], (c / kStages) & 1);
      Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<kRows>, Int<kBlock>>{});
      warpgroup_fence_operand(acc_s);
      warpgroup_arrive();
      mma_s.accumulate_ = GMMA::ScaleOut::Zero;
      CUTE_UNROLL
      for (int kb = 0; kb < size<2>(tSrQ); ++kb) {
        cute::gemm(mma_s, tSrQ(_, _, kb, s), tSrK(_, _, kb), acc_s);
        mma_s.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
      Tensor sc = make_tensor(acc_s.data(), sm90::acc_rows_by_cols(acc_s.layout()));  // (2, N/4)
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_s);
      cutlass::arch::ClusterBarrier::arrive(&smem.empty[s]);  // the Q stage is read
      CUTE_UNROLL
      for (int i = 0; i < 2; ++i) {
        next_out[i] = row_out(p, next[i]);
        last[i] = row_last_visible(p, b, next[i]);  // in flight during the softmax and O = P V
      }

      // Softmax over this one tile. Keys past `visible` are masked; the worklist pairs a
      // query only with tiles starting at or before its last visible key, so visible >= 1
      // for a live row (a row with 0 gets l = 0 and writes zeros with lse -inf).
      float row_max[2], row_sum[2];
      CUTE_UNROLL
      for (int i = 0; i < 2; ++i) {
        float m = -INFINITY;
        CUTE_UNROLL
        for (int j = 0; j < size<1>(sc); ++j) {
          if (get<1>(cs(i, j)) >= visible[i]) sc(i, j) = -INFINITY;
          m = fmaxf(m, sc(i, j));
        }
        m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 1));
        m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 2));
        const float shift = m == -INFINITY ? 0.0f : m * scale_log2;
        float l = 0.0f;
        CUTE_UNROLL
        for (int j = 0; j < size<1>(sc); ++j) {
          sc(i, j) = exp2f(sc(i, j) * scale_log2 - shift);
          l += sc(i, j);
        }
        l += __shfl_xor_sync(0xffffffff, l, 1);
        l += __shfl_xor_sync(0xffffffff, l, 2);
        row_max[i] = m;
        row_sum[i] = l;
      }
      // P in q's dtype, kept in registers as the A operand of O = P V.
      Tensor p_reg = make_tensor<Element>(acc_s.layout());
      cutlass::NumericArrayConverter<Element, float, decltype(size(acc_s))::value> convert;
      *reinterpret_cast<cutlass::Array<Element, decltype(size(acc_s))::value>*>(p_reg.data()) =
          convert(*reinterpret_cast<const cutlass::Array<float, decltype(size(acc_s))::value>*>(acc_s.data()));
      static_assert(cosize(decltype(acc_s.layout()){}) == size(decltype(acc_s.layout()){}) &&
                    size<0, 0>(decltype(acc_s.layout()){}) == 2 && stride<0, 2>(decltype(acc_s.layout()){}) == 4,
                    "compact ((2, 2, N/8), 1, 1) accumulator");
      Tensor tOrP = make_tensor(p_reg.data(), sm90::AccAsAOperand<kBlock>{});
      Tensor acc_o = partition_fragment_C(mma_o, Shape<Int<kRows>, Int<kD>>{});
      warpgroup_fence_operand(tOrP);
      warpgroup_fence_operand(acc_o);
      warpgroup_arrive();
      mma_o.accumulate_ = GMMA::ScaleOut::Zero;
      CUTE_UNROLL
      for (int kb = 0; kb < size<2>(tOrP); ++kb) {
        cute::gemm(mma_o, tOrP(_, _, kb), tOrV(_, _, kb), acc_o);
        mma_o.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_o);

      // Normalised partial rows into the staging buffer (rows are warp-private), then one
      // bulk copy per live row by the quad's lane 0, which also stores the row's lse.
      Tensor oc = make_tensor(acc_o.data(), sm90::acc_rows_by_cols(acc_o.layout()));  // (2, D/4)
      if (quad_lane == 0) cute::tma_store_wait<0>();  // this lane's previous copies have read the buffer
      __syncwarp();
      CUTE_UNROLL
      for (int i = 0; i < 2; ++i) {
        const float inv = row_sum[i] > 0.0f ? 1.0f / row_sum[i] : 0.0f;
        Element* dst = stage + my_row[i] * Cfg::kStageRow;  // m64 accumulators of any N share rows
        CUTE_UNROLL
        for (int j = 0; j < size<1>(oc); j += 2) {
          cutlass::Array<Element, 2> pair;
          pair[0] = Element(oc(i, j) * inv);
          pair[1] = Element(oc(i, j + 1) * inv);
          *reinterpret_cast<cutlass::Array<Element, 2>*>(dst + get<1>(co(i, j))) = pair;
        }
      }
      cutlass::arch::fence_view_async_shared();  // the staged rows are visible to the bulk copies
      __syncwarp();
      if (quad_lane == 0) {
        CUTE_UNROLL
        for (int i = 0; i < 2; ++i) {
          if (out_row[i] < 0) continue;
          SM90_BULK_COPY_S2G::copy(stage + my_row[i] * Cfg::kStageRow, out + int64_t(out_row[i]) * kD,
                                   kD * sizeof(Element));
          lse_out[out_row[i]] = row_sum[i] > 0.0f ? row_max[i] * p.softmax_scale + logf(row_sum[i]) : -INFINITY;
        }
        cute::tma_store_arrive();
      }
    }
    // The shared memory must outlive the copies reading it.
    if (quad_lane == 0) cute::tma_store_wait<0>();
  }
#endif
}

template <int kD, class Element>
cudaError_t launch(const AttentionFwdParams& p, cudaStream_t stream) {
  using Cfg = Config<kD, Element>;
  const int group = p.num_kv_heads > 0 ? p.num_q_heads / p.num_kv_heads : 0;
  // TMA and cp.async need 16-byte aligned bases (rows are D * 2 bytes, so they stay aligned).
  if (!sm90::aligned16(p.q) || !sm90::aligned16(p.k) || !sm90::aligned16(p.v) ||
      !sm90::aligned16(p.out_partial) ||
      p.head_dim != kD || p.block_size != kBlock || group < 1 || group > kRows ||
      group * p.num_kv_heads != p.num_q_heads || p.batch < 1 || p.batch > 65535 ||
      p.num_kv_heads > 65535 || p.num_items < 1 || p.top_k < 1 || p.kv_len < 1 || p.q_len < 1) {
    return cudaErrorInvalidValue;
  }
  KernelArgs<Cfg> args{p, Cfg::make_tma(p.k, p), Cfg::make_tma(p.v, p)};
  auto* kernel = &attention_fwd_kernel<Cfg>;
  constexpr int smem_bytes = sizeof(typename Cfg::SharedStorage);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) return err;
  dim3 grid(p.num_items, p.num_kv_heads, p.batch);
  kernel<<<grid, kThreads, smem_bytes, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace msa::attention_fwd_sm90
