// Paged index scan for SM90: the decode indexer of paged_select_blocks (spec, "Inference").
//
// Decode has few query rows (T tokens x Hkv groups: 4 at T = 1, Hkv = 4) against a long paged
// cache, so the work is reading the index keys once, near HBM bandwidth: a stream, not a GEMM.
// The sequence is split so that every SM has work at batch 1: one CTA per (split of logical
// pages, tile of up to 64 query rows, batch row). A CTA streams its pages, in page-table order,
// through a ring of shared-memory stages filled by cp.async (several pages in flight), scores
// each page against its rows with mma.sync m16n8k16 (rows padded to 16, the MMA's M: wgmma's 64
// would be mostly padding), max-pools the page per row and offers it to each row whose local
// page lies after it, into the row's running top-(top_k - 1) (running_topk.cuh). At the end it
// writes its rows' unranked lists (score, logical page id); msa_jax/paged_scan.py merges the
// splits' lists and appends the local page.
//
// Semantics as msa_jax/pallas/paged_indexer.py's: row r = t * Hkv + g; only pages strictly before
// a row's local page are candidates, and all of them are fully written, so no key is masked;
// page score = max over the page's keys of si * <index_q, index_k>; FP8 E4M3 keys are converted
// to the queries' dtype (exact) and each score column is multiplied by its token's scale, after
// si; page-table entries are clamped into [0, P), so no int32 content reads outside the pages.
//
// Per page, each of the 4 warps owns 32 keys (4 n-tiles of 8) for all the CTA's rows. Key rows
// land in shared memory as 16-byte chunks; in an n-tile, lane (n = lane / 4, c = lane % 4)
// reads chunks c, c + 4, ... of key n with 16-byte loads, converts FP8 to 16 bits in registers,
// and uses what it holds directly as its B fragments. That fixes which Di element feeds which
// k slot of the MMA (`first_element`); the queries' A fragments are laid out in shared memory
// once per CTA with the same permutation, so the dot products are the same sums. The row
// maxima of the 4 warps meet in shared memory; one thread per row offers the page.
#pragma once

#include <cuda_fp8.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm80.hpp>
#include <cutlass/numeric_types.h>

#include "msa/params.h"
#include "running_topk.cuh"
#include "sm90_common.cuh"

namespace msa::paged_indexer_sm90 {

constexpr int kPage = 128;  // keys per page (page size = block size = 128)
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kKeysPerWarp = kPage / kWarps;
constexpr int kNTiles = kKeysPerWarp / 8;  // n-tiles of the m16n8k16 MMA per warp and page
constexpr int kMaxRows = 64;                // query rows (tokens x groups) per CTA
constexpr int kMaxMTiles = kMaxRows / 16;
static_assert(kMaxRows <= kThreads, "one thread owns each row's running top-k");

// Ring depth: about 96 KB of pages, at least 3 stages (two pages in flight while one is scored),
// so that two CTAs fit on an SM at decode sizes (the rest of shared memory is a few KB there).
constexpr int stages_for(int stage_bytes) {
  const int n = 96 * 1024 / stage_bytes;
  return n < 3 ? 3 : n > 8 ? 8 : n;
}

template <int kDi_, class Element_, bool kFp8Keys_>
struct Config {
  static constexpr int kDi = kDi_;
  static constexpr bool kFp8Keys = kFp8Keys_;  // keys FP8 E4M3 with per-token scales, else Element
  using Element = Element_;                   // of index_q: bfloat16 or float16 (fp32 accumulation)
  using Mma = std::conditional_t<std::is_same_v<Element, cutlass::bfloat16_t>, cute::SM80_16x8x16_F32BF16BF16F32_TN,
                                 cute::SM80_16x8x16_F32F16F16F32_TN>;
  static constexpr int kKeyBytes = kFp8Keys ? 1 : 2;
  static constexpr int kChunkElems = 16 / kKeyBytes;      // key elements per 16-byte chunk
  static constexpr int kChunks = kDi / kChunkElems;        // chunks per key row
  static constexpr int kChunksPerLane = kChunks / 4;       // a lane reads chunks c, c + 4, ...
  static constexpr int kStepsPerChunk = kChunkElems / 4;  // each k step takes 4 elements of a lane
  static constexpr int kKSteps = kDi / 16;
  static constexpr int kPageBytes = kPage * kDi * kKeyBytes;
  static constexpr int kStageBytes = kPageBytes + (kFp8Keys ? kPage * 4 : 0);  // + the page's scales
  static constexpr int kStages = stages_for(kStageBytes);
  static_assert(kChunks % 4 == 0 && kKSteps == kChunksPerLane * kStepsPerChunk, "Di 64 or 128");
};

// The first of the 4 consecutive Di elements that lane slot c (lane % 4) gives k step `ks`:
// elements e = 0, 1 fill its k slots 2c, 2c + 1 and e = 2, 3 its slots 2c + 8, 2c + 9, for every
// row of A and every key of B alike. Over (ks, c, e) this is a permutation of 0 .. Di - 1.
template <class Cfg>
__device__ __forceinline__ int first_element(int ks, int c) {
  return (c + 4 * (ks / Cfg::kStepsPerChunk)) * Cfg::kChunkElems + 4 * (ks % Cfg::kStepsPerChunk);
}

// Where chunk `chunk` of key `key` sits in its shared-memory row. An 8-lane phase of a 16-byte
// load reads two keys (n, n + 1) x four chunks; with rows of 128 or 256 bytes both keys would hit
// the same banks, so odd keys flip chunk bit 2 (the other half of the banks). 64-byte rows put
// the two keys in different halves already.
template <class Cfg>
__device__ __forceinline__ int chunk_slot(int key, int chunk) {
  if constexpr (Cfg::kChunks >= 8) {
    return chunk ^ ((key & 1) << 2);
  } else {
    return chunk;
  }
}

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  cute::SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>::copy(*static_cast<const cute::uint128_t*>(gmem),
                                                        *static_cast<cute::uint128_t*>(smem));
}

