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
// entries that selected it. K and the tile's index keys are loaded once (TMA). A value-pass teacher step
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
//   The gradient pass (`kl_grad_kernel`, kl_grad_sm90.cuh) lays its rows out as the dense-mode
// kernel does instead: a batch of 64 tokens, one per matrix row, takes G teacher steps (one per
// head, P̄ summed in registers, no reduce-scatter and no padding rows), then one student step
// over the same rows: U = IQ Kiᵀ, du = R - P̄ (written to shared memory in the index dtype) and
// both products, d index_q = du Ki and d index_k = duᵀ IQ.
// Roles as in the backward (attention_bwd_sm90.cuh): warpgroup 0 gathers q and index_q rows by
// cp.async (warp w < kStages fills steps w, w + kStages, ...; lane 0 of warp 0 issues the
// TMA); warpgroups 1 and 2 each own one 64-key half of the tile and take every step.
#pragma once

#include "kl_grad_sm90.cuh"
#include "kl_sm90_common.cuh"

namespace msa::kl_sm90 {

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
