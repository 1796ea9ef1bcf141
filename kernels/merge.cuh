// seqpar: the merge of partial attention results (seqpar/merge.py), in double.
//
// A running (out_old, lse_old) and this block's (o / l, lse_new) combine as
//   out = w_old * out_old + w_new * o / l,   w from the gap lse_new - lse_old:
//   e = exp(-|gap|), the larger side gets 1 / (1 + e), the other e / (1 + e),
// so the weights lie in [0, 1] and sum to one, and lse = max + log1p(e). The lse is
// carried in double: a float lse of magnitude 1e5 is known only to 0.01.
#pragma once

#include "common.cuh"

DEVI double lse_of(float m_log2, float l) {  // m in log2 units, l = sum of exp2(s - m)
  return (double)m_log2 * 0.69314718055994530942 + log((double)l);
}

// Weights for the old output and for this block's unnormalised accumulator (times
// inv_l), and the merged lse. lse_old = -inf: the block alone.
DEVI void merge_weights(double lse_old, double lse_new, float inv_l, float& w_old,
                        float& w_new, double& lse_out) {
  if (lse_old == -__longlong_as_double(0x7ff0000000000000LL)) {
    w_old = 0.f;
    w_new = inv_l;
    lse_out = lse_new;
    return;
  }
  const double gap = lse_new - lse_old;
  const double e = exp(-fabs(gap));
  const double big = 1.0 / (1.0 + e), small = e * big;
  w_old = (float)(gap > 0 ? small : big);
  w_new = (float)(gap > 0 ? big : small) * inv_l;
  lse_out = (gap > 0 ? lse_new : lse_old) + log1p(e);
}