// Shared memory of one CTA: the ring of pages, then what depends on the call: the A fragments
// of its rows, the warps' row maxima of two pages (double-buffered, so one barrier per page
// suffices) and the rows' running top-k. Offsets in bytes, all multiples of 16.
struct SmemLayout {
  int a_frag;
  int row_max;
  int top_score;
  int top_id;
  int bytes;
};

// Every CTA pads its rows to the m-tiles of the first (full) row tile: one size for the launch.
__host__ __device__ inline int m_tiles_for(int rows) {
  const int m = (rows + 15) / 16;
  return m < kMaxMTiles ? m : kMaxMTiles;
}

// An odd row stride: the owner threads of consecutive rows hit different banks.
__host__ __device__ inline int top_stride(int top_k) { return (top_k - 1) | 1; }

template <class Cfg>
__host__ __device__ inline SmemLayout smem_layout(int m_tiles, int stride) {
  const int rows = m_tiles * 16;
  SmemLayout l;
  l.a_frag = Cfg::kStages * Cfg::kStageBytes;
  l.row_max = l.a_frag + m_tiles * Cfg::kKSteps * 32 * 16;
  l.top_score = l.row_max + 2 * kWarps * rows * 4;
  l.top_id = l.top_score + (rows * stride * 4 + 15) / 16 * 16;
  l.bytes = l.top_id + rows * stride * 4;
  return l;
}

// The CTA's rows' A fragments in shared memory, [m-tile][k step][lane] x 16 bytes, in the order
// a lane's mma.sync reads them (one conflict-free 16-byte load per k step): rows g and g + 8 of
// the m-tile (g = lane / 4), the 4 elements first_element(ks, lane % 4) on; rows past the last
// are zeros.
template <class Cfg>
__device__ void stage_queries(const PagedIndexerParams& p, int b, int row0, int m_tiles, uint4* a_frag) {
  using Element = typename Cfg::Element;
  const int rows = p.q_len * p.num_kv_heads;
  const Element* q = static_cast<const Element*>(p.index_q) + int64_t(b) * rows * Cfg::kDi;
  auto four = [&](int row, int d) {  // elements d .. d + 3 of a row as two packed pairs
    return row < rows ? *reinterpret_cast<const uint2*>(q + int64_t(row) * Cfg::kDi + d) : make_uint2(0, 0);
  };
  for (int x = threadIdx.x; x < m_tiles * Cfg::kKSteps * 32; x += kThreads) {
    const int lane = x % 32, ks = x / 32 % Cfg::kKSteps, m = x / (32 * Cfg::kKSteps);
    const int d = first_element<Cfg>(ks, lane % 4);
    const int row = row0 + m * 16 + lane / 4;
    const uint2 top = four(row, d), bottom = four(row + 8, d);
    a_frag[x] = make_uint4(top.x, bottom.x, top.y, bottom.y);  // a0a1, a2a3, a4a5, a6a7
  }
}

