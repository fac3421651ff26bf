// The KL over every visible key in dense mode with plain causal positions, SM90 (issue #13
// item 3): `dense_kl_kernel`, for dkl = 1 the gradients d index_q, d index_k and the value.
//
// In dense mode with plain causal positions (T == S, query t sees keys 0..t, one document:
// msa_jax's `CallInfo.plain_causal`) the KL's support is the causal triangle, so the kernel
// walks it by contiguous tiles: no work list (the passes of kl_sm90.cuh read one built by
// sorting), and every tile arrives by TMA instead of row gathers.
//
// One CTA per (kv head g, 128-key tile, batch row b); grid x is the kv head so that the
// heavy tiles (the first keys, seen by the most queries) of every head start first. K and the
// tile's index keys stay in shared memory; the CTA walks the 64-query tiles that see the tile,
// from the last one back to the tile's own first query. Warpgroups 1 and 2 each own a 64-key half. Per
// query tile:
//   teacher steps, one per head h of the group: S = Q_h Kᵀ (m64 n64), and
//     P̄ += exp(s S - lse_h) in registers. Every head has the same (query, key) layout, so the
//     sum over the group needs no shuffles (the work-list value pass packs a token's heads
//     into rows and reduce-scatters them; the work-list gradient pass, kl_grad_sm90.cuh, took
//     this layout); step h + 1's S is issued before step h's exps;
//   a student step: U = IQ Kiᵀ, P̄ /= G and masked to the visible keys, du = exp(u - ilse) - P̄,
//     the value's terms P̄ log P̄ - P̄ u + ilse P̄ (summed per thread), du to shared memory, then
//     d index_k += duᵀ IQ (accumulated over the walk and stored once: the CTA owns its keys)
//     and this half's d index_q share du Ki, added to the query rows by float2 atomics.
// ilse (the student's log-sum-exp over keys 0..t) is an input: msa_jax/cuda.py takes it from
// cuDNN. lse and ilse (two rows a thread) are read from global memory, lse one step ahead.
// Warpgroup 0's first thread issues every TMA: K and the index keys once, then per query tile
// its G q tiles into a ring of stages and its index_q tile into one of two buffers.
#pragma once

#include "kl_sm90_common.cuh"

namespace msa::kl_sm90 {

template <int kD_, int kDi_, class Element_>
struct DenseConfig {
  // The gradient pass's tile layouts and MMAs: the same shapes (64 query rows, a 64-key half).
  using Base = Config<kD_, kDi_, Element_, KLPass::kGradient>;
  static constexpr int kD = kD_;
  static constexpr int kDi = kDi_;
  using Element = Element_;
  using IndexElement = Element_;
  // q stages in flight: 6 x 16 KB at D = 128 (208 KB of shared memory in all), 8 x 8 KB at 64.
  static constexpr int kQStages = kD == 128 ? 6 : 8;
  static constexpr int kIQBuffers = 2;
  // The loading warpgroup only runs the TMA thread; the computing side holds P̄, two S
  // accumulators and d index_k (32 + 64 + Di / 2 floats a thread).
  static constexpr uint32_t kLoadRegisters = 56;
  static constexpr uint32_t kComputeRegisters = 224;
  static_assert(sm90::register_split_fits(kThreads, kLoadRegisters, kComputeRegisters));

