// The KL gradient pass for SM90 (`kl_grad_kernel`): cuda/kernels/kl_sm90.cuh describes the
// passes and launches this kernel for KLPass::kGradient.
#pragma once

#include "kl_sm90_common.cuh"

namespace msa::kl_sm90 {

// The gradient pass, laid out as the dense-mode kernel (dense_kl_sm90.cuh): the item's
// entries are cut into batches of 64 tokens, and a batch takes G teacher steps, one per head
// h of the group, each over the batch's 64 tokens as matrix rows: S = Q_h Kᵀ and
// P̄ += exp(s S - lse_h) in registers. Every head has the same (token, key) layout, so the sum
// over the group takes no shuffles and no shared memory, and no row is padding whatever G is.
// Then the batch's student step (U, du, the value terms and both products) runs over the same
// 64 rows. Step c is head c % G of batch c / G; its gathering warp loads the 64 tokens' q rows
// of that head and their lse, and (at h = 0) the batch's index_q rows and token info into
// buffer batch % 2.
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
  const int n_batches = (count + kRows - 1) / kRows;
  const int n_steps = n_batches * group;

  const int warp_group = threadIdx.x / 128;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  // No padding rows (slots = G), and every index_q row of a batch is written (zero past the
  // item's entries) before its student step reads it: nothing to zero.
  kl_prologue<Cfg>(smem, group, /*slots=*/group, /*zero_iq=*/false);

  Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Cfg::SmemLayoutQ{});
  Tensor sIQ = make_tensor(make_smem_ptr(smem.iq.data()), typename Cfg::SmemLayoutIQ{});
  if (warp_group == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Cfg::kLoadRegisters>();
    if (warp == 0 && lane == 0) load_tile(args, smem, tile, g, b);
    if (warp >= kStages) return;
    const Element* q = static_cast<const Element*>(p.q) + int64_t(b) * p.q_len * p.num_q_heads * kD;
    const IndexElement* iq =
        static_cast<const IndexElement*>(p.index_q) + int64_t(b) * p.q_len * p.num_kv_heads * kDi;
    const float* lse = p.lse + int64_t(b) * p.q_len * p.num_q_heads;
    for (int c = warp; c < n_steps; c += kStages) {
      const int s = c % kStages;
      const int batch = c / group, h = c % group, buf = batch % kBatchBuffers;
      int src_q[2];
      float lse_log2[2];
      RowEntry entry[2];
      CUTE_UNROLL
      for (int i = 0; i < 2; ++i) {
        // Row r: the batch's token r (one row per token: the row mapping of G = 1).
        entry[i] = row_entry(p, b, g, start, count, 1, batch, lane + 32 * i);
        const int row = entry[i].query < 0 ? -1 : (p.q_base + entry[i].query) * p.num_q_heads + g * group + h;
        src_q[i] = row;
        lse_log2[i] = row < 0 ? 0.0f : lse[row] * float(M_LOG2E);
      }
      cutlass::arch::ClusterBarrier::wait(&smem.empty[s], ((c / kStages) & 1) ^ 1);
      CUTE_UNROLL
      for (int i = 0; i < 2; ++i) smem.lse_log2[s][lane + 32 * i] = lse_log2[i];
      gather_rows<Cfg::kChunks>(sQ(_, _, s), q, kD, src_q, lane);
      if (h == 0) {
        // The batch's tokens, once per G steps: read after the q gathers are issued.
        int src_iq[2];
        TokenInfo token[2];
        CUTE_UNROLL
        for (int i = 0; i < 2; ++i) {
          const RowEntry e = entry[i];
          src_iq[i] = e.query < 0 ? -1 : (p.q_base + e.query) * p.num_kv_heads + g;
          token[i] = e.query < 0 ? TokenInfo{0.0f, -1, -1, -1}
                                 : TokenInfo{p.ilse[int64_t(b) * p.q_len * p.num_kv_heads + src_iq[i]],
                                             row_last_visible(p, b, e), e.query, e.query * p.top_k + e.slot};
        }
        if (batch >= kBatchBuffers) {  // the buffer's last batch is read
          const int last = batch - kBatchBuffers;
          cutlass::arch::ClusterBarrier::wait(&smem.batch_empty[last % kStages], (last / kStages) & 1);
        }
        CUTE_UNROLL
        for (int i = 0; i < 2; ++i) smem.tokens[buf][lane + 32 * i] = token[i];
        gather_rows<Cfg::kIChunks>(sIQ(_, _, buf), iq, kDi, src_iq, lane);
      }
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
  const int my_row[2] = {get<0>(cs(0, 0)), get<0>(cs(1, 0))};  // token rows of every step and batch
  const cutlass::arch::NamedBarrier warpgroup_sync(128, half);  // this warpgroup only

  // P̄ (the group's sum until the student step) in the (token, key) view of an S accumulator.
  Tensor acc_shape = partition_fragment_C(mma_s, Shape<Int<kRows>, Int<kHalf>>{});
  Tensor pbar = make_tensor_like(make_tensor(acc_shape.data(), sm90::acc_rows_by_cols(acc_shape.layout())));
  constexpr int kCols = decltype(size<1>(pbar))::value;  // a row's keys in this thread: 16

  // A row of a token's d index_q and value terms: a slot partial (deterministic) or the
  // token's own row.
  auto token_out_row = [&](int query, int part_row) {
    return p.deterministic ? (int64_t(b) * p.num_entries + part_row) * p.num_kv_heads + g
                           : (int64_t(b) * p.q_len + p.q_base + query) * p.num_kv_heads + g;
  };
  // Step c's S = Q_h Kᵀ (stage c % kStages, once gathered) issued into acc and committed.
  auto issue_s = [&](int c, auto& acc) {
    cutlass::arch::ClusterBarrier::wait(&smem.full[c % kStages], (c / kStages) & 1);
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    gemm_overwrite(mma_s, tSrQ(_, _, _, c % kStages), tSrK, acc);
    warpgroup_commit_batch();
  };
  // Teacher step c on acc (S complete), in the batch whose steps end before c_end: step c + 1's
  // S is issued into acc_next first and waited for at the end, so the tensor cores run it under
  // this step's exps while no wgmma is in flight across a loop edge (ptxas serialised every
  // wgmma (C7514) when one was). `which` only makes the two calls below distinct
  // instantiations, each inlined once (one instantiation called twice was compiled as a call
  // with the accumulators on the stack). Keys past a token's last visible one are masked in
  // the student step (they are the same for every head).
  auto step = [&](int c, auto which, auto& acc, auto& acc_next, int c_end) {
    const int s = c % kStages;
    const float lse_row[2] = {smem.lse_log2[s][my_row[0]], smem.lse_log2[s][my_row[1]]};
    if (c + 1 < c_end) issue_s(c + 1, acc_next);
    cutlass::arch::ClusterBarrier::arrive(&smem.empty[s]);  // q and the rows' lse are read
    Tensor sv = make_tensor(acc.data(), sm90::acc_rows_by_cols(acc.layout()));
    CUTE_UNROLL
    for (int i = 0; i < 2; ++i) {
      CUTE_UNROLL
      for (int j = 0; j < kCols; ++j) pbar(i, j) += exp2f(sv(i, j) * scale_log2 - lse_row[i]);
    }
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_next);
  };

  cutlass::arch::ClusterTransactionBarrier::wait(&smem.tile_full, 0);
  for (int batch = 0; batch < n_batches; ++batch) {
    const int c0 = batch * group;
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
        step(c0 + h, _0{}, acc_a, acc_b, c_end);
        if (h + 1 < group) step(c0 + h + 1, _1{}, acc_b, acc_a, c_end);
      }
    }

    // The student step over the batch's 64 tokens (index_q and the token info arrived with the
    // batch's first step): U = IQ Kiᵀ, du = R - P̄ and the value terms, then d index_k += duᵀ IQ
    // and this half's d index_q share = du Ki.
    const int buf = batch % kBatchBuffers;
    Tensor acc_u = partition_fragment_C(mma_u, Shape<Int<kRows>, Int<kHalf>>{});
    warpgroup_fence_operand(acc_u);
    warpgroup_arrive();
    gemm_overwrite(mma_u, tUrIQ(_, _, _, buf), tUrIK, acc_u);
    warpgroup_commit_batch();
    // Every warp of this warpgroup is past the last batch's products, which read du.
    warpgroup_sync.arrive_and_wait();
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_u);
    Tensor us = make_tensor(acc_u.data(), sm90::acc_rows_by_cols(acc_u.layout()));
    TokenInfo token[2];
    CUTE_UNROLL
    for (int i = 0; i < 2; ++i) {
      token[i] = smem.tokens[buf][my_row[i]];
      const int visible = min(max(token[i].last - key0 + 1, 0), kHalf);
      float u[kCols], pm[kCols];
      bool ok[kCols];
      CUTE_UNROLL
      for (int j = 0; j < kCols; ++j) {
        const int key = get<1>(cs(i, j));
        ok[j] = key < visible;
        u[j] = us(i, j) * iscale;
        pm[j] = ok[j] ? pbar(i, j) * inv_group : 0.0f;  // a select: masked sums may be inf
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
    cutlass::arch::ClusterBarrier::arrive(&smem.batch_empty[batch % kStages]);  // index_q and the tokens are read

    // This half's share of each token's d index_q, scaled, added to its row.
    Tensor diq = make_tensor(acc_diq.data(), sm90::acc_rows_by_cols(acc_diq.layout()));  // (2, Di/4)
    CUTE_UNROLL
    for (int i = 0; i < 2; ++i) {
      if (token[i].query < 0) continue;
      add_row_share(p.d_index_q + token_out_row(token[i].query, token[i].part_row) * kDi, diq, ciq, i, iscale);
    }
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
