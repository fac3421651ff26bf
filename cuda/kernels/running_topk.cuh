// The exp-free running top-(top_k - 1) one thread keeps for one query row, shared by the
// contiguous indexer (indexer_sm90.cuh), which ranks a row's final list itself, and the paged
// index scan (paged_indexer_sm90.cuh), which writes each split's list unranked for the merge in
// msa_jax/paged_scan.py.
#pragma once

#include <climits>
#include <cmath>
#include <cstdint>

namespace msa {

// The running top-(keep) of one query row over blocks offered in increasing id order.
// The entries (score, id) live in shared memory, one row per owner lane, so the common
// path (a compare against the cached minimum) costs two registers and the rare insertion
// needs no compile-time indexing. Unused entries are (-inf, kEmpty), so they are evicted
// first. A new block enters iff it scores strictly above the current minimum (an equal
// score loses: its id is larger); among minima the largest id is evicted. Both rules
// together give the spec's tie rule.
struct RunningTopK {
  static constexpr int kEmpty = INT_MAX;
  float* score;  // [keep] in shared memory, this row's
  int* id;
  int keep;
  float low;     // current minimum score (+inf when keep is 0: nothing ever enters)
  int low_slot;  // where it sits

  __device__ RunningTopK(float* score_row, int* id_row, int keep_) : score(score_row), id(id_row), keep(keep_) {
    for (int e = 0; e < keep; ++e) {
      score[e] = -INFINITY;
      id[e] = kEmpty;
    }
    low = keep > 0 ? -INFINITY : INFINITY;
    low_slot = 0;
  }

  __device__ void offer(float s, int block) {
    if (s > low) {
      score[low_slot] = s;
      id[low_slot] = block;
      low = INFINITY;
      int low_id = INT_MIN;
      for (int e = 0; e < keep; ++e) {
        const float se = score[e];
        const int ie = id[e];
        if (se < low || (se == low && ie > low_id)) {
          low = se;
          low_id = ie;
          low_slot = e;
        }
      }
    }
  }

  // Writes the spec's row: chosen ids by descending score (ties: smaller id), the local
  // block, then -1.
  __device__ void write_row(int32_t* out, int top_k, int local) const {
    int n = 0;
    for (int e = 0; e < keep; ++e) {
      const float se = score[e];
      const int ie = id[e];
      if (ie == kEmpty) continue;
      int rank = 0;
      for (int f = 0; f < keep; ++f) {
        rank += id[f] != kEmpty && (score[f] > se || (score[f] == se && id[f] < ie));
      }
      out[rank] = ie;
      ++n;
    }
    out[n] = local;
    for (int k = n + 1; k < top_k; ++k) out[k] = -1;
  }

  // Writes the `keep` entries as they lie, unused ones as (-inf, -1): a list over one range of
  // blocks, exact for that range, which a merge of several ranges' lists ranks (paged scan).
  __device__ void write_unranked(float* scores, int32_t* ids) const {
    for (int e = 0; e < keep; ++e) {
      scores[e] = score[e];
      ids[e] = id[e] == kEmpty ? -1 : id[e];
    }
  }
};

}  // namespace msa
