// seqpar: attention backward, FlashAttention-2 style, deterministic.
//
// Given the forward's lse over ALL keys (double, natural log) and
// delta = rowsum(dout * out) (float), the gradients over one block of keys are
//   P = exp(scale q.k - lse),  dV = P^T dO,  dP = dO V^T,  dS = P (dP - delta),
//   dK = scale dS^T Q,  dQ = scale dS K.
// Two kernels, each accumulating in registers and writing once (no atomics, so the
// bytes are the same run to run):
//   bwd_dkdv: one block per (key tile, batch x K/V head): K, V stay in shared
//     memory; the block loops over every query head of the GQA group and every
//     query tile that can see the key tile (the mask's bounds are monotone, so those
//     tiles are one interval, found by binary search), Q and dO double-buffered.
//     Each warp owns 16 keys: S^T = K Q^T, P^T, dV += P^T dO, dP^T = V dO^T,
//     dS^T, dK += dS^T Q.
//   bwd_dq: one block per (query tile, batch x query head), like the forward:
//     S = Q K^T, P, dP = dO V^T, dS, dQ += dS K, K and V double-buffered.
// mma.sync m16n8k16 with fp32 accumulation; the same fragment layouts as the
// forward (kernels/flash_forward.cu). accumulate != 0 adds to dq/dk/dv (float).
// Rows whose lse is -inf saw no key and contribute nothing.

#include "common.cuh"
#include "mask.cuh"

#define SP_LOG2E 1.4426950408889634f

// lse (natural log, double) -> the row's offset in log2 units; +inf for a dead row
// so that exp2(s - offset) is 0 there.
DEVI float lse_log2(double lse) {
  return lse == -__longlong_as_double(0x7ff0000000000000LL) ? __int_as_float(0x7f800000)
                                                            : (float)(lse * 1.4426950408889634);
}