// Starts the copy of physical page `phys` (and its scales) into a ring stage.
template <class Cfg>
__device__ __forceinline__ void load_page(const PagedIndexerParams& p, int phys, char* stage) {
  const char* keys = static_cast<const char*>(p.index_k) + int64_t(phys) * Cfg::kPageBytes;
  static_assert(kPage * Cfg::kChunks % kThreads == 0);
  CUTE_UNROLL
  for (int x = threadIdx.x; x < kPage * Cfg::kChunks; x += kThreads) {
    const int key = x / Cfg::kChunks, chunk = x % Cfg::kChunks;
    cp_async_16(stage + (key * Cfg::kChunks + chunk_slot<Cfg>(key, chunk)) * 16, keys + int64_t(x) * 16);
  }
  if constexpr (Cfg::kFp8Keys) {
    constexpr int kScaleChunks = kPage * 4 / 16;
    if (threadIdx.x < kScaleChunks) {
      const char* scales = reinterpret_cast<const char*>(p.index_k_scale) + int64_t(phys) * kPage * 4;
      cp_async_16(stage + Cfg::kPageBytes + threadIdx.x * 16, scales + threadIdx.x * 16);
    }
  }
}

// Two E4M3 values (the low byte first) as a packed pair of Element, exactly.
template <class Element>
__device__ __forceinline__ uint32_t widen_fp8x2(uint32_t two) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two), __NV_E4M3);
  if constexpr (std::is_same_v<Element, cutlass::half_t>) {
    return uint32_t(h.x) | (uint32_t(h.y) << 16);
  } else {
    const __nv_bfloat162 bf = __float22bfloat162_rn(__half22float2(__half2(h)));
    return *reinterpret_cast<const uint32_t*>(&bf);
  }
}

// This lane's B fragments of the warp's n-tiles of one page: b[nt][ks] = {b0b1, b2b3}.
template <class Cfg>
__device__ __forceinline__ void load_b(const char* stage, int warp, int lane, uint32_t (&b)[kNTiles][Cfg::kKSteps][2]) {
  CUTE_UNROLL
  for (int nt = 0; nt < kNTiles; ++nt) {
    const int key = warp * kKeysPerWarp + nt * 8 + lane / 4;
    const char* row = stage + key * Cfg::kChunks * 16;
    CUTE_UNROLL
    for (int i = 0; i < Cfg::kChunksPerLane; ++i) {
      const uint4 v = *reinterpret_cast<const uint4*>(row + chunk_slot<Cfg>(key, lane % 4 + 4 * i) * 16);
      const uint32_t w[4] = {v.x, v.y, v.z, v.w};
      CUTE_UNROLL
      for (int s = 0; s < Cfg::kStepsPerChunk; ++s) {
        const int ks = i * Cfg::kStepsPerChunk + s;
        if constexpr (Cfg::kFp8Keys) {  // one word = 4 elements of one k step
          b[nt][ks][0] = widen_fp8x2<typename Cfg::Element>(w[s] & 0xffffu);
          b[nt][ks][1] = widen_fp8x2<typename Cfg::Element>(w[s] >> 16);
        } else {  // two words = 4 elements of one k step
          b[nt][ks][0] = w[2 * s];
          b[nt][ks][1] = w[2 * s + 1];
        }
      }
    }
  }
}

// Scores one page against the CTA's rows: S = Q Kᵀ over the warp's 32 keys per m-tile, the row
// maxima of si * S (times each key's scale for FP8) reduced over the quad's lanes, then written
// per warp: row_max[warp][row].
template <class Cfg>
__device__ void score_page(const char* stage, const uint4* a_frag, int m_tiles, int rows_pad, float scale,
                           float* row_max) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  uint32_t b[kNTiles][Cfg::kKSteps][2];
  load_b<Cfg>(stage, warp, lane, b);
  // FP8: the scales of this lane's accumulator columns (keys 2c, 2c + 1 of each n-tile).
  float2 key_scale[kNTiles];
  if constexpr (Cfg::kFp8Keys) {
    const float* scales = reinterpret_cast<const float*>(stage + Cfg::kPageBytes);
    CUTE_UNROLL
    for (int nt = 0; nt < kNTiles; ++nt) {
      key_scale[nt] = *reinterpret_cast<const float2*>(scales + warp * kKeysPerWarp + nt * 8 + 2 * (lane % 4));
    }
  }
