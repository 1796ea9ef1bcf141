// seqpar: attention for few queries against many keys (decoding), split over keys.
//
// One block per (key split, batch x K/V head). Its rows are every query token of
// the batch row times every query head that reads this K/V head ((query i, head g)
// -> row i * G + g), so each K/V byte leaves memory once for all of them. Warps are
// WR row groups of 16 rows times WK key groups: each warp runs an online softmax
// over its share of every key tile with mma.sync (fp32 accumulation), the K/V tiles
// stream through an ST-stage cp.async ring shared by the block, and at the end the
// key groups merge in shared memory. Each split writes its normalised partial
// (o, lse) to a workspace; the block that finishes last of its (batch, K/V head)
// (a counter per pair, reset by that block for the next launch) merges the splits
// in a fixed order (deterministic, whichever block it is) with the convex merge of
// kernels/merge.cuh, into out and lse (accumulating into them when asked, as the
// ring does). One launch: a decode call costs the host one kernel launch.
//
// Layout: q (B, Sq, Hq, D), k/v (B, Sk, Hk, D), element strides for batch / seq /
// head, the last axis contiguous and 16-byte aligned (the caller copies what is
// not). Masks by global position (kernels/mask.cuh); key_len hides keys at index
// >= key_len[b]. Workspace: o_part (splits, B, Hk, R, D) float, lse_part (splits,
// B, Hk, R) double, R = Sq * G padded to 16 per row group; counters (B * Hk) int,
// zero before the first launch.

#include "common.cuh"
#include "mask.cuh"
#include "merge.cuh"

