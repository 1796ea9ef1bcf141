// seqpar: fused exact-softmax attention forward, one device, no ranks.
//
// Two kernels, compiled at run time by CuPy (NVRTC) and chosen by dtype:
//   flash_fwd_mma<D, NW, MT, BN, ST, BF16, MINB, QREG>  fp16 / bf16, tensor cores
//       (mma.sync m16n8k16, fp32 accumulation), ldmatrix, cp.async pipeline.
//   attn_fwd_f32<D>                     float32 inputs, plain fp32 FFMA math.
//
// Layout (both): q (B, Sq, Hq, D), k/v (B, Sk, Hk, D), element strides passed
// for batch / seq / head, the last axis contiguous.  Query head h reads kv head
// h / (Hq / Hk).  MASK: each row sees the key interval of kernels/mask.cuh (causal,
// window, documents by global position), and key_len (per batch row, or null) hides
// keys at index >= key_len[b]; without MASK every key is visible.  lse is natural log, double (the carry between
// merges).  accumulate != 0: out/lse hold a normalised partial result, merged in
// place by kernels/merge.cuh; rows that see no key are left unchanged.
// The Python loader inlines the #include lines (no CUDA headers are used).

#include "common.cuh"
#include "mask.cuh"
#include "merge.cuh"

// Block -> (query block, batch*head).  grid: x = query block, y = batch*head.
// Masked: blocks are renumbered so that the query blocks that are heaviest under
// a causal mask (the last ones) of every head start first: longest first over the
// whole grid, so no big block is left to start last, which would cost a long tail.
DEVI void block_coords(bool longest_first, int& mb, int& bh) {
  if (longest_first) {
    const int lin = blockIdx.x + gridDim.x * blockIdx.y;
    const int step = lin / gridDim.y;
    mb = gridDim.x - 1 - step;
    bh = lin - step * gridDim.y;
  } else {
    mb = blockIdx.x;
    bh = blockIdx.y;
  }
}