#pragma unroll 1
  for (int m = 0; m < m_tiles; ++m) {
    float acc[kNTiles][4] = {};
    CUTE_UNROLL
    for (int ks = 0; ks < Cfg::kKSteps; ++ks) {
      const uint4 a = a_frag[(m * Cfg::kKSteps + ks) * 32 + lane];
      CUTE_UNROLL
      for (int nt = 0; nt < kNTiles; ++nt) {
        float* d = acc[nt];
        Cfg::Mma::fma(d[0], d[1], d[2], d[3], a.x, a.y, a.z, a.w, b[nt][ks][0], b[nt][ks][1], d[0], d[1], d[2], d[3]);
      }
    }
    // acc[nt] = {row g: cols 2c, 2c + 1; row g + 8: cols 2c, 2c + 1}.
    float top = -INFINITY, bottom = -INFINITY;
    CUTE_UNROLL
    for (int nt = 0; nt < kNTiles; ++nt) {
      CUTE_UNROLL
      for (int e = 0; e < 2; ++e) {
        if constexpr (Cfg::kFp8Keys) {
          const float s = e == 0 ? key_scale[nt].x : key_scale[nt].y;
          top = fmaxf(top, scale * acc[nt][e] * s);
          bottom = fmaxf(bottom, scale * acc[nt][2 + e] * s);
        } else {
          top = fmaxf(top, acc[nt][e]);
          bottom = fmaxf(bottom, acc[nt][2 + e]);
        }
      }
    }
    CUTE_UNROLL
    for (int o = 1; o <= 2; o *= 2) {
      top = fmaxf(top, __shfl_xor_sync(0xffffffff, top, o));
      bottom = fmaxf(bottom, __shfl_xor_sync(0xffffffff, bottom, o));
    }
    if (lane % 4 == 0) {
      // 16-bit keys: si * max = max of si * S (a positive scale keeps the order under rounding).
      if constexpr (!Cfg::kFp8Keys) {
        top *= scale;
        bottom *= scale;
      }
      float* out = row_max + warp * rows_pad + m * 16 + lane / 4;
      out[0] = top;
      out[8] = bottom;
    }
  }
}

// The largest local page among the rows of the tile (each warp finds it alone): no row has a
// candidate page at or past it.
__device__ __forceinline__ int tile_stop(const PagedIndexerParams& p, int b, int row0, int rows) {
  int stop = 0;
  for (int r = row0 + threadIdx.x % 32; r < row0 + kMaxRows && r < rows; r += 32) {
    stop = max(stop, p.local_page[int64_t(b) * p.q_len + r / p.num_kv_heads]);
  }
  return min(__reduce_max_sync(0xffffffff, stop), p.max_pages);
}