// Merge the splits of row r of (batch, K/V head) bhk and write out / lse (merging
// into them when accumulating); one warp: lane j takes splits j, j + 32, ..., the
// warp reduces the max and the weighted sums with shuffles in a fixed order
// (deterministic). The partials were written by other blocks of this launch: read
// them through L2 (ld.global.cg), never through the read-only path.
template <int D, bool OUT16, bool BF16>
DEVI void combine_row(const float* OPart, const double* LsePart, void* __restrict__ Out,
                      double* __restrict__ Lse, int Sq, int Hq, int Hk, int splits,
                      long long stride, long long bhk, int r, int rows_padded,
                      long long osb, long long oss, long long osh, long long lsb,
                      long long lsh, int accumulate, int lane) {
  static_assert(D % 32 == 0, "head dim");
  constexpr int PER_LANE = D / 32;  // output columns each lane writes
  const double NEG_INF = -__longlong_as_double(0x7ff0000000000000LL);
  const int G = Hq / Hk;
  const int hk = (int)(bhk % Hk), b = (int)(bhk / Hk);
  const int i = r / G, h = hk * G + (r - (r / G) * G);
  const long long row_at = bhk * rows_padded + r;

  double mx = NEG_INF;
  for (int s = lane; s < splits; s += 32) mx = fmax(mx, __ldcg(LsePart + s * stride + row_at));
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) mx = fmax(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  double* lp = Lse + b * lsb + h * lsh + i;
  const long long base = b * osb + (long long)i * oss + h * osh;
  if (mx == NEG_INF) {  // no split saw a key
    if (!accumulate) {
      if (lane == 0) *lp = NEG_INF;
#pragma unroll
      for (int c = 0; c < PER_LANE; ++c) {
        const int col = c * 32 + lane;
        if (OUT16) reinterpret_cast<u16*>(Out)[base + col] = 0;
        else reinterpret_cast<float*>(Out)[base + col] = 0.f;
      }
    }
    return;
  }
  double den = 0.0;
  float acc[PER_LANE];
#pragma unroll
  for (int c = 0; c < PER_LANE; ++c) acc[c] = 0.f;
  for (int s0 = 0; s0 < splits; s0 += 32) {
    // each lane weighs one split; then every lane adds all 32 splits' columns it owns
    const int s = s0 + lane;
    const double l = s < splits ? __ldcg(LsePart + s * stride + row_at) : NEG_INF;
    const float w = l == NEG_INF ? 0.f : (float)exp(l - mx);
    den += (double)w;
    const int count = min(32, splits - s0);
    for (int j = 0; j < count; ++j) {
      const float wj = __shfl_sync(0xffffffffu, w, j);
      if (wj == 0.f) continue;
      const float* op = OPart + ((s0 + j) * stride + row_at) * D;
#pragma unroll
      for (int c = 0; c < PER_LANE; ++c) acc[c] = fmaf(wj, __ldcg(op + c * 32 + lane), acc[c]);
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) den += __shfl_xor_sync(0xffffffffu, den, off);
  const double lse_new = mx + log(den);
  float w_old = 0.f, w_new = (float)(1.0 / den);
  double lse_out = lse_new;
  const double lse_old = accumulate ? *lp : NEG_INF;
  if (accumulate) merge_weights(lse_old, lse_new, (float)(1.0 / den), w_old, w_new, lse_out);
#pragma unroll
  for (int c = 0; c < PER_LANE; ++c) {
    const long long at = base + c * 32 + lane;
    float x = acc[c] * w_new;
    if (OUT16) {
      u16* p = reinterpret_cast<u16*>(Out) + at;
      if (accumulate && w_old != 0.f) x = fmaf(w_old, half_to_float<BF16>(*p), x);
      *p = float_to_half<BF16>(x);
    } else {
      float* p = reinterpret_cast<float*>(Out) + at;
      if (accumulate && w_old != 0.f) x = fmaf(w_old, *p, x);
      *p = x;
    }
  }
  if (lane == 0) *lp = lse_out;
}

template <int D, int WR, int WK, int BN, int ST, bool BF16, bool MASK, bool OUT16>
__global__ void __launch_bounds__(WR * WK * 32)
flash_decode_mma(const u16* __restrict__ Q, const u16* __restrict__ K,
                 const u16* __restrict__ V, float* OPart, double* LsePart,
                 int Sq, int Sk, int Hq, int Hk, int splits,
                 long long qsb, long long qss, long long qsh,
                 long long ksb, long long kss, long long ksh,
                 long long vsb, long long vss, long long vsh,
                 float sl2, const int* __restrict__ key_len, long long q_off, long long k_off,
                 long long left, long long right, const long long* __restrict__ docs,
                 int ndocs, void* __restrict__ Out, double* __restrict__ Lse,
                 long long osb, long long oss, long long osh, long long lsb, long long lsh,
                 int accumulate, int* __restrict__ counters) {
  static_assert(D % 16 == 0 && BN % (16 * WK) == 0, "tile shape");
  constexpr int NW = WR * WK;
  constexpr int NT = NW * 32;
  constexpr int R = 16 * WR;        // rows of the block (padded)
  constexpr int LD = D + 8;         // padded shared rows: ldmatrix without conflicts
  constexpr int CH = D / 8;         // 16-byte chunks per row
  constexpr int KW = BN / WK;       // keys of a tile per warp
  constexpr int NSB = KW / 8;       // 8-wide score blocks per warp
  constexpr int NDB = D / 8;        // 8-wide output blocks

  extern __shared__ __align__(16) unsigned char smem_raw[];
  u16* sQ = reinterpret_cast<u16*>(smem_raw);
  u16* sK = sQ + R * LD;
  u16* sV = sK + ST * BN * LD;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wr = warp / WK, wk = warp - wr * WK;  // row group, key group
  const int split = blockIdx.x;
  const int bh = blockIdx.y;
  const int b = bh / Hk, hk = bh - b * Hk;
  const int G = Hq / Hk;
  const int rows = Sq * G;  // real rows; rows >= this are padding
  const int Skb = key_len != nullptr ? max(0, min(Sk, key_len[b])) : Sk;
  const u16* Kb = K + b * ksb + hk * ksh;
  const u16* Vb = V + b * vsb + hk * vsh;

  // visible keys of each query token (rows of one token share them)
  __shared__ int s_lo[MASK ? 64 : 1], s_hi[MASK ? 64 : 1];
  int n_begin = 0, n_end = Skb;
  if constexpr (MASK) {
    const MaskArgs margs{q_off, k_off, left, right, docs, ndocs};
    fill_row_bounds(s_lo, s_hi, margs, 0, Sq, Sq, Skb);
    __syncthreads();
    n_begin = s_lo[0];
    n_end = min(Skb, s_hi[Sq - 1] + 1);
  }
  // this split's share of the visible keys, in whole tiles
  const int tiles_all = n_end > n_begin ? (n_end - 1) / BN - n_begin / BN + 1 : 0;
  const int per_split = (tiles_all + splits - 1) / splits;
  const int t0 = n_begin / BN + split * per_split;
  const int ntiles = max(0, min(per_split, n_begin / BN + tiles_all - t0));

  // Q rows -> shared (padding rows zero-filled)
  for (int c = tid; c < R * CH; c += NT) {
    const int r = c / CH, cc = c - r * CH;
    const bool p = r < rows;
    const int i = p ? r / G : 0, g = p ? r - (r / G) * G : 0;
    const u16* src = Q + b * qsb + (long long)i * qss + (long long)(hk * G + g) * qsh + cc * 8;
    cp_async16(smem_u32(sQ + r * LD + cc * 8), src, p);
  }
  auto load_kv = [&](int tile, int stage) {
    const int n0 = tile * BN;
    u16* dk = sK + stage * BN * LD;
    u16* dv = sV + stage * BN * LD;
    for (int c = tid; c < BN * CH; c += NT) {
      const int r = c / CH, cc = c - r * CH;
      const int key = n0 + r;
      const bool p = key < Skb;
      const long long at = p ? key : 0;
      cp_async16_stream(smem_u32(dk + r * LD + cc * 8), Kb + at * kss + cc * 8, p);
      cp_async16_stream(smem_u32(dv + r * LD + cc * 8), Vb + at * vss + cc * 8, p);
    }
  };
#pragma unroll
  for (int s = 0; s < ST - 1; ++s) {
    if (s < ntiles) load_kv(t0 + s, s);
    cp_commit();
  }

  const int tq = lane & 3, g8 = lane >> 2;
  float o[NDB][4];
  float mrow[2] = {SP_NEG_INF, SP_NEG_INF}, lrow[2] = {0.f, 0.f};
#pragma unroll
  for (int j = 0; j < NDB; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  // the query token of this lane's two rows (for the mask)
  const int row0 = wr * 16 + g8, row1 = row0 + 8;
  const int tok0 = min(row0, rows - 1) / G, tok1 = min(row1, rows - 1) / G;

  u32 qf[D / 16][4];
  cp_wait<0>();  // Q (and the first stages) landed
  __syncthreads();
  {
    const u32 a = smem_u32(sQ + (wr * 16 + (lane & 15)) * LD + (lane >> 4) * 8);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) ldsm_x4(a + 2 * kk * 16, qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3]);
  }

  for (int it = 0; it < ntiles; ++it) {
    const int stage = it % ST;
    cp_wait<ST - 2>();
    __syncthreads();  // tile it landed; every warp is done with tile it - 1
    {
      const int nt = it + ST - 1;
      if (nt < ntiles) load_kv(t0 + nt, nt % ST);
      cp_commit();
    }
    const int n0 = (t0 + it) * BN + wk * KW;  // this warp's first key
    const u32 sKs = smem_u32(sK + stage * BN * LD + wk * KW * LD) +
                    2 * ((((lane >> 4) << 3) + (lane & 7)) * LD + ((lane >> 3) & 1) * 8);
    const u32 sVs = smem_u32(sV + stage * BN * LD + wk * KW * LD) +
                    2 * ((((lane >> 3) & 1) * 8 + (lane & 7)) * LD + (lane >> 4) * 8);
    float s[NSB][4];
#pragma unroll
    for (int j = 0; j < NSB; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
      for (int nb = 0; nb < KW / 16; ++nb) {
        u32 b0, b1, b2, b3;
        ldsm_x4(sKs + 2 * (nb * 16 * LD + kk * 16), b0, b1, b2, b3);
        mma16816<BF16>(s[2 * nb], qf[kk], b0, b1);
        mma16816<BF16>(s[2 * nb + 1], qf[kk], b2, b3);
      }
    // keys past the row's end, or outside a row's interval: -inf
    const bool partial = n0 + KW > Skb ||
                         (MASK && (s_lo[tok1] > n0 || s_hi[tok0] < n0 + KW - 1));
    if (partial) {
      const int lo0 = MASK ? s_lo[tok0] : 0, hi0 = MASK ? s_hi[tok0] : Skb - 1;
      const int lo1 = MASK ? s_lo[tok1] : 0, hi1 = MASK ? s_hi[tok1] : Skb - 1;
#pragma unroll
      for (int j = 0; j < NSB; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int key = n0 + j * 8 + 2 * tq + (c & 1);
          const int lo = c < 2 ? lo0 : lo1, hi = c < 2 ? hi0 : hi1;
          if (key >= Skb || key < lo || key > hi) s[j][c] = SP_NEG_INF;
        }
    }
    // online softmax, base 2 with the scale folded in
    float mx0 = SP_NEG_INF, mx1 = SP_NEG_INF;
#pragma unroll
    for (int j = 0; j < NSB; ++j) {
      mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
      mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    const float mn0 = fmaxf(mrow[0], mx0 * sl2), mn1 = fmaxf(mrow[1], mx1 * sl2);
    const float mu0 = mn0 == SP_NEG_INF ? 0.f : mn0, mu1 = mn1 == SP_NEG_INF ? 0.f : mn1;
    const float al0 = ex2(mrow[0] - mu0), al1 = ex2(mrow[1] - mu1);
    mrow[0] = mn0;
    mrow[1] = mn1;
    float ls0 = 0.f, ls1 = 0.f;
#pragma unroll
    for (int j = 0; j < NSB; ++j) {
      s[j][0] = ex2(fmaf(s[j][0], sl2, -mu0));
      s[j][1] = ex2(fmaf(s[j][1], sl2, -mu0));
      s[j][2] = ex2(fmaf(s[j][2], sl2, -mu1));
      s[j][3] = ex2(fmaf(s[j][3], sl2, -mu1));
      ls0 += s[j][0] + s[j][1];
      ls1 += s[j][2] + s[j][3];
    }
    lrow[0] = lrow[0] * al0 + ls0;
    lrow[1] = lrow[1] * al1 + ls1;
#pragma unroll
    for (int j = 0; j < NDB; ++j) {
      o[j][0] *= al0;
      o[j][1] *= al0;
      o[j][2] *= al1;
      o[j][3] *= al1;
    }
    // O += P V over this warp's keys
#pragma unroll
    for (int kk = 0; kk < KW / 16; ++kk) {
      u32 a[4];
      a[0] = pack2<BF16>(s[2 * kk][0], s[2 * kk][1]);
      a[1] = pack2<BF16>(s[2 * kk][2], s[2 * kk][3]);
      a[2] = pack2<BF16>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = pack2<BF16>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int nd = 0; nd < D / 16; ++nd) {
        u32 b0, b1, b2, b3;
        ldsm_x4_t(sVs + 2 * (kk * 16 * LD + nd * 16), b0, b1, b2, b3);
        mma16816<BF16>(o[2 * nd], a, b0, b1);
        mma16816<BF16>(o[2 * nd + 1], a, b2, b3);
      }
    }
  }
  cp_wait<0>();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    lrow[r] += __shfl_xor_sync(0xffffffffu, lrow[r], 1);
    lrow[r] += __shfl_xor_sync(0xffffffffu, lrow[r], 2);
  }

  // merge the key groups of a row group through shared memory (the K/V stages are free)
  __syncthreads();
  float* sO = reinterpret_cast<float*>(sK);         // (WK, R, D) partial outputs
  float* sM = sO + WK * R * D;                       // (WK, R) running max (log2 units)
  float* sL = sM + WK * R;                           // (WK, R) sums
  {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = wr * 16 + g8 + r * 8;
      float* dst = sO + (wk * R + row) * D;
#pragma unroll
      for (int j = 0; j < NDB; ++j) {
        dst[j * 8 + 2 * tq] = o[j][2 * r];
        dst[j * 8 + 2 * tq + 1] = o[j][2 * r + 1];
      }
      if (tq == 0) {
        sM[wk * R + row] = mrow[r];
        sL[wk * R + row] = lrow[r];
      }
    }
  }
  __syncthreads();
  // every thread: whole rows, D/ (threads per row) columns each
  const long long part = ((long long)split * gridDim.y + bh) * R;
  for (int idx = tid; idx < R * D; idx += NT) {
    const int row = idx / D, col = idx - row * D;
    float m = SP_NEG_INF;
#pragma unroll
    for (int w = 0; w < WK; ++w) m = fmaxf(m, sM[w * R + row]);
    const float mu = m == SP_NEG_INF ? 0.f : m;
    float l = 0.f, acc = 0.f;
#pragma unroll
    for (int w = 0; w < WK; ++w) {
      const float scale = ex2(sM[w * R + row] - mu);
      l += sL[w * R + row] * scale;
      acc += sO[(w * R + row) * D + col] * scale;
    }
    OPart[(part + row) * D + col] = l > 0.f ? acc / l : 0.f;
    if (col == 0)
      LsePart[part + row] = l > 0.f ? lse_of(m, l) : (double)SP_NEG_INF;
  }

  // the last split of this (batch, K/V head) to finish merges them all
  __shared__ int s_last;
  __threadfence();  // this block's partials reach L2 before its count
  __syncthreads();
  if (tid == 0) s_last = atomicAdd(counters + bh, 1) == splits - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  const long long stride = (long long)gridDim.y * R;  // between splits
  for (int r = warp; r < rows; r += NW)
    combine_row<D, OUT16, BF16>(OPart, LsePart, Out, Lse, Sq, Hq, Hk, splits, stride, bh, r,
                                R, osb, oss, osh, lsb, lsh, accumulate, lane);
  if (tid == 0) counters[bh] = 0;  // ready for the next launch (and graph replay)
}