  using SmemLayoutQStage = typename Base::SmemLayoutHalf;  // (64, D): one TMA box
  using SmemLayoutQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                             Shape<Int<kRows>, Int<kD>, Int<kQStages>>{}));
  using SmemLayoutIQStage = typename Base::SmemLayoutIHalf;  // (64, Di)
  using SmemLayoutIQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                              Shape<Int<kRows>, Int<kDi>, Int<kIQBuffers>>{}));
  using SmemLayoutIQt = decltype(composition(
      SmemLayoutIQ{}, make_ordered_layout(Shape<Int<kDi>, Int<kRows>, Int<kIQBuffers>>{}, Step<_2, _1, _3>{})));
  using SmemLayoutK = typename Base::SmemLayoutK;
  using SmemLayoutIK = typename Base::SmemLayoutIK;
  using SmemLayoutIKt = typename Base::SmemLayoutIKt;
  using SmemLayoutDUt = typename Base::SmemLayoutDUt;
  using SmemLayoutDU = typename Base::SmemLayoutDU;
  using MmaS = typename Base::MmaS;
  using MmaU = typename Base::MmaU;
  using MmaDIQ = typename Base::MmaDIQ;
  using MmaDIK = typename Base::MmaDIK;

  struct SharedStorage {
    array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> q;
    array_aligned<Element, cosize_v<SmemLayoutIQ>, 1024> iq;
    array_aligned<Element, cosize_v<SmemLayoutK>, 1024> k;
    array_aligned<Element, cosize_v<SmemLayoutIK>, 1024> ik;
    array_aligned<Element, 2 * cosize_v<SmemLayoutDUt>, 1024> du;  // one du per warpgroup
    float value[8];                                                // the computing warps' sums
    uint64_t q_full[kQStages];   // mbarrier: a q tile landed (TMA transaction bytes)
    uint64_t q_empty[kQStages];  // mbarrier: its S is done (256 arrivals)
    uint64_t iq_full[kIQBuffers];
    uint64_t iq_empty[kIQBuffers];  // mbarrier: the student step's products are done (256 arrivals)
    uint64_t tile_full;             // mbarrier: K and the index keys landed
  };

  // [B, T, H, W] seen as (T, W, H, B), the view the TMA descriptors of q, k and index_q use.
  template <int kW>
  static auto heads_tensor(const void* ptr, const DenseKLParams& p, int heads) {
    return make_tensor(make_gmem_ptr(static_cast<const Element*>(ptr)),
                       make_shape(p.seq_len, Int<kW>{}, heads, p.batch),
                       make_stride(int64_t(heads) * kW, _1{}, int64_t(kW), int64_t(p.seq_len) * heads * kW));
  }
  // index_k [B, T, Di] seen as (T, Di, B).
  static auto index_k_tensor(const void* ptr, const DenseKLParams& p) {
    return make_tensor(make_gmem_ptr(static_cast<const Element*>(ptr)), make_shape(p.seq_len, Int<kDi>{}, p.batch),
                       make_stride(int64_t(kDi), _1{}, int64_t(p.seq_len) * kDi));
  }
  static auto make_tma_q(const DenseKLParams& p) {
    return make_tma_copy(SM90_TMA_LOAD{}, heads_tensor<kD>(p.q, p, p.num_q_heads), SmemLayoutQStage{});
  }
  static auto make_tma_k(const DenseKLParams& p) {
    return make_tma_copy(SM90_TMA_LOAD{}, heads_tensor<kD>(p.k, p, p.num_kv_heads), SmemLayoutQStage{});
  }
  static auto make_tma_iq(const DenseKLParams& p) {
    return make_tma_copy(SM90_TMA_LOAD{}, heads_tensor<kDi>(p.index_q, p, p.num_kv_heads), SmemLayoutIQStage{});
  }
  static auto make_tma_ik(const DenseKLParams& p) {
    return make_tma_copy(SM90_TMA_LOAD{}, index_k_tensor(p.index_k, p), SmemLayoutIQStage{});
  }
  using TmaQ = decltype(make_tma_q(DenseKLParams{}));
  using TmaK = decltype(make_tma_k(DenseKLParams{}));
  using TmaIQ = decltype(make_tma_iq(DenseKLParams{}));
  using TmaIK = decltype(make_tma_ik(DenseKLParams{}));
};

template <class Cfg>
struct DenseKernelArgs {
  DenseKLParams p;
  typename Cfg::TmaQ tma_q;
  typename Cfg::TmaK tma_k;
  typename Cfg::TmaIQ tma_iq;
  typename Cfg::TmaIK tma_ik;
};

