// Fused indexer for SM90 (spec, "Index branch"; design: shared/guide/kernels.md, "Indexer").
//
// One CTA per (128 queries, group g, batch row b). It streams the candidate key blocks of
// index_k through a ring of shared-memory stages (TMA), computes S = Qi Kiᵀ on the tensor
// cores (wgmma, fp32 accumulators), max-pools each 128-key block per query row on the fly and
// keeps a running exp-free top-(top_k - 1) per row in registers. The local block is appended,
// not ranked, so only blocks j < L(i) are scored, and every such block is fully visible to
// row i: no mask. No score ever reaches device memory.
//
// Packed documents: a row's blocks are laid from its document's first key `doc`, so they need
// not line up with the key tiles. The CTA streams 128-key tiles from the smallest doc among
// its rows (T0); for a row whose doc - T0 is not a multiple of 128 a tile holds the end of
// one of its blocks (columns < (doc - T0) % 128) and the start of the next, so the row keeps
// the partial max of the open block between tiles. CTAs whose rows all line up with the
// tiles (every CTA without packed documents) pool as before.
//
// Roles (one elected thread of warpgroup 0 loads; warpgroups 1 and 2 compute, 64 rows each):
//   load:    Q tile once (its own barrier), then the CTA's key tiles (TileRange) into the ring.
//   compute: per block: S = Q Kᵀ (64 x 128 per warpgroup); row max (a row's 128 columns sit in
//            the 4 lanes of a quad: thread-local max, then two shuffles); one lane per row
//            offers si * max to its row's running top-k (a compare against the cached minimum
//            in the common case); at the end the owner lane writes the row in spec order.
#pragma once

#include <cuda_runtime_api.h>

#include <cfloat>
#include <climits>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "msa/params.h"
#include "running_topk.cuh"
#include "sm90_common.cuh"

namespace msa::indexer_sm90 {

using namespace cute;

constexpr int kBlock = 128;        // keys per block = keys per TMA tile (block_size must be 128)
constexpr int kRowsPerWarpGroup = 64;  // wgmma M
constexpr int kComputeWarpGroups = 2;
constexpr int kRows = kRowsPerWarpGroup * kComputeWarpGroups;  // queries per CTA
constexpr int kThreads = 128 * (1 + kComputeWarpGroups);
// Registers per thread after setmaxnreg: the loader needs few; 2 x 232 + 40 <= 3 x 168, what
// the launch gives the CTA per lane.
constexpr int kLoadRegisters = 40;
constexpr int kComputeRegisters = 232;
static_assert(sm90::register_split_fits(kThreads, kLoadRegisters, kComputeRegisters));

// Ring depth: about 128 KB of key tiles in flight (32 KB per stage at Di = 128).
constexpr int stages_for(int index_head_dim) { return index_head_dim == 128 ? 4 : 8; }

template <int kDi_, int kKeep_, class Element_>
struct Config {
  static constexpr int kDi = kDi_;
  static constexpr int kKeep = kKeep_;  // running entries per row, >= top_k - 1 (odd: see SharedStorage)
  static constexpr int kStages = stages_for(kDi);
  using Element = Element_;  // of index_q and index_k: bfloat16 or float16 (fp32 accumulation)
  using SmemLayoutQ =
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<Int<kRows>, Int<kDi>>{}));
  using SmemLayoutK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                             Shape<Int<kBlock>, Int<kDi>, Int<kStages>>{}));
  // Two warpgroups along M; each issues its own 64 x 128 x 16 wgmmas.
  using TiledMma = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<Int<kRowsPerWarpGroup>, Int<kBlock>, Int<kDi>>,
                           GMMA::Major::K, GMMA::Major::K>(),
      Layout<Shape<Int<kComputeWarpGroups>, _1, _1>>{}));
  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  static constexpr uint32_t kQBytes = kRows * kDi * sizeof(Element);
  static constexpr uint32_t kKBytes = kBlock * kDi * sizeof(Element);

  struct SharedStorage {
    array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> q;
    array_aligned<Element, cosize_v<SmemLayoutK>, 1024> k;
    typename Pipeline::SharedStorage pipeline;
    uint64_t q_full;  // mbarrier: the Q tile has landed
    float top_score[kRows][kKeep];  // each row's running top-k (RunningTopK), odd row
    int top_id[kRows][kKeep];       // stride: the owner lanes of a warp hit distinct banks
  };

  // index_q [B, T, Hkv, Di] seen as (T, Di, Hkv, B); index_k [B, S, Di] as (S, Di, B).
  CUTE_HOST_DEVICE static auto q_shape(const IndexerParams& p) {
    return make_shape(p.q_len, Int<kDi>{}, p.num_kv_heads, p.batch);
  }
  CUTE_HOST_DEVICE static auto k_shape(const IndexerParams& p) {
    return make_shape(p.kv_len, Int<kDi>{}, p.batch);
  }
  static auto q_tensor(const IndexerParams& p) {
    return make_tensor(
        make_gmem_ptr(static_cast<const Element*>(p.index_q)),
        q_shape(p),
        make_stride(int64_t(p.num_kv_heads) * kDi, _1{}, int64_t(kDi),
                    int64_t(p.q_len) * p.num_kv_heads * kDi));
  }
  static auto k_tensor(const IndexerParams& p) {
    return make_tensor(make_gmem_ptr(static_cast<const Element*>(p.index_k)),
                       k_shape(p),
                       make_stride(int64_t(kDi), _1{}, int64_t(p.kv_len) * kDi));
  }
  static auto make_tma_q(const IndexerParams& p) {
    return make_tma_copy(SM90_TMA_LOAD{}, q_tensor(p), SmemLayoutQ{});
  }
  static auto make_tma_k(const IndexerParams& p) {
    return make_tma_copy(SM90_TMA_LOAD{}, k_tensor(p), SmemLayoutK{}(_, _, 0));
  }
  using TmaQ = decltype(make_tma_q(IndexerParams{}));
  using TmaK = decltype(make_tma_k(IndexerParams{}));
};