// ---------------------------------------------------------------------------
// dK, dV. 4 warps x 16 keys = 64 keys per block; query tiles of BM rows.
// ---------------------------------------------------------------------------
template <int D, int BM, bool BF16, bool MASK>
__global__ void __launch_bounds__(128)
bwd_dkdv(const u16* __restrict__ Q, const u16* __restrict__ K, const u16* __restrict__ V,
         const u16* __restrict__ dO, const double* __restrict__ Lse,
         const float* __restrict__ Delta, float* __restrict__ dK, float* __restrict__ dV,
         int Sq, int Sk, int Hq, int Hk,
         long long qsb, long long qss, long long qsh, long long ksb, long long kss,
         long long ksh, long long vsb, long long vss, long long vsh, long long gsb,
         long long gss, long long gsh, long long lsb, long long lsh,
         long long dksb, long long dkss, long long dksh, long long dvsb, long long dvss,
         long long dvsh, float sl2, float scale, long long q_off, long long k_off,
         long long left, long long right, const long long* __restrict__ docs, int ndocs,
         int accumulate) {
  constexpr int BN = 64, NT = 128, LD = D + 8, CH = D / 8;
  constexpr int NQB = BM / 8;  // 8-wide query blocks of a score fragment
  constexpr int NDB = D / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  u16* sK = reinterpret_cast<u16*>(smem_raw);
  u16* sV = sK + BN * LD;
  u16* sQ = sV + BN * LD;          // 2 stages
  u16* sG = sQ + 2 * BM * LD;      // dO, 2 stages
  __shared__ float s_lse[2][BM], s_delta[2][BM];
  __shared__ int s_lo[MASK ? 2 : 1][MASK ? BM : 1], s_hi[MASK ? 2 : 1][MASK ? BM : 1];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int n0 = blockIdx.x * BN;
  const int bh = blockIdx.y, b = bh / Hk, hk = bh - b * Hk;
  const int G = Hq / Hk;
  const MaskArgs margs{q_off, k_off, left, right, docs, ndocs};
  const int n_last = min(n0 + BN, Sk) - 1;

  // K, V tile -> shared (rows past Sk zero)
  for (int c = tid; c < BN * CH; c += NT) {
    const int r = c / CH, cc = c - r * CH, key = n0 + r;
    const bool p = key < Sk;
    const long long at = p ? key : 0;
    cp_async16(smem_u32(sK + r * LD + cc * 8), K + b * ksb + hk * ksh + at * kss + cc * 8, p);
    cp_async16(smem_u32(sV + r * LD + cc * 8), V + b * vsb + hk * vsh + at * vss + cc * 8, p);
  }
  cp_commit();

  int q_first = 0, q_last = Sq - 1;
  if constexpr (MASK) query_span(margs, Sq, n0, n_last, q_first, q_last);
  const int m_first = q_first / BM;
  const int m_count = q_last >= q_first ? q_last / BM - m_first + 1 : 0;
  const int total = m_count * G;  // (head, query tile) pairs, head-major

  auto load_q = [&](int it, int stage) {
    const int g = it / m_count, m0 = (m_first + it - g * m_count) * BM;
    const int h = hk * G + g;
    for (int c = tid; c < BM * CH; c += NT) {
      const int r = c / CH, cc = c - r * CH, row = m0 + r;
      const bool p = row < Sq;
      const long long at = p ? row : 0;
      cp_async16(smem_u32(sQ + (stage * BM + r) * LD + cc * 8),
                 Q + b * qsb + h * qsh + at * qss + cc * 8, p);
      cp_async16(smem_u32(sG + (stage * BM + r) * LD + cc * 8),
                 dO + b * gsb + h * gsh + at * gss + cc * 8, p);
    }
    for (int r = tid; r < BM; r += NT) {
      const int row = m0 + r;
      s_lse[stage][r] = row < Sq ? lse_log2(Lse[b * lsb + h * lsh + row])
                                 : __int_as_float(0x7f800000);
      s_delta[stage][r] = row < Sq ? Delta[b * lsb + h * lsh + row] : 0.f;
    }
    if constexpr (MASK) fill_row_bounds(s_lo[stage], s_hi[stage], margs, m0, BM, Sq, Sk);
  };

  if (total > 0) load_q(0, 0);
  cp_commit();

  const int tq = lane & 3, g8 = lane >> 2;
  float dk[NDB][4], dv[NDB][4];
#pragma unroll
  for (int j = 0; j < NDB; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c) dk[j][c] = dv[j][c] = 0.f;
  // A-operand addresses of this warp's 16 keys (K and V rows), ldmatrix non-transposed
  const u32 aK = smem_u32(sK + (warp * 16 + (lane & 15)) * LD + (lane >> 4) * 8);
  const u32 aV = smem_u32(sV + (warp * 16 + (lane & 15)) * LD + (lane >> 4) * 8);
  const int key0 = n0 + warp * 16 + g8, key1 = key0 + 8;  // this lane's two keys

  for (int it = 0; it < total; ++it) {
    const int stage = it & 1;
    if (it + 1 < total) load_q(it + 1, stage ^ 1);
    cp_commit();
    cp_wait<1>();
    __syncthreads();  // tile it (and K, V) landed; bounds, lse, delta written
    const int g = it / m_count, m0 = (m_first + it - g * m_count) * BM;
    const u16* q_s = sQ + stage * BM * LD;
    const u16* g_s = sG + stage * BM * LD;
    // B-operand addresses (rows = queries, non-transposed) and K-dim = queries (transposed)
    const u32 bQ = smem_u32(q_s) + 2 * ((((lane >> 4) << 3) + (lane & 7)) * LD + ((lane >> 3) & 1) * 8);
    const u32 bG = smem_u32(g_s) + 2 * ((((lane >> 4) << 3) + (lane & 7)) * LD + ((lane >> 3) & 1) * 8);
    const u32 tQ = smem_u32(q_s) + 2 * ((((lane >> 3) & 1) * 8 + (lane & 7)) * LD + (lane >> 4) * 8);
    const u32 tG = smem_u32(g_s) + 2 * ((((lane >> 3) & 1) * 8 + (lane & 7)) * LD + (lane >> 4) * 8);

    // S^T = K_w Q^T and dP^T = V_w dO^T: (16 keys) x (BM queries)
    float st[NQB][4], dpt[NQB][4];
#pragma unroll
    for (int j = 0; j < NQB; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) st[j][c] = dpt[j][c] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      u32 ka[4], va[4];
      ldsm_x4(aK + 2 * kk * 16, ka[0], ka[1], ka[2], ka[3]);
      ldsm_x4(aV + 2 * kk * 16, va[0], va[1], va[2], va[3]);
#pragma unroll
      for (int nb = 0; nb < BM / 16; ++nb) {
        u32 b0, b1, b2, b3;
        ldsm_x4(bQ + 2 * (nb * 16 * LD + kk * 16), b0, b1, b2, b3);
        mma16816<BF16>(st[2 * nb], ka, b0, b1);
        mma16816<BF16>(st[2 * nb + 1], ka, b2, b3);
        ldsm_x4(bG + 2 * (nb * 16 * LD + kk * 16), b0, b1, b2, b3);
        mma16816<BF16>(dpt[2 * nb], va, b0, b1);
        mma16816<BF16>(dpt[2 * nb + 1], va, b2, b3);
      }
    }
    // P^T and dS^T, column (query) by column
    const bool partial = n0 + BN > Sk || m0 + BM > Sq ||
        (MASK && tile_partial(s_lo[stage], s_hi[stage], 0, BM - 1, n0, n0 + BN));
#pragma unroll
    for (int j = 0; j < NQB; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int col = j * 8 + 2 * tq + (c & 1);  // local query row
        const int key = c < 2 ? key0 : key1;
        float s = st[j][c];
        if (partial) {
          const bool hidden = key >= Sk || m0 + col >= Sq ||
              (MASK && (key < s_lo[stage][col] || key > s_hi[stage][col]));
          if (hidden) s = SP_NEG_INF;
        }
        const float p = ex2(fmaf(s, sl2, -s_lse[stage][col]));
        st[j][c] = p;
        dpt[j][c] = p * (dpt[j][c] - s_delta[stage][col]);
      }
    // dV += P^T dO and dK += dS^T Q over the BM queries
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      u32 pa[4], sa[4];
      pa[0] = pack2<BF16>(st[2 * kk][0], st[2 * kk][1]);
      pa[1] = pack2<BF16>(st[2 * kk][2], st[2 * kk][3]);
      pa[2] = pack2<BF16>(st[2 * kk + 1][0], st[2 * kk + 1][1]);
      pa[3] = pack2<BF16>(st[2 * kk + 1][2], st[2 * kk + 1][3]);
      sa[0] = pack2<BF16>(dpt[2 * kk][0], dpt[2 * kk][1]);
      sa[1] = pack2<BF16>(dpt[2 * kk][2], dpt[2 * kk][3]);
      sa[2] = pack2<BF16>(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
      sa[3] = pack2<BF16>(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
#pragma unroll
      for (int nd = 0; nd < D / 16; ++nd) {
        u32 b0, b1, b2, b3;
        ldsm_x4_t(tG + 2 * (kk * 16 * LD + nd * 16), b0, b1, b2, b3);
        mma16816<BF16>(dv[2 * nd], pa, b0, b1);
        mma16816<BF16>(dv[2 * nd + 1], pa, b2, b3);
        ldsm_x4_t(tQ + 2 * (kk * 16 * LD + nd * 16), b0, b1, b2, b3);
        mma16816<BF16>(dk[2 * nd], sa, b0, b1);
        mma16816<BF16>(dk[2 * nd + 1], sa, b2, b3);
      }
    }
    __syncthreads();  // everyone is done with this stage before it is refilled
  }
  cp_wait<0>();

  // write (or add) this warp's 16 keys
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = r ? key1 : key0;
    if (key >= Sk) continue;
    float* kp = dK + b * dksb + hk * dksh + (long long)key * dkss;
    float* vp = dV + b * dvsb + hk * dvsh + (long long)key * dvss;
#pragma unroll
    for (int j = 0; j < NDB; ++j) {
      const int col = j * 8 + 2 * tq;
      float2 kv = make_float2(dk[j][2 * r] * scale, dk[j][2 * r + 1] * scale);
      float2 vv = make_float2(dv[j][2 * r], dv[j][2 * r + 1]);
      if (accumulate) {
        const float2 ko = *reinterpret_cast<float2*>(kp + col);
        const float2 vo = *reinterpret_cast<float2*>(vp + col);
        kv.x += ko.x; kv.y += ko.y; vv.x += vo.x; vv.y += vo.y;
      }
      *reinterpret_cast<float2*>(kp + col) = kv;
      *reinterpret_cast<float2*>(vp + col) = vv;
    }
  }
}