// The loading thread: the tile's keys and index keys (both halves), then per query tile (the
// last first) its group's q tiles (stage ring) and its index_q tile (two buffers).
template <class Cfg>
__device__ __forceinline__ void dense_kl_loads(const DenseKernelArgs<Cfg>& args, typename Cfg::SharedStorage& smem,
                                               int tile, int last_query_tile, int n_query_tiles, int g, int b,
                                               int group) {
  const DenseKLParams& p = args.p;
  constexpr int kD = Cfg::kD;
  constexpr int kDi = Cfg::kDi;
  constexpr int kQStages = Cfg::kQStages;
  using Element = typename Cfg::Element;
  cute::prefetch_tma_descriptor(args.tma_q.get_tma_descriptor());
  cute::prefetch_tma_descriptor(args.tma_k.get_tma_descriptor());
  cute::prefetch_tma_descriptor(args.tma_iq.get_tma_descriptor());
  cute::prefetch_tma_descriptor(args.tma_ik.get_tma_descriptor());

  Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Cfg::SmemLayoutK{});
  Tensor sIK = make_tensor(make_smem_ptr(smem.ik.data()), typename Cfg::SmemLayoutIK{});
  Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Cfg::SmemLayoutQ{});
  Tensor sIQ = make_tensor(make_smem_ptr(smem.iq.data()), typename Cfg::SmemLayoutIQ{});
  Tensor mQ = args.tma_q.get_tma_tensor(make_shape(p.seq_len, Int<kD>{}, p.num_q_heads, p.batch));
  Tensor mK = args.tma_k.get_tma_tensor(make_shape(p.seq_len, Int<kD>{}, p.num_kv_heads, p.batch));
  Tensor mIQ = args.tma_iq.get_tma_tensor(make_shape(p.seq_len, Int<kDi>{}, p.num_kv_heads, p.batch));
  Tensor mIK = args.tma_ik.get_tma_tensor(make_shape(p.seq_len, Int<kDi>{}, p.batch));
  auto tq = args.tma_q.get_slice(0);
  auto tk = args.tma_k.get_slice(0);
  auto tiq = args.tma_iq.get_slice(0);
  auto tik = args.tma_ik.get_slice(0);

  cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&smem.tile_full,
                                                                 kBlock * (kD + kDi) * sizeof(Element));
  CUTE_UNROLL
  for (int h = 0; h < 2; ++h) {
    Tensor gK = local_tile(mK(_, _, g, b), Shape<Int<kHalf>, Int<kD>>{}, make_coord(tile / kHalf + h, 0));
    Tensor gIK = local_tile(mIK(_, _, b), Shape<Int<kHalf>, Int<kDi>>{}, make_coord(tile / kHalf + h, 0));
    copy(args.tma_k.with(smem.tile_full), tk.partition_S(gK), tk.partition_D(sK(_, _, h)));
    copy(args.tma_ik.with(smem.tile_full), tik.partition_S(gIK), tik.partition_D(sIK(_, _, h)));
  }

  int c = 0;  // q tiles issued
  for (int i = 0; i < n_query_tiles; ++i) {
    const int qt = last_query_tile - i;
    for (int h = 0; h < group; ++h, ++c) {
      const int s = c % kQStages;
      cutlass::arch::ClusterBarrier::wait(&smem.q_empty[s], ((c / kQStages) & 1) ^ 1);
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&smem.q_full[s], kRows * kD * sizeof(Element));
      Tensor gQ = local_tile(mQ(_, _, g * group + h, b), Shape<Int<kRows>, Int<kD>>{}, make_coord(qt, 0));
      copy(args.tma_q.with(smem.q_full[s]), tq.partition_S(gQ), tq.partition_D(sQ(_, _, s)));
    }
    // index_q is read only by the tile's student step, after its G teacher steps.
    const int buf = i % Cfg::kIQBuffers;
    cutlass::arch::ClusterBarrier::wait(&smem.iq_empty[buf], ((i / Cfg::kIQBuffers) & 1) ^ 1);
    cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&smem.iq_full[buf], kRows * kDi * sizeof(Element));
    Tensor gIQ = local_tile(mIQ(_, _, g, b), Shape<Int<kRows>, Int<kDi>>{}, make_coord(qt, 0));
    copy(args.tma_iq.with(smem.iq_full[buf]), tiq.partition_S(gIQ), tiq.partition_D(sIQ(_, _, buf)));
  }
}