template <class Cfg>
struct KernelArgs {
  IndexerParams p;
  typename Cfg::TmaQ tma_q;
  typename Cfg::TmaK tma_k;
};

// Document start of valid row t (key coordinate pos), clamped into [0, pos] so that no int32
// content can move a load or a block id out of range.
__device__ __forceinline__ int row_doc(const IndexerParams& p, int b, int t, int pos) {
  return min(max(p.doc[int64_t(b) * p.q_len + t], 0), pos);
}

// The key tiles a CTA streams: `count` tiles of 128 keys from key `first` (the smallest
// document start among its valid rows), reaching the end of every row's last fully visible
// block; `aligned`: every valid row's document starts a multiple of 128 keys after `first`.
// Each warp derives it on its own from the rows' positions (128 loads, no shared memory).
struct TileRange {
  int first;
  int count;
  bool aligned;
};

__device__ __forceinline__ TileRange tile_range(const IndexerParams& p, int b, int t0, int q_offset, int kv_length) {
  constexpr int kPerLane = kRows / 32;
  const int lane = threadIdx.x % 32;
  int doc[kPerLane];
  int first = INT_MAX, end = 0;  // end: one past the last key any row ranks
  CUTE_UNROLL
  for (int i = 0; i < kPerLane; ++i) {
    const int t = t0 + lane + 32 * i;
    const int pos = q_offset + t;
    doc[i] = -1;
    if (t < p.q_len && pos >= 0 && pos < kv_length) {
      doc[i] = row_doc(p, b, t, pos);
      first = min(first, doc[i]);
      end = max(end, doc[i] + (pos - doc[i]) / kBlock * kBlock);
    }
  }
  CUTE_UNROLL
  for (int o = 16; o > 0; o /= 2) {
    first = min(first, __shfl_xor_sync(0xffffffff, first, o));
    end = max(end, __shfl_xor_sync(0xffffffff, end, o));
  }
  bool misaligned = false;
  CUTE_UNROLL
  for (int i = 0; i < kPerLane; ++i) misaligned |= doc[i] >= 0 && (doc[i] - first) % kBlock != 0;
  TileRange range;
  range.first = first == INT_MAX ? 0 : first;
  range.count = end > range.first ? (end - range.first + kBlock - 1) / kBlock : 0;
  range.aligned = !__any_sync(0xffffffff, misaligned);
  return range;
}

