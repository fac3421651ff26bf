// The KL gradient pass for SM90 (`kl_grad_kernel`): cuda/kernels/kl_sm90.cuh describes the
// passes and launches this kernel for KLPass::kGradient.
#pragma once

#include "kl_sm90_common.cuh"

namespace msa::kl_sm90 {

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
    student_products(mma_dik, mma_diq, products, buf, acc_dik, acc_diq);
    cutlass::arch::ClusterBarrier::arrive(&smem.batch_empty[batch % kStages]);  // index_q and the rows' info are read

    // This half's share of each token's d index_q, scaled, added to its row.
    Tensor diq = make_tensor(acc_diq.data(), sm90::acc_rows_by_cols(acc_diq.layout()));  // (2, Di/4)
    CUTE_UNROLL
    for (int i = 0; i < 2; ++i) {
      if (token[i].query < 0) continue;
      add_row_share(p.d_index_q + token_out_row(token[i].query, token[i].part_row) * kDi, diq, ciq, i, iscale);
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

}  // namespace msa::kl_sm90
