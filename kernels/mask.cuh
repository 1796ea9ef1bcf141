// seqpar: which keys a query sees, by global position (the rule of seqpar/masks.py).
//
// Every mask gives the query at global position p one interval of visible keys,
//   lo(p) = max(p - left, start of p's document),  hi(p) = min(p + right, end of it - 1)
// (right is 0 when causal; "unbounded" is a large sentinel), and both ends never
// decrease with p. A block of consecutive rows against keys [n0, n1) is therefore
// hidden, full or partial from its first and last rows alone. Kernels store each
// row's interval, in LOCAL key indices clamped to [0, Sk) of the batch row, in
// shared memory once per block, and read them only in partial tiles.
#pragma once

#include "common.cuh"

struct MaskArgs {
  long long q_off;         // global position of query row 0
  long long k_off;         // global position of key row 0
  long long left, right;   // window bounds (right already 0 when causal)
  const long long* docs;   // document starts then the total, or nullptr
  int ndocs;               // number of documents (docs has ndocs + 1 entries)
};

// Global visible interval [lo, hi] of the query at global position p.
DEVI void mask_bounds(const MaskArgs& m, long long p, long long& lo, long long& hi) {
  lo = p - m.left;
  hi = p + m.right;
  if (m.docs != nullptr) {
    int a = 0, b = m.ndocs;  // docs[a] <= p < docs[b]
    while (b - a > 1) {
      const int c = (a + b) >> 1;
      if (m.docs[c] <= p) a = c; else b = c;
    }
    if (m.docs[a] > lo) lo = m.docs[a];
    if (m.docs[a + 1] - 1 < hi) hi = m.docs[a + 1] - 1;
  }
}

// Visible keys of local query row `row` as local key indices [lo, hi], clamped to
// [0, Sk - 1]; lo > hi when it sees none.
DEVI void row_interval(const MaskArgs& m, int row, int Sk, int& lo, int& hi) {
  long long l, h;
  mask_bounds(m, m.q_off + row, l, h);
  l -= m.k_off;
  h -= m.k_off;
  lo = l < 0 ? 0 : (l > Sk ? Sk : (int)l);
  hi = h < -1 ? -1 : (h >= Sk ? Sk - 1 : (int)h);
}

// Local interval of rows m0 .. m0 + rows - 1 into s_lo / s_hi (all threads of the
// block take part; a barrier must follow). Rows past Sq repeat the last row, so the
// block's last row is always row rows - 1. Empty intervals have lo > hi.
DEVI void fill_row_bounds(int* s_lo, int* s_hi, const MaskArgs& m, int m0, int rows, int Sq,
                          int Sk) {
  for (int r = threadIdx.x; r < rows; r += blockDim.x)
    row_interval(m, m0 + r < Sq ? m0 + r : Sq - 1, Sk, s_lo[r], s_hi[r]);
}

// Does any key of [n0, n1) need masking for rows r0..r1 (local), given the bounds?
DEVI bool tile_partial(const int* s_lo, const int* s_hi, int r0, int r1, int n0, int n1) {
  return s_lo[r1] > n0 || s_hi[r0] < n1 - 1;
}

// First and last query row (local) whose visible interval meets keys [n0, n1];
// last < first when none does. Bounds are non-decreasing in the row.
DEVI void query_span(const MaskArgs& m, int Sq, int n0, int n1, int& first, int& last) {
  long long lo, hi;
  int a = 0, b = Sq;  // first row with hi >= n0 (global), as local key index
  while (a < b) {
    const int c = (a + b) >> 1;
    mask_bounds(m, m.q_off + c, lo, hi);
    if (hi - m.k_off >= n0) b = c; else a = c + 1;
  }
  first = a;
  a = -1;
  b = Sq - 1;  // last row with lo <= n1
  while (a < b) {
    const int c = (a + b + 1) >> 1;
    mask_bounds(m, m.q_off + c, lo, hi);
    if (lo - m.k_off <= n1) a = c; else b = c - 1;
  }
  last = a;
}