template <class Cfg>
__global__ void __launch_bounds__(kThreads, 1)
    indexer_kernel(const __grid_constant__ KernelArgs<Cfg> args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Element = typename Cfg::Element;
  using Pipeline = typename Cfg::Pipeline;
  constexpr int kDi = Cfg::kDi;
  extern __shared__ __align__(1024) char smem_raw[];
  auto& smem = *reinterpret_cast<typename Cfg::SharedStorage*>(smem_raw);
  const IndexerParams& p = args.p;

  const int warp_group = threadIdx.x / 128;
  const int warp = threadIdx.x / 32;
  const int lane_predicate = cute::elect_one_sync();
  const int q_tile = gridDim.x - 1 - blockIdx.x;  // the rows with the most blocks start first
  const int g = blockIdx.y;
  const int b = blockIdx.z;
  const int t0 = q_tile * kRows;
  // Clamped so that no int32 content can send a load or a block id out of range; values
  // outside these ranges make the same rows padding as the bounds themselves do.
  const int q_offset = min(max(p.q_offset[b], -p.q_len), p.kv_len);
  const int kv_length = min(max(p.kv_length[b], 0), p.kv_len);
  // Valid rows t: t < T and 0 <= q_offset + t < kv_length. Their candidate blocks lie in the
  // range's tiles (without packed documents: tiles 0 .. L(last valid row) - 1 from key 0).
  const TileRange range = tile_range(p, b, t0, q_offset, kv_length);

  typename Pipeline::Params pipe_params;
  pipe_params.transaction_bytes = Cfg::kKBytes;
  pipe_params.role = warp_group == 0 ? Pipeline::ThreadCategory::Producer
                                     : Pipeline::ThreadCategory::Consumer;
  pipe_params.is_leader = warp == 0 && lane_predicate;
  pipe_params.num_consumers = 128 * kComputeWarpGroups;
  Pipeline pipeline(smem.pipeline, pipe_params, Shape<_1, _1, _1>{});
  if (warp == 0 && lane_predicate) cutlass::arch::ClusterTransactionBarrier::init(&smem.q_full, 1);
  cutlass::arch::fence_barrier_init();
  __syncthreads();

  Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Cfg::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Cfg::SmemLayoutK{});

  if (warp_group == 0) {
    cutlass::arch::warpgroup_reg_dealloc<kLoadRegisters>();
    if (warp == 0 && lane_predicate && range.count > 0) {
      cute::prefetch_tma_descriptor(args.tma_q.get_tma_descriptor());
      cute::prefetch_tma_descriptor(args.tma_k.get_tma_descriptor());
      Tensor mQ = args.tma_q.get_tma_tensor(Cfg::q_shape(p));
      Tensor gQ = local_tile(mQ(_, _, g, b), Shape<Int<kRows>, Int<kDi>>{}, make_coord(q_tile, 0));
      auto tma_q = args.tma_q.get_slice(0);
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&smem.q_full, Cfg::kQBytes);
      copy(args.tma_q.with(smem.q_full), tma_q.partition_S(gQ), tma_q.partition_D(sQ));

      Tensor mK = args.tma_k.get_tma_tensor(Cfg::k_shape(p));
      // Tiles from key range.first (any key: the TMA box may start anywhere and zero-fills
      // past S; the keys there are never ranked).
      Tensor gK = local_tile(domain_offset(make_coord(range.first, 0), mK(_, _, b)), Shape<Int<kBlock>, Int<kDi>>{},
                             make_coord(_, 0));
      auto tma_k = args.tma_k.get_slice(0);
      Tensor tKgK = tma_k.partition_S(gK);  // (TMA, TMA_M, TMA_K, blocks)
      Tensor tKsK = tma_k.partition_D(sK);  // (TMA, TMA_M, TMA_K, stages)
      auto write = cutlass::make_producer_start_state<Pipeline>();
      for (int j = 0; j < range.count; ++j) {
        pipeline.producer_acquire(write);
        copy(args.tma_k.with(*pipeline.producer_get_barrier(write)), tKgK(_, _, _, j),
             tKsK(_, _, _, write.index()));
        ++write;
      }
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<kComputeRegisters>();
    const int thread = threadIdx.x - 128;
    typename Cfg::TiledMma mma;
    auto thr = mma.get_thread_slice(thread);
    Tensor tSrQ = thr.make_fragment_A(thr.partition_A(sQ));  // (MMA, MMA_M, MMA_K)
    Tensor tSrK = thr.make_fragment_B(thr.partition_B(sK));  // (MMA, MMA_N, MMA_K, stages)
    Tensor coord = thr.partition_C(make_identity_tensor(Shape<Int<kRows>, Int<kBlock>>{}));
    Tensor coord_rc = make_tensor(coord.data(), sm90::acc_rows_by_cols(coord.layout()));

    // The quad of lanes 4q..4q+3 shares two rows; lane 4q owns the first, 4q+1 the second.
    const int lane = threadIdx.x % 32;
    const int mine = lane & 1;
    const bool owner = (lane & 2) == 0;
    const int row = get<0>(coord_rc(mine, 0));  // this lane's row in the tile, if it owns one
    // Where each of the thread's two rows cuts a tile: (doc - range.first) = 128 lag + split;
    // tile j holds the row's block j - lag from column split on (and block j - lag - 1 before).
    int lag[2], split[2];
    bool valid[2];
    int local[2];
    CUTE_UNROLL
    for (int r = 0; r < 2; ++r) {
      const int t = t0 + get<0>(coord_rc(r, 0));
      const int pos = q_offset + t;
      valid[r] = t < p.q_len && pos >= 0 && pos < kv_length;
      const int doc = valid[r] ? row_doc(p, b, t, pos) : range.first;
      lag[r] = (doc - range.first) / kBlock;
      split[r] = (doc - range.first) % kBlock;
      local[r] = valid[r] ? (pos - doc) / kBlock : 0;  // L(i), document-relative
    }
    const int t = t0 + row;
    // (selects, not lag[mine]: a register array indexed at run time would live in local memory)
    const int my_lag = mine ? lag[1] : lag[0], my_split = mine ? split[1] : split[0];
    const int my_local = mine ? local[1] : local[0];
    const bool my_valid = mine ? valid[1] : valid[0];
    const float scale = p.index_softmax_scale;
    RunningTopK top(smem.top_score[row], smem.top_id[row], owner ? p.top_k - 1 : 0);
    float open = -INFINITY;  // split path: the max so far of the row's block that runs into the next tile

    // S = Q Kᵀ of one block into `acc`, issued asynchronously (wgmma over Di in steps of 16).
    auto issue = [&](auto& acc, int stage) {
      warpgroup_fence_operand(acc);
      warpgroup_arrive();
      mma.accumulate_ = GMMA::ScaleOut::Zero;
      CUTE_UNROLL
      for (int kb = 0; kb < size<2>(tSrQ); ++kb) {
        cute::gemm(mma, tSrQ(_, _, kb), tSrK(_, _, kb, stage), acc);
        mma.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
    };
    // Row maxima of tile j (M(i, g, block) before the scale), offered to the top-k: blocks
    // reach the top-k in increasing id order, as it requires.
    auto pool = [&](auto& acc, int j) {
      warpgroup_fence_operand(acc);
      Tensor s = make_tensor(acc.data(), sm90::acc_rows_by_cols(acc.layout()));  // (2 rows, 64 cols)
      static_assert(size<0>(decltype(s){}) == 2, "a thread holds two rows of S");
      constexpr int kCols = size<1>(decltype(s){});
      if (!range.aligned) {
        // Row r's columns < split[r] close its open block, the others open the next.
        float lo[2], hi[2];
        CUTE_UNROLL
        for (int r = 0; r < 2; ++r) {
          lo[r] = -INFINITY;
          hi[r] = -INFINITY;
          CUTE_UNROLL
          for (int c = 0; c < kCols; ++c) {
            const bool before = get<1>(coord_rc(r, c)) < split[r];
            lo[r] = fmaxf(lo[r], before ? s(r, c) : -INFINITY);
            hi[r] = fmaxf(hi[r], before ? -INFINITY : s(r, c));
          }
          CUTE_UNROLL
          for (int o = 1; o <= 2; o *= 2) {
            lo[r] = fmaxf(lo[r], __shfl_xor_sync(0xffffffff, lo[r], o));
            hi[r] = fmaxf(hi[r], __shfl_xor_sync(0xffffffff, hi[r], o));
          }
        }
        if (owner) {
          const float l = mine ? lo[1] : lo[0], h = mine ? hi[1] : hi[0];
          const int block = my_split == 0 ? j - my_lag : j - my_lag - 1;
          const float m = my_split == 0 ? h : fmaxf(open, l);
          if (block >= 0 && block < my_local) top.offer(scale * m, block);
          open = h;
        }
        return;
      }
      float m[2][4];  // four independent chains per row: short dependency chains
      CUTE_UNROLL
      for (int r = 0; r < 2; ++r) {
        CUTE_UNROLL
        for (int c = 0; c < 4; ++c) m[r][c] = s(r, c);
        CUTE_UNROLL
        for (int c = 4; c < kCols; ++c) m[r][c % 4] = fmaxf(m[r][c % 4], s(r, c));
      }
      float m0 = fmaxf(fmaxf(m[0][0], m[0][1]), fmaxf(m[0][2], m[0][3]));
      float m1 = fmaxf(fmaxf(m[1][0], m[1][1]), fmaxf(m[1][2], m[1][3]));
      m0 = fmaxf(m0, __shfl_xor_sync(0xffffffff, m0, 1));
      m1 = fmaxf(m1, __shfl_xor_sync(0xffffffff, m1, 1));
      m0 = fmaxf(m0, __shfl_xor_sync(0xffffffff, m0, 2));
      m1 = fmaxf(m1, __shfl_xor_sync(0xffffffff, m1, 2));
      const int block = j - my_lag;
      if (owner && block >= 0 && block < my_local) top.offer(scale * (mine ? m1 : m0), block);
    };

    // Two accumulators in turn: block j + 1's wgmmas run while block j is pooled.
    Tensor acc0 = partition_fragment_C(mma, Shape<Int<kRows>, Int<kBlock>>{});
    Tensor acc1 = partition_fragment_C(mma, Shape<Int<kRows>, Int<kBlock>>{});
    cutlass::PipelineState<Cfg::kStages> wait_state, release_state;
    auto issue_next = [&](auto& acc) {
      pipeline.consumer_wait(wait_state);
      issue(acc, wait_state.index());
      ++wait_state;
    };
    // Block j's accumulator is pooled once at most one wgmma group (the next block's) is
    // still running; a loop body of fixed shape lets ptxas see that the group in flight
    // never writes the registers being read.
    auto finish_with_next_in_flight = [&](auto& acc, int j) {
      warpgroup_wait<1>();
      pipeline.consumer_release(release_state);
      ++release_state;
      pool(acc, j);
    };
    auto finish_last = [&](auto& acc, int j) {
      warpgroup_wait<0>();
      pipeline.consumer_release(release_state);
      ++release_state;
      pool(acc, j);
    };
    const int n_blocks = range.count;
    if (n_blocks > 0) {
      cutlass::arch::ClusterBarrier::wait(&smem.q_full, 0);
      issue_next(acc0);  // block 0
      int j = 0;
      for (; j + 2 < n_blocks; j += 2) {  // on entry acc0 holds block j, in flight
        issue_next(acc1);
        finish_with_next_in_flight(acc0, j);
        issue_next(acc0);
        finish_with_next_in_flight(acc1, j + 1);
      }
      if (j + 1 < n_blocks) {
        issue_next(acc1);
        finish_with_next_in_flight(acc0, j);
        finish_last(acc1, j + 1);
      } else {
        finish_last(acc0, j);
      }
    }

    if (owner && t < p.q_len) {
      int32_t* out = p.block_indices + ((int64_t(b) * p.q_len + t) * p.num_kv_heads + g) * p.top_k;
      if (my_valid) {
        top.write_row(out, p.top_k, my_local);
      } else {
        for (int k = 0; k < p.top_k; ++k) out[k] = -1;  // padding query (spec, "Positions")
      }
    }
  }
#endif
}