// ---------------------------------------------------------------------------
// fp16 / bf16: tensor-core kernel.  NW warps, each owns MT * 16 query rows
// (BM = 16 * MT * NW); key/value tiles of BN rows, ST-stage cp.async ring.
// QREG: Q fragments held in registers for the whole block (else re-read from
// shared memory with ldmatrix each tile).  MINB: blocks per SM asked of the
// register allocator.  Shared rows padded by 16 bytes: ldmatrix conflict-free.
// ---------------------------------------------------------------------------
template <int D, int NW, int MT, int BN, int ST, bool BF16, int MINB, bool QREG, bool MASK>
__global__ void __launch_bounds__(NW * 32, MINB)
flash_fwd_mma(const u16* __restrict__ Q, const u16* __restrict__ K,
              const u16* __restrict__ V, void* __restrict__ Out,
              double* __restrict__ Lse, int Sq, int Sk, int Hq, int Hk,
              long long qsb, long long qss, long long qsh,
              long long ksb, long long kss, long long ksh,
              long long vsb, long long vss, long long vsh,
              long long osb, long long oss, long long osh,
              long long lsb, long long lsh,
              float sl2, const int* __restrict__ key_len, long long q_off, long long k_off,
              long long left, long long right, const long long* __restrict__ docs, int ndocs,
              int accumulate, int out_f32) {
  static_assert(D % 16 == 0 && BN % 16 == 0, "tile shape");
  constexpr int WM = 16 * MT;  // rows per warp
  constexpr int BM = WM * NW;
  constexpr int LD = D + 8;
  constexpr int NT = NW * 32;
  constexpr int CH = D / 8;    // 16-byte chunks per row
  constexpr int NDB = D / 8;   // 8-wide output column blocks
  constexpr int NSB = BN / 8;  // 8-wide score column blocks
  constexpr int QF = QREG ? MT * (D / 16) : 1;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  u16* sQ = reinterpret_cast<u16*>(smem_raw);
  u16* sK = sQ + BM * LD;
  u16* sV = sK + ST * BN * LD;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  int mb, bh;
  block_coords(MASK, mb, bh);
  const int m0 = mb * BM;
  const u16 *Qb, *Kb, *Vb;
  int Skb = Sk;  // keys of this batch row
  {
    const int b = bh / Hq;
    const int h = bh - b * Hq;
    const int hk = h / (Hq / Hk);
    Qb = Q + b * qsb + h * qsh;
    Kb = K + b * ksb + hk * ksh;
    Vb = V + b * vsb + hk * vsh;
    if constexpr (MASK) {  // key lengths come with the masked variant only
      if (key_len != nullptr) Skb = max(0, min(Sk, key_len[b]));
    }
  }

  // visible key interval of each row (local indices), from the mask rule
  __shared__ int s_lo[MASK ? BM : 1], s_hi[MASK ? BM : 1];
  int n_begin = 0, n_end = Skb;
  if constexpr (MASK) {
    const MaskArgs margs{q_off, k_off, left, right, docs, ndocs};
    fill_row_bounds(s_lo, s_hi, margs, m0, BM, Sq, Skb);
    __syncthreads();
    n_begin = s_lo[0];
    n_end = min(Skb, s_hi[BM - 1] + 1);
  }
  const int t_first = n_begin / BN;
  const int t_last = (n_end - 1) / BN;  // tiles are visited from the last to the first
  const int ntiles = n_end > n_begin ? t_last - t_first + 1 : 0;

  // Q tile -> shared (rows past Sq zero-filled)
#pragma unroll
  for (int c = tid; c < BM * CH; c += NT) {
    int r = c / CH, cc = c - r * CH;
    int gr = m0 + r;
    bool p = gr < Sq;
    const u16* src = Qb + (long long)(p ? gr : 0) * qss + cc * 8;
    cp_async16(smem_u32(sQ + r * LD + cc * 8), src, p);
  }

  auto load_kv = [&](int tile, int stage) {
    const int n0 = tile * BN;
    u16* dk = sK + stage * BN * LD;
    u16* dv = sV + stage * BN * LD;
#pragma unroll
    for (int c = tid; c < BN * CH; c += NT) {
      int r = c / CH, cc = c - r * CH;
      int gr = n0 + r;
      bool p = gr < Skb;
      long long gro = (long long)(p ? gr : 0);
      cp_async16(smem_u32(dk + r * LD + cc * 8), Kb + gro * kss + cc * 8, p);
      cp_async16(smem_u32(dv + r * LD + cc * 8), Vb + gro * vss + cc * 8, p);
    }
  };

  // prologue: tiles are visited from the last (masked) to the first
#pragma unroll
  for (int s = 0; s < ST - 1; ++s) {
    if (s < ntiles) load_kv(t_last - s, s);
    cp_commit();
  }

  float o[MT][NDB][4];
  float mrow[MT][2], lrow[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int j = 0; j < NDB; ++j) o[mt][j][0] = o[mt][j][1] = o[mt][j][2] = o[mt][j][3] = 0.f;
    mrow[mt][0] = mrow[mt][1] = SP_NEG_INF;
    lrow[mt][0] = lrow[mt][1] = 0.f;
  }
  const int tq = lane & 3;
  const int g = lane >> 2;
  // ldmatrix source row/col offsets of this lane (A operand, non-transposed)
  const u32 sQw = smem_u32(sQ + (warp * WM + (lane & 15)) * LD + (lane >> 4) * 8);

  u32 qf[QF][4];
  if (ntiles > 0) {
    cp_wait<ST - 2>();
    __syncthreads();
    if constexpr (QREG) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          u32* f = qf[mt * (D / 16) + kk];
          ldsm_x4(sQw + 2 * (mt * 16 * LD + kk * 16), f[0], f[1], f[2], f[3]);
        }
    }
  }

  for (int it = 0; it < ntiles; ++it) {
    const int tile = t_last - it;
    const int stage = it % ST;
    // tile `it` has landed once all but the ST-2 newest groups are done; the
    // barrier also means every warp has finished tile it-1, whose stage the
    // prefetch below overwrites: one barrier per tile.
    cp_wait<ST - 2>();
    __syncthreads();
    {
      int nt = it + ST - 1;
      if (nt < ntiles) load_kv(t_last - nt, nt % ST);
      cp_commit();
    }

    const u32 sKs = smem_u32(sK + stage * BN * LD) +
                    2 * ((((lane >> 4) << 3) + (lane & 7)) * LD + ((lane >> 3) & 1) * 8);
    const u32 sVs = smem_u32(sV + stage * BN * LD) +
                    2 * ((((lane >> 3) & 1) * 8 + (lane & 7)) * LD + (lane >> 4) * 8);

    float s[MT][NSB][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int j = 0; j < NSB; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      u32 qa[MT][4];
      if constexpr (!QREG) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
          ldsm_x4(sQw + 2 * (mt * 16 * LD + kk * 16), qa[mt][0], qa[mt][1], qa[mt][2], qa[mt][3]);
      }
#pragma unroll
      for (int nb = 0; nb < BN / 16; ++nb) {
        u32 b0, b1, b2, b3;
        ldsm_x4(sKs + 2 * (nb * 16 * LD + kk * 16), b0, b1, b2, b3);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const u32* a = QREG ? qf[(mt * (D / 16) + kk) % QF] : qa[mt];
          mma16816<BF16>(s[mt][2 * nb], a, b0, b1);
          mma16816<BF16>(s[mt][2 * nb + 1], a, b2, b3);
        }
      }
    }

    const int n0 = tile * BN;
    // warp-uniform: the tail of the keys, or a tile the mask cuts for this warp's rows
    if (n0 + BN > Skb ||
        (MASK && tile_partial(s_lo, s_hi, warp * WM, warp * WM + WM - 1, n0, n0 + BN))) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int c2 = 0; c2 < 2; ++c2) {
          const int lr = warp * WM + mt * 16 + g + c2 * 8;  // local row
          const int lo = MASK ? s_lo[lr] : 0;
          const int hi = MASK ? s_hi[lr] : Skb - 1;
#pragma unroll
          for (int j = 0; j < NSB; ++j)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              const int key = n0 + j * 8 + 2 * tq + c;
              if (key >= Skb || key < lo || key > hi) s[mt][j][2 * c2 + c] = SP_NEG_INF;
            }
        }
    }

    // online softmax, base 2 with the scale folded in
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      float mx0 = SP_NEG_INF, mx1 = SP_NEG_INF;
#pragma unroll
      for (int j = 0; j < NSB; ++j) {
        mx0 = fmaxf(mx0, fmaxf(s[mt][j][0], s[mt][j][1]));
        mx1 = fmaxf(mx1, fmaxf(s[mt][j][2], s[mt][j][3]));
      }
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
      const float mn0 = fmaxf(mrow[mt][0], mx0 * sl2);
      const float mn1 = fmaxf(mrow[mt][1], mx1 * sl2);
      const float mu0 = (mn0 == SP_NEG_INF) ? 0.f : mn0;
      const float mu1 = (mn1 == SP_NEG_INF) ? 0.f : mn1;
      const float al0 = ex2(mrow[mt][0] - mu0);
      const float al1 = ex2(mrow[mt][1] - mu1);
      mrow[mt][0] = mn0;
      mrow[mt][1] = mn1;
      float ls0 = 0.f, ls1 = 0.f;