template <class Cfg>
__global__ void __launch_bounds__(kThreads, 1) dense_kl_kernel(const __grid_constant__ DenseKernelArgs<Cfg> args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Element = typename Cfg::Element;
  constexpr int kDi = Cfg::kDi;
  constexpr int kQStages = Cfg::kQStages;
  extern __shared__ __align__(1024) char smem_raw[];
  auto& smem = *reinterpret_cast<typename Cfg::SharedStorage*>(smem_raw);
  const DenseKLParams& p = args.p;

  const int g = blockIdx.x, b = blockIdx.z;
  const int tile = blockIdx.y * kBlock;  // the tile's first key
  const int T = p.seq_len;
  const int group = p.num_q_heads / p.num_kv_heads;
  // Queries from the tile's first key on see it. The walk goes backwards, from the last query
  // tile: CTAs that run together (the same wave of key tiles) then read the same q tiles at about
  // the same time, so each is fetched from memory once and shared through L2.
  const int last_query_tile = (T + kRows - 1) / kRows - 1;
  const int n_query_tiles = last_query_tile + 1 - tile / kRows;

  const int warp_group = threadIdx.x / 128;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kQStages; ++s) {
      cutlass::arch::ClusterTransactionBarrier::init(&smem.q_full[s], 1);
      cutlass::arch::ClusterBarrier::init(&smem.q_empty[s], 256);
    }
    for (int i = 0; i < Cfg::kIQBuffers; ++i) {
      cutlass::arch::ClusterTransactionBarrier::init(&smem.iq_full[i], 1);
      cutlass::arch::ClusterBarrier::init(&smem.iq_empty[i], 256);
    }
    cutlass::arch::ClusterTransactionBarrier::init(&smem.tile_full, 1);
  }
  cutlass::arch::fence_barrier_init();
  __syncthreads();

  if (warp_group == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Cfg::kLoadRegisters>();
    if (threadIdx.x == 0) dense_kl_loads(args, smem, tile, last_query_tile, n_query_tiles, g, b, group);
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
  auto products = student_product_fragments<Cfg>(smem, half, thread);
  Tensor sDU = make_tensor(make_smem_ptr(smem.du.data() + half * cosize_v<typename Cfg::SmemLayoutDUt>),
                           typename Cfg::SmemLayoutDU{});  // (rows, keys): du is written here
  auto& ciq = get<4>(products);
  auto& cik = get<5>(products);
  Tensor acc_dik = partition_fragment_C(mma_dik, Shape<Int<kHalf>, Int<kDi>>{});
  clear(acc_dik);
  mma_dik.accumulate_ = GMMA::ScaleOut::One;

  const float scale_log2 = p.softmax_scale * float(M_LOG2E);
  const float iscale = p.index_softmax_scale;
  const float inv_group = 1.0f / float(group);
  const int my_row[2] = {get<0>(cs(0, 0)), get<0>(cs(1, 0))};  // query rows of every tile
  const cutlass::arch::NamedBarrier warpgroup_sync(128, half);  // this warpgroup only
  const float* lse = p.lse + int64_t(b) * T * p.num_q_heads + g * group;  // + query * Hq + h
  float value = 0.0f;

  // P̄ (the group's sum until the student step) in the (query, key) view of an S accumulator.
  Tensor acc_shape = partition_fragment_C(mma_s, Shape<Int<kRows>, Int<kHalf>>{});
  Tensor pbar = make_tensor_like(make_tensor(acc_shape.data(), sm90::acc_rows_by_cols(acc_shape.layout())));
  constexpr int kCols = decltype(size<1>(pbar))::value;  // a row's keys in this thread: 16

  // q tile c's S = Q Kᵀ (stage c % kQStages, once landed) issued into acc and committed.
  auto issue_s = [&](int c, auto& acc) {
    cutlass::arch::ClusterBarrier::wait(&smem.q_full[c % kQStages], (c / kQStages) & 1);
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    gemm_overwrite(mma_s, tSrQ(_, _, _, c % kQStages), tSrK, acc);
    warpgroup_commit_batch();
  };
  // Teacher step of q tile c (head h of the query tile whose last q tile is c_end - 1) on acc
  // (S complete): q tile c + 1's S is issued into acc_next first and waited for at the end, so
  // the tensor cores run it under this step's exps. `which` makes the two calls below distinct
  // instantiations, each inlined once (kl_grad_sm90.cuh: one lambda instantiation called twice
  // was compiled as a call with the accumulators on the stack). lse_next: the rows' lse of
  // q tile c + 1's head, loaded here for the next step.
  auto step = [&](int c, auto which, auto& acc, auto& acc_next, int c_end, const int (&rows)[2],
                  float (&lse_cur)[2], float (&lse_next)[2], int h) {
    if (c + 1 < c_end) issue_s(c + 1, acc_next);
    cutlass::arch::ClusterBarrier::arrive(&smem.q_empty[c % kQStages]);
    if (h + 1 < group) {
      CUTE_UNROLL
      for (int i = 0; i < 2; ++i) lse_next[i] = __ldg(lse + int64_t(rows[i]) * p.num_q_heads + h + 1) * float(M_LOG2E);
    }
    Tensor s = make_tensor(acc.data(), sm90::acc_rows_by_cols(acc.layout()));
    CUTE_UNROLL
    for (int i = 0; i < 2; ++i) {
      CUTE_UNROLL
      for (int j = 0; j < kCols; ++j) pbar(i, j) += exp2f(s(i, j) * scale_log2 - lse_cur[i]);
    }
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_next);
  };

  cutlass::arch::ClusterTransactionBarrier::wait(&smem.tile_full, 0);
  int c0 = 0;  // the query tile's first q tile
  for (int i = 0; i < n_query_tiles; ++i, c0 += group) {
    const int t0 = (last_query_tile - i) * kRows;
    // Rows past T (zero q and index_q from the TMA's fill) read row T - 1's statistics; their
    // P̄ and du are masked below.
    const int rows[2] = {min(t0 + my_row[0], T - 1), min(t0 + my_row[1], T - 1)};
    float ilse[2];
    CUTE_UNROLL
    for (int r = 0; r < 2; ++r) ilse[r] = __ldg(p.ilse + (int64_t(b) * T + rows[r]) * p.num_kv_heads + g);
    float lse_a[2], lse_b[2];
    CUTE_UNROLL
    for (int r = 0; r < 2; ++r) lse_a[r] = __ldg(lse + int64_t(rows[r]) * p.num_q_heads) * float(M_LOG2E);
    clear(pbar);
    {
      // Two S accumulators take turns (the heads unrolled by two, each a fixed set of
      // registers), scoped to the teacher steps so that they are not live in the student step.
      Tensor acc_a = partition_fragment_C(mma_s, Shape<Int<kRows>, Int<kHalf>>{});
      Tensor acc_b = partition_fragment_C(mma_s, Shape<Int<kRows>, Int<kHalf>>{});
      const int c_end = c0 + group;
      issue_s(c0, acc_a);
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_a);
      for (int h = 0; h < group; h += 2) {
        step(c0 + h, _0{}, acc_a, acc_b, c_end, rows, lse_a, lse_b, h);
        if (h + 1 < group) step(c0 + h + 1, _1{}, acc_b, acc_a, c_end, rows, lse_b, lse_a, h + 1);
      }
    }

    // The student step: U = IQ Kiᵀ, du and the value's terms, then the two products.
    const int buf = i % Cfg::kIQBuffers;
    cutlass::arch::ClusterBarrier::wait(&smem.iq_full[buf], (i / Cfg::kIQBuffers) & 1);
    Tensor acc_u = partition_fragment_C(mma_u, Shape<Int<kRows>, Int<kHalf>>{});
    warpgroup_fence_operand(acc_u);
    warpgroup_arrive();
    gemm_overwrite(mma_u, tUrIQ(_, _, _, buf), tUrIK, acc_u);
    warpgroup_commit_batch();
    // Every warp of this warpgroup is past the last tile's products, which read du.
    warpgroup_sync.arrive_and_wait();
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_u);
    Tensor us = make_tensor(acc_u.data(), sm90::acc_rows_by_cols(acc_u.layout()));
    CUTE_UNROLL
    for (int r = 0; r < 2; ++r) {
      const int query = t0 + my_row[r];
      // Keys of this half that the row sees: key0 + key <= query, and none past T.
      const int visible = query < T ? min(max(query - key0 + 1, 0), kHalf) : 0;
      CUTE_UNROLL
      for (int j = 0; j < kCols; ++j) {
        const int key = get<1>(cs(r, j));
        const bool ok = key < visible;
        const float u = us(r, j) * iscale;
        const float pm = ok ? pbar(r, j) * inv_group : 0.0f;
        const float du = ok ? exp2f((u - ilse[r]) * float(M_LOG2E)) - pm : 0.0f;
        sDU(my_row[r], key) = Element(du);
        if (ok) value += (pm > 0.0f ? pm * __logf(pm) : 0.0f) + pm * (ilse[r] - u);
      }
    }
    // du is complete and visible to wgmma.
    cutlass::arch::fence_view_async_shared();
    warpgroup_sync.arrive_and_wait();
    Tensor acc_diq = partition_fragment_C(mma_diq, Shape<Int<kRows>, Int<kDi>>{});
    student_products(mma_dik, mma_diq, products, buf, acc_dik, acc_diq);
    cutlass::arch::ClusterBarrier::arrive(&smem.iq_empty[buf]);

    // This half's share of the rows' d index_q, scaled, added to each row that exists.
    Tensor diq = make_tensor(acc_diq.data(), sm90::acc_rows_by_cols(acc_diq.layout()));  // (2, Di/4)
    CUTE_UNROLL
    for (int r = 0; r < 2; ++r) {
      const int query = t0 + my_row[r];
      if (query >= T) continue;
      add_row_share(p.d_index_q + ((int64_t(b) * T + query) * p.num_kv_heads + g) * kDi, diq, ciq, r, iscale);
    }
  }

  // This half's d index_k (scaled), stored: no other CTA has these keys of kv head g.
  Tensor dik = make_tensor(acc_dik.data(), sm90::acc_rows_by_cols(acc_dik.layout()));  // (2, Di/4)
  CUTE_UNROLL
  for (int r = 0; r < 2; ++r) {
    const int key = key0 + get<0>(cik(r, 0));
    if (key >= T) continue;
    float* out = p.d_index_k + ((int64_t(b) * T + key) * p.num_kv_heads + g) * kDi;
    CUTE_UNROLL
    for (int j = 0; j < size<1>(dik); j += 2) {
      *reinterpret_cast<float2*>(out + get<1>(cik(r, j))) = make_float2(iscale * dik(r, j), iscale * dik(r, j + 1));
    }
  }
  // The value's share: the computing warps' sums, added in a fixed order.
  const int warp = threadIdx.x / 32 - 4;
  value = span_sum<32>(value);
  if (threadIdx.x % 32 == 0) smem.value[warp] = value;
  cutlass::arch::NamedBarrier(256, 2).arrive_and_wait();
  if (threadIdx.x == 128) {
    float sum = 0.0f;
    for (int w = 0; w < 8; ++w) sum += smem.value[w];
    p.value[(int64_t(b) * p.num_kv_heads + g) * gridDim.y + blockIdx.y] = sum;
  }