template <class Cfg>
__global__ void __launch_bounds__(kThreads) paged_indexer_kernel(const __grid_constant__ PagedIndexerParams p) {
  extern __shared__ __align__(128) char smem[];
  const int split = blockIdx.x, b = blockIdx.z;
  const int rows = p.q_len * p.num_kv_heads;
  const int row0 = blockIdx.y * kMaxRows;
  const int m_tiles = m_tiles_for(rows);
  const int rows_pad = m_tiles * 16;
  const int keep = p.top_k - 1, stride = top_stride(p.top_k);
  const SmemLayout layout = smem_layout<Cfg>(m_tiles, stride);
  auto* a_frag = reinterpret_cast<uint4*>(smem + layout.a_frag);
  auto* row_max = reinterpret_cast<float*>(smem + layout.row_max);
  auto stage = [&](int i) { return smem + (i % Cfg::kStages) * Cfg::kStageBytes; };

  // Thread t < rows_pad owns row row0 + t: its local page, clamped into [-1, max_pages] so that
  // any int32 content keeps every page it is offered inside the page table.
  const int t = threadIdx.x;
  const bool owner = t < rows_pad;
  int local = -1;
  if (owner && row0 + t < rows) {
    local = min(max(p.local_page[int64_t(b) * p.q_len + (row0 + t) / p.num_kv_heads], -1), p.max_pages);
  }
  const int row = owner ? t : 0;
  RunningTopK top(reinterpret_cast<float*>(smem + layout.top_score) + row * stride,
                  reinterpret_cast<int*>(smem + layout.top_id) + row * stride, owner ? keep : 0);

  // This split's pages: [lo, lo + n), none at or past the tile's largest local page.
  const int lo = split * p.pages_per_split;
  const int n = max(0, min(lo + p.pages_per_split, tile_stop(p, b, row0, rows)) - lo);
  const int32_t* table = p.page_table + int64_t(b) * p.max_pages + lo;
  auto physical = [&](int i) { return min(max(__ldg(table + i), 0), p.num_pages - 1); };
  // Page lo + i was scored into row_max[i % 2]: each row after it takes the max of the warps'.
  auto offer = [&](int i) {
    if (lo + i < local) {
      const float* m = row_max + (i & 1) * kWarps * rows_pad + t;
      float s = m[0];
      CUTE_UNROLL
      for (int w = 1; w < kWarps; ++w) s = fmaxf(s, m[w * rows_pad]);
      top.offer(s, lo + i);
    }
  };

  if (n > 0) {
    for (int i = 0; i < Cfg::kStages - 1; ++i) {
      if (i < n) load_page<Cfg>(p, physical(i), stage(i));
      cute::cp_async_fence();
    }
    // While the first pages are in flight; visible after the loop's first barrier.
    stage_queries<Cfg>(p, b, row0, m_tiles, a_frag);
    // The physical id of the next page to load, read one iteration early: its load is then off
    // the path from one page's barrier to the next.
    int ahead = Cfg::kStages - 1 < n ? physical(Cfg::kStages - 1) : 0;
    for (int i = 0; i < n; ++i) {
      cute::cp_async_wait<Cfg::kStages - 2>();  // this thread's copies of page i have landed
      __syncthreads();                          // everyone's have; page i - 1's stage is free
      if (i > 0) offer(i - 1);
      const int next = i + Cfg::kStages - 1;
      if (next < n) {
        load_page<Cfg>(p, ahead, stage(next));
        if (next + 1 < n) ahead = physical(next + 1);
      }
      cute::cp_async_fence();
      score_page<Cfg>(stage(i), a_frag, m_tiles, rows_pad, p.index_softmax_scale,
                      row_max + (i & 1) * kWarps * rows_pad);
    }
    __syncthreads();
    offer(n - 1);
  }

  if (owner && row0 + t < rows) {
    const int64_t at = ((int64_t(b) * rows + row0 + t) * p.splits + split) * keep;
    top.write_unranked(p.scores + at, p.ids + at);
  }
}

template <int kDi, class Element, bool kFp8Keys>
cudaError_t launch(const PagedIndexerParams& p, cudaStream_t stream) {
  using Cfg = Config<kDi, Element, kFp8Keys>;
  // The kernel's 16-byte copies and 8-byte query loads need aligned bases (every row and page
  // stride is a multiple of 16 bytes); refuse rather than fault.
  if (!sm90::aligned16(p.index_q) || !sm90::aligned16(p.index_k) ||
      (kFp8Keys != (p.index_k_scale != nullptr)) || (kFp8Keys && !sm90::aligned16(p.index_k_scale)) ||
      p.index_head_dim != kDi || p.page_size != kPage || p.top_k < 2 || p.batch < 1 || p.batch > 65535 ||
      p.q_len < 1 || p.num_kv_heads < 1 || p.num_pages < 1 || p.max_pages < 1 || p.splits < 1 ||
      p.pages_per_split < 1 || int64_t(p.splits) * p.pages_per_split < p.max_pages ||
      int64_t(p.splits) * p.pages_per_split > (int64_t(1) << 30)) {
    return cudaErrorInvalidValue;
  }
  const int64_t rows = int64_t(p.q_len) * p.num_kv_heads;
  const int64_t row_tiles = (rows + kMaxRows - 1) / kMaxRows;
  if (rows > (int64_t(1) << 30) || row_tiles > 65535) return cudaErrorInvalidValue;
  const SmemLayout layout = smem_layout<Cfg>(m_tiles_for(int(rows)), top_stride(p.top_k));
  auto* kernel = &paged_indexer_kernel<Cfg>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, layout.bytes);
  if (err != cudaSuccess) return err;
  dim3 grid(p.splits, unsigned(row_tiles), p.batch);
  kernel<<<grid, kThreads, layout.bytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace msa::paged_indexer_sm90