template <int kDi, int kKeep, class Element>
cudaError_t launch(const IndexerParams& p, cudaStream_t stream) {
  using Cfg = Config<kDi, kKeep, Element>;
  // TMA needs 16-byte aligned bases (the row strides, multiples of Di * 2 bytes, always are);
  // a descriptor that fails to encode would make the kernel read garbage, so refuse here.
  if (!sm90::aligned16(p.index_q) || !sm90::aligned16(p.index_k) || p.doc == nullptr || p.index_head_dim != kDi ||
      p.block_size != kBlock || p.top_k < 1 || p.top_k - 1 > kKeep || p.batch < 1 ||
      p.q_len < 1 || p.kv_len < 1 || p.num_kv_heads < 1 || p.num_kv_heads > 65535 ||
      p.batch > 65535) {
    return cudaErrorInvalidValue;
  }
  KernelArgs<Cfg> args{p, Cfg::make_tma_q(p), Cfg::make_tma_k(p)};
  auto* kernel = &indexer_kernel<Cfg>;
  constexpr int smem_bytes = sizeof(typename Cfg::SharedStorage);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) return err;
  dim3 grid((p.q_len + kRows - 1) / kRows, p.num_kv_heads, p.batch);
  kernel<<<grid, kThreads, smem_bytes, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace msa::indexer_sm90