#pragma unroll
      for (int j = 0; j < NSB; ++j) {
        s[mt][j][0] = ex2(fmaf(s[mt][j][0], sl2, -mu0));
        s[mt][j][1] = ex2(fmaf(s[mt][j][1], sl2, -mu0));
        s[mt][j][2] = ex2(fmaf(s[mt][j][2], sl2, -mu1));
        s[mt][j][3] = ex2(fmaf(s[mt][j][3], sl2, -mu1));
        ls0 += s[mt][j][0] + s[mt][j][1];
        ls1 += s[mt][j][2] + s[mt][j][3];
      }
      lrow[mt][0] = lrow[mt][0] * al0 + ls0;
      lrow[mt][1] = lrow[mt][1] * al1 + ls1;
#pragma unroll
      for (int j = 0; j < NDB; ++j) {
        o[mt][j][0] *= al0;
        o[mt][j][1] *= al0;
        o[mt][j][2] *= al1;
        o[mt][j][3] *= al1;
      }
    }

    // O += P V, P straight from the score accumulators
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      u32 a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        a[mt][0] = pack2<BF16>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        a[mt][1] = pack2<BF16>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        a[mt][2] = pack2<BF16>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        a[mt][3] = pack2<BF16>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int nd = 0; nd < D / 16; ++nd) {
        u32 b0, b1, b2, b3;
        ldsm_x4_t(sVs + 2 * (kk * 16 * LD + nd * 16), b0, b1, b2, b3);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816<BF16>(o[mt][2 * nd], a[mt], b0, b1);
          mma16816<BF16>(o[mt][2 * nd + 1], a[mt], b2, b3);
        }
      }
    }
  }
  cp_wait<0>();

  // epilogue (b, h recomputed: nothing of them stays live through the loop)
  int b, h;
  {
    int mb2, bh2;
    block_coords(MASK, mb2, bh2);
    b = bh2 / Hq;
    h = bh2 - b * Hq;
  }
  const int w0 = m0 + warp * WM;  // first row of this warp
  double lse_old[MT][2];
  double* lp[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      lrow[mt][r] += __shfl_xor_sync(0xffffffffu, lrow[mt][r], 1);
      lrow[mt][r] += __shfl_xor_sync(0xffffffffu, lrow[mt][r], 2);
      int row = w0 + mt * 16 + g + r * 8;
      lp[mt][r] = Lse + b * lsb + h * lsh + (row < Sq ? row : 0);
      lse_old[mt][r] = (accumulate && row < Sq) ? *lp[mt][r] : (double)SP_NEG_INF;
    }
  __syncwarp();
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = w0 + mt * 16 + g + r * 8;
      if (row >= Sq) continue;
      const float l = lrow[mt][r];
      const bool has = l > 0.f;
      const double lse_new = has ? lse_of(mrow[mt][r], l) : (double)SP_NEG_INF;
      const float inv = has ? 1.f / l : 0.f;
      if (accumulate && !has) continue;  // nothing seen: leave the partial alone
      float w_old = 0.f, w_new = inv;
      double lse_out = lse_new;
      if (accumulate) merge_weights(lse_old[mt][r], lse_new, inv, w_old, w_new, lse_out);
      const long long obase = b * osb + (long long)row * oss + h * osh;
      if (out_f32) {
        float* op = reinterpret_cast<float*>(Out) + obase;
#pragma unroll
        for (int j = 0; j < NDB; ++j) {
          float2* p2 = reinterpret_cast<float2*>(op + j * 8 + 2 * tq);
          float2 v2 = make_float2(o[mt][j][2 * r] * w_new, o[mt][j][2 * r + 1] * w_new);
          if (accumulate && w_old != 0.f) {
            float2 old = *p2;
            v2.x = fmaf(w_old, old.x, v2.x);
            v2.y = fmaf(w_old, old.y, v2.y);
          }
          *p2 = v2;
        }
      } else {
        u16* op = reinterpret_cast<u16*>(Out) + obase;
#pragma unroll
        for (int j = 0; j < NDB; ++j) {
          u32* p2 = reinterpret_cast<u32*>(op + j * 8 + 2 * tq);
          float x = o[mt][j][2 * r] * w_new, y = o[mt][j][2 * r + 1] * w_new;
          if (accumulate && w_old != 0.f) {
            float ox, oy;
            unpack2<BF16>(*p2, ox, oy);
            x = fmaf(w_old, ox, x);
            y = fmaf(w_old, oy, y);
          }
          *p2 = pack2<BF16>(x, y);
        }
      }
      if (tq == 0) *lp[mt][r] = lse_out;
    }
}