#endif
}

template <int kD, int kDi, class Element>
cudaError_t launch_dense(const DenseKLParams& p, cudaStream_t stream) {
  using Cfg = DenseConfig<kD, kDi, Element>;
  const int group = p.num_kv_heads > 0 ? p.num_q_heads / p.num_kv_heads : 0;
  const int64_t tiles = (int64_t(p.seq_len) + kBlock - 1) / kBlock;
  // TMA needs 16-byte aligned bases; the float2 stores and adds 8-byte aligned rows.
  for (const void* ptr : {p.q, p.k, p.index_q, p.index_k, static_cast<const void*>(p.d_index_q),
                          static_cast<const void*>(p.d_index_k)}) {
    if (!sm90::aligned16(ptr)) return cudaErrorInvalidValue;
  }
  if (p.lse == nullptr || p.ilse == nullptr || p.value == nullptr || p.head_dim != kD || p.index_head_dim != kDi ||
      group < 1 || group * p.num_kv_heads != p.num_q_heads || p.batch < 1 || p.batch > 65535 ||
      p.num_kv_heads > 65535 || p.seq_len < 1 || tiles > 65535 || !(p.softmax_scale > 0.0f) ||
      !(p.index_softmax_scale > 0.0f)) {
    return cudaErrorInvalidValue;
  }
  DenseKernelArgs<Cfg> args{p, Cfg::make_tma_q(p), Cfg::make_tma_k(p), Cfg::make_tma_iq(p), Cfg::make_tma_ik(p)};
  auto* kernel = &dense_kl_kernel<Cfg>;
  constexpr int smem_bytes = sizeof(typename Cfg::SharedStorage);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) return err;
  dim3 grid(p.num_kv_heads, static_cast<unsigned>(tiles), p.batch);
  kernel<<<grid, kThreads, smem_bytes, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace msa::kl_sm90