// ---------------------------------------------------------------------------
// dQ. 4 warps x 16 rows = 64 query rows per block; key tiles of BN keys.
// ---------------------------------------------------------------------------
template <int D, int BN, bool BF16, bool MASK>
__global__ void __launch_bounds__(128)
bwd_dq(const u16* __restrict__ Q, const u16* __restrict__ K, const u16* __restrict__ V,
       const u16* __restrict__ dO, const double* __restrict__ Lse,
       const float* __restrict__ Delta, float* __restrict__ dQ, int Sq, int Sk, int Hq, int Hk,
       long long qsb, long long qss, long long qsh, long long ksb, long long kss,
       long long ksh, long long vsb, long long vss, long long vsh, long long gsb,
       long long gss, long long gsh, long long lsb, long long lsh,
       long long dqsb, long long dqss, long long dqsh, float sl2, float scale,
       long long q_off, long long k_off, long long left, long long right,
       const long long* __restrict__ docs, int ndocs, int accumulate) {
  constexpr int BM = 64, NT = 128, LD = D + 8, CH = D / 8;
  constexpr int NSB = BN / 8, NDB = D / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  u16* sQ = reinterpret_cast<u16*>(smem_raw);
  u16* sG = sQ + BM * LD;
  u16* sK = sG + BM * LD;        // 2 stages
  u16* sV = sK + 2 * BN * LD;    // 2 stages
  __shared__ int s_lo[MASK ? BM : 1], s_hi[MASK ? BM : 1];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int m0 = blockIdx.x * BM;
  const int bh = blockIdx.y, b = bh / Hq, h = bh - b * Hq, hk = h / (Hq / Hk);
  const u16* Kb = K + b * ksb + hk * ksh;
  const u16* Vb = V + b * vsb + hk * vsh;

  for (int c = tid; c < BM * CH; c += NT) {
    const int r = c / CH, cc = c - r * CH, row = m0 + r;
    const bool p = row < Sq;
    const long long at = p ? row : 0;
    cp_async16(smem_u32(sQ + r * LD + cc * 8), Q + b * qsb + h * qsh + at * qss + cc * 8, p);
    cp_async16(smem_u32(sG + r * LD + cc * 8), dO + b * gsb + h * gsh + at * gss + cc * 8, p);
  }
  int n_begin = 0, n_end = Sk;
  if constexpr (MASK) {
    const MaskArgs margs{q_off, k_off, left, right, docs, ndocs};
    fill_row_bounds(s_lo, s_hi, margs, m0, BM, Sq, Sk);
    __syncthreads();
    n_begin = s_lo[0];
    n_end = min(Sk, s_hi[BM - 1] + 1);
  }
  const int t_first = n_begin / BN;
  const int ntiles = n_end > n_begin ? (n_end - 1) / BN - t_first + 1 : 0;
  auto load_kv = [&](int tile, int stage) {
    const int k0 = tile * BN;
    for (int c = tid; c < BN * CH; c += NT) {
      const int r = c / CH, cc = c - r * CH, key = k0 + r;
      const bool p = key < Sk;
      const long long at = p ? key : 0;
      cp_async16(smem_u32(sK + (stage * BN + r) * LD + cc * 8), Kb + at * kss + cc * 8, p);
      cp_async16(smem_u32(sV + (stage * BN + r) * LD + cc * 8), Vb + at * vss + cc * 8, p);
    }
  };
  if (ntiles > 0) load_kv(t_first, 0);
  cp_commit();

  const int tq = lane & 3, g8 = lane >> 2;
  const int r0 = warp * 16 + g8, r1 = r0 + 8;  // this lane's two local rows
  float lse2[2], dl[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = m0 + (r ? r1 : r0);
    lse2[r] = row < Sq ? lse_log2(Lse[b * lsb + h * lsh + row]) : __int_as_float(0x7f800000);
    dl[r] = row < Sq ? Delta[b * lsb + h * lsh + row] : 0.f;
  }
  float dq[NDB][4];
#pragma unroll
  for (int j = 0; j < NDB; ++j) dq[j][0] = dq[j][1] = dq[j][2] = dq[j][3] = 0.f;
  const u32 aQ = smem_u32(sQ + (warp * 16 + (lane & 15)) * LD + (lane >> 4) * 8);
  const u32 aG = smem_u32(sG + (warp * 16 + (lane & 15)) * LD + (lane >> 4) * 8);

  for (int it = 0; it < ntiles; ++it) {
    const int stage = it & 1;
    if (it + 1 < ntiles) load_kv(t_first + it + 1, stage ^ 1);
    cp_commit();
    cp_wait<1>();
    __syncthreads();
    const int k0 = (t_first + it) * BN;
    const u32 bK = smem_u32(sK + stage * BN * LD) + 2 * ((((lane >> 4) << 3) + (lane & 7)) * LD + ((lane >> 3) & 1) * 8);
    const u32 bV = smem_u32(sV + stage * BN * LD) + 2 * ((((lane >> 4) << 3) + (lane & 7)) * LD + ((lane >> 3) & 1) * 8);
    const u32 tK = smem_u32(sK + stage * BN * LD) + 2 * ((((lane >> 3) & 1) * 8 + (lane & 7)) * LD + (lane >> 4) * 8);
    float s[NSB][4], dp[NSB][4];
#pragma unroll
    for (int j = 0; j < NSB; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) s[j][c] = dp[j][c] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      u32 qa[4], ga[4];
      ldsm_x4(aQ + 2 * kk * 16, qa[0], qa[1], qa[2], qa[3]);
      ldsm_x4(aG + 2 * kk * 16, ga[0], ga[1], ga[2], ga[3]);
#pragma unroll
      for (int nb = 0; nb < BN / 16; ++nb) {
        u32 b0, b1, b2, b3;
        ldsm_x4(bK + 2 * (nb * 16 * LD + kk * 16), b0, b1, b2, b3);
        mma16816<BF16>(s[2 * nb], qa, b0, b1);
        mma16816<BF16>(s[2 * nb + 1], qa, b2, b3);
        ldsm_x4(bV + 2 * (nb * 16 * LD + kk * 16), b0, b1, b2, b3);
        mma16816<BF16>(dp[2 * nb], ga, b0, b1);
        mma16816<BF16>(dp[2 * nb + 1], ga, b2, b3);
      }
    }
    const bool partial = k0 + BN > Sk ||
        (MASK && tile_partial(s_lo, s_hi, warp * 16, warp * 16 + 15, k0, k0 + BN));
#pragma unroll
    for (int j = 0; j < NSB; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int key = k0 + j * 8 + 2 * tq + (c & 1);
        const int r = c >> 1;
        float x = s[j][c];
        if (partial) {
          const int lr = r ? r1 : r0;
          if (key >= Sk || (MASK && (key < s_lo[lr] || key > s_hi[lr]))) x = SP_NEG_INF;
        }
        const float p = ex2(fmaf(x, sl2, -lse2[r]));
        s[j][c] = p * (dp[j][c] - dl[r]);  // dS
      }
    // dQ += dS K
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      u32 a[4];
      a[0] = pack2<BF16>(s[2 * kk][0], s[2 * kk][1]);
      a[1] = pack2<BF16>(s[2 * kk][2], s[2 * kk][3]);
      a[2] = pack2<BF16>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = pack2<BF16>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int nd = 0; nd < D / 16; ++nd) {
        u32 b0, b1, b2, b3;
        ldsm_x4_t(tK + 2 * (kk * 16 * LD + nd * 16), b0, b1, b2, b3);
        mma16816<BF16>(dq[2 * nd], a, b0, b1);
        mma16816<BF16>(dq[2 * nd + 1], a, b2, b3);
      }
    }
    __syncthreads();
  }
  cp_wait<0>();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = m0 + (r ? r1 : r0);
    if (row >= Sq) continue;
    float* qp = dQ + b * dqsb + h * dqsh + (long long)row * dqss;
#pragma unroll
    for (int j = 0; j < NDB; ++j) {
      const int col = j * 8 + 2 * tq;
      float2 x = make_float2(dq[j][2 * r] * scale, dq[j][2 * r + 1] * scale);
      if (accumulate) {
        const float2 o = *reinterpret_cast<float2*>(qp + col);
        x.x += o.x;
        x.y += o.y;
      }
      *reinterpret_cast<float2*>(qp + col) = x;
    }
  }
}