// ---------------------------------------------------------------------------
// float32: exact fp32 arithmetic (FFMA), correctness first.  128 threads,
// 16 query rows per block (4 per warp), 32-key tiles: lane j scores key j,
// then each lane accumulates D/32 output columns.
// ---------------------------------------------------------------------------
template <int D, bool MASK>
__global__ void __launch_bounds__(128)
attn_fwd_f32(const float* __restrict__ Q, const float* __restrict__ K,
             const float* __restrict__ V, float* __restrict__ Out,
             double* __restrict__ Lse, int Sq, int Sk, int Hq, int Hk,
             long long qsb, long long qss, long long qsh,
             long long ksb, long long kss, long long ksh,
             long long vsb, long long vss, long long vsh,
             long long osb, long long oss, long long osh,
             long long lsb, long long lsh,
             float sl2, const int* __restrict__ key_len, long long q_off, long long k_off,
             long long left, long long right, const long long* __restrict__ docs, int ndocs,
             int accumulate, int out_f32) {
  static_assert(D % 32 == 0, "head dim");
  constexpr int BM = 16, BN = 32, RPW = 4, DP = D / 32, KLD = D + 1;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* sQ = reinterpret_cast<float*>(smem_raw);
  float* sK = sQ + BM * D;
  float* sV = sK + BN * KLD;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int mb, bh;
  block_coords(MASK, mb, bh);
  const int b = bh / Hq;
  const int h = bh - b * Hq;
  const int hk = h / (Hq / Hk);
  const int m0 = mb * BM;
  const float* Qb = Q + b * qsb + h * qsh;
  const float* Kb = K + b * ksb + hk * ksh;
  const float* Vb = V + b * vsb + hk * vsh;
  const int Skb = (MASK && key_len != nullptr) ? max(0, min(Sk, key_len[b])) : Sk;

  __shared__ int s_lo[MASK ? BM : 1], s_hi[MASK ? BM : 1];
  int n_begin = 0, n_end = Skb;
  if constexpr (MASK) {
    const MaskArgs margs{q_off, k_off, left, right, docs, ndocs};
    fill_row_bounds(s_lo, s_hi, margs, m0, BM, Sq, Skb);
    __syncthreads();
    n_begin = s_lo[0];
    n_end = min(Skb, s_hi[BM - 1] + 1);
  }
  const int t_first = n_begin / BN;
  const int t_last = n_end > n_begin ? (n_end - 1) / BN : t_first - 1;

  for (int i = tid; i < BM * D; i += 128) {
    int r = i / D, c = i - r * D;
    int gr = m0 + r;
    sQ[i] = gr < Sq ? Qb[(long long)gr * qss + c] : 0.f;
  }

  float o[RPW][DP];
  float m[RPW], l[RPW];
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    m[rr] = SP_NEG_INF;
    l[rr] = 0.f;
#pragma unroll
    for (int dd = 0; dd < DP; ++dd) o[rr][dd] = 0.f;
  }

  for (int tile = t_last; tile >= t_first; --tile) {
    const int n0 = tile * BN;
    __syncthreads();
    for (int i = tid; i < BN * D; i += 128) {
      int r = i / D, c = i - r * D;
      int gr = n0 + r;
      bool p = gr < Skb;
      sK[r * KLD + c] = p ? Kb[(long long)gr * kss + c] : 0.f;
      sV[i] = p ? Vb[(long long)gr * vss + c] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < RPW; ++rr) {
      const int r = warp * RPW + rr;
      const int row = m0 + r;
      float s = 0.f;
#pragma unroll 8
      for (int d = 0; d < D; ++d) s = fmaf(sQ[r * D + d], sK[lane * KLD + d], s);
      const int key = n0 + lane;
      s *= sl2;
      if (key >= Skb || (MASK && (key < s_lo[r] || key > s_hi[r]))) s = SP_NEG_INF;
      float mx = s;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float mn = fmaxf(m[rr], mx);
      const float mu = (mn == SP_NEG_INF) ? 0.f : mn;
      const float alpha = exp2f(m[rr] - mu);
      const float p = exp2f(s - mu);
      float ps = p;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) ps += __shfl_xor_sync(0xffffffffu, ps, off);
      l[rr] = l[rr] * alpha + ps;
      m[rr] = mn;
      // the tile's 32 keys summed apart, then added: one long chain of FMAs over all
      // keys rounds each term against the whole sum (4096 keys, one query: 2.7 x the
      // plain float32 error; per tile: within it)
      float t[DP];
#pragma unroll
      for (int dd = 0; dd < DP; ++dd) t[dd] = 0.f;
#pragma unroll 8
      for (int j = 0; j < 32; ++j) {
        const float pj = __shfl_sync(0xffffffffu, p, j);
#pragma unroll
        for (int dd = 0; dd < DP; ++dd) t[dd] = fmaf(pj, sV[j * D + lane + 32 * dd], t[dd]);
      }
#pragma unroll
      for (int dd = 0; dd < DP; ++dd) o[rr][dd] = fmaf(o[rr][dd], alpha, t[dd]);
    }
  }

#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    const int row = m0 + warp * RPW + rr;
    double* lp = Lse + b * lsb + h * lsh + (row < Sq ? row : 0);
    double lse_old = SP_NEG_INF;
    if (accumulate && row < Sq) lse_old = *lp;
    __syncwarp();
    if (row >= Sq) continue;
    const bool has = l[rr] > 0.f;
    const double lse_new = has ? lse_of(m[rr], l[rr]) : (double)SP_NEG_INF;
    const float inv = has ? 1.f / l[rr] : 0.f;
    if (accumulate && !has) continue;
    float w_old = 0.f, w_new = inv;
    double lse_out = lse_new;
    if (accumulate) merge_weights(lse_old, lse_new, inv, w_old, w_new, lse_out);
    float* op = Out + b * osb + (long long)row * oss + h * osh;
#pragma unroll
    for (int dd = 0; dd < DP; ++dd) {
      float* p = op + lane + 32 * dd;
      float x = o[rr][dd] * w_new;
      if (accumulate && w_old != 0.f) x = fmaf(w_old, *p, x);
      *p = x;
    }
    if (lane == 0) *lp = lse_out;
  }
}
