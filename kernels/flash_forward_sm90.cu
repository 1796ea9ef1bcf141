// seqpar: fused exact-softmax attention forward for Hopper (sm_90a), one device.
//
//   flash_fwd_sm90<D, BN, NWG, ST, BF16, PP, PREG, CREG>   fp16 / bf16, D = 64 to 256
//
// Head dims are held in 64-column (128-byte) panels: D = 96 fills a second panel
// half-way (the tensor maps read the columns past D as zeros), S = Q K^T runs
// over the D columns only, O = P V over whole panels, and the epilogue writes D.
//
// Roles (one thread block per SM, persistent):
//   warpgroup 0  producer: one thread issues TMA loads of the Q tile (BM = 64 * NWG
//                rows) and of K and V tiles (BN keys) into an ST-stage ring of
//                128-byte-swizzled shared-memory panels; completion on mbarriers.
//                Its registers drop to PREG (setmaxnreg).
//   warpgroups 1..NWG  consumers, CREG registers each: consumer w owns query rows
//                [64 w, 64 w + 64) of the tile. Per key tile:
//                  S = Q K^T     wgmma m64nBNk16, both operands in shared memory
//                  online softmax on S in registers (base 2, scale folded in)
//                  O += P V      wgmma m64nDk16, P converted to 16 bits in registers
//                                (the A operand), V in shared memory (transposed)
//                Within a consumer, S of tile i+1 is issued together with P V of
//                tile i, so the softmax of one tile runs while the tensor cores
//                work (intra-warpgroup overlap). With PP the consumers take turns
//                issuing their wgmmas (named barriers), so one's softmax overlaps
//                the other's products (ping-pong).
// Work tiles (batch, head, query block) are dealt to the persistent blocks in a
// snake order (round r: block b takes tile r * G + b, or r * G + G - 1 - b on odd
// rounds); heavy_group > 0 lists the query blocks from the last (causal: the longest
// rows first), that many at a time per head (tile_at).
//
// Layout as flash_forward.cu: q (B, Sq, Hq, D), k/v (B, Sk, Hk, D) read through TMA
// tensor maps built on the host (any 16-byte-multiple strides; rows past the end
// read as zeros); query head h reads K/V head h / (Hq / Hk). out (B, Sq, Hq, D) in
// q's dtype or float32, lse (B, Hq, Sq) float64, natural log. accumulate != 0 merges
// this block into (out, lse) in place; rows that see no key are left unchanged.
#include "sm90.cuh"
#include "mask.cuh"
#include "merge.cuh"

namespace fwd90 {

// ---------------------------------------------------------------------------
// Work tiles: (batch * head, query block) of the k-th tile of this block.
// ---------------------------------------------------------------------------
struct Tile {
  int b, h, m0;   // batch, query head, first query row
  int t_lo, n;    // key tiles t_lo .. t_lo + n - 1 (visited from the last)
  int klen;       // keys of this batch row that exist (key_lengths)
};

template <int BM, int BN>
DEVI Tile tile_at(int idx, const MaskArgs& mask, const long long* key_lengths, int Sq, int Sk,
                  int Hq, int B, int n_mblocks, int heavy_group) {
  Tile t;
  const int bhs = B * Hq;
  int mb, bh;
  if (heavy_group > 0) {
    // Longest first, heavy_group query blocks at a time with the head outside them:
    // tiles dealt together are neighbouring query blocks of a few heads, which read the
    // same K/V from L2 (with the head innermost every concurrent tile reads its own).
    const int first = idx / (heavy_group * bhs) * heavy_group;
    const int rows = n_mblocks - first < heavy_group ? n_mblocks - first : heavy_group;
    const int within = idx - first * bhs;
    bh = within / rows;
    mb = n_mblocks - 1 - (first + within - bh * rows);
  } else {
    bh = idx / n_mblocks;
    mb = idx - bh * n_mblocks;
  }
  t.b = bh / Hq;
  t.h = bh - t.b * Hq;
  t.m0 = mb * BM;
  long long kl = Sk;
  if (key_lengths) {
    kl = key_lengths[t.b];
    kl = kl < 0 ? 0 : (kl > Sk ? Sk : kl);
  }
  t.klen = (int)kl;
  const int last = (t.m0 + BM < Sq ? t.m0 + BM : Sq) - 1;
  int lo_first, hi_first, lo_last, hi_last;
  row_interval(mask, t.m0, t.klen, lo_first, hi_first);
  row_interval(mask, last, t.klen, lo_last, hi_last);
  if (lo_first > hi_last) {
    t.t_lo = 0;
    t.n = 0;
  } else {
    t.t_lo = lo_first / BN;
    t.n = hi_last / BN + 1 - t.t_lo;
  }
  return t;
}

// Index of this block's tile in round r (snake order), or -1.
DEVI int tile_index(int r, int n_tiles) {
  const long long base = (long long)r * gridDim.x;
  const int idx = (int)base + ((r & 1) ? (int)gridDim.x - 1 - (int)blockIdx.x : (int)blockIdx.x);
  return idx < n_tiles ? idx : -1;
}

// ---------------------------------------------------------------------------
// Online softmax on one S tile held as wgmma accumulators (see sm90.cuh): per
// thread rows a = g and b = g + 8 of its warp; s[4 j + c], key n0 + 8 j + 2 t + (c & 1).
// ---------------------------------------------------------------------------
template <int BN>
DEVI void softmax_step(float (&s)[BN / 2], bool partial, int key0, int lo_a, int hi_a, int lo_b,
                       int hi_b, float sl2, float& m_a, float& m_b, float& l_a, float& l_b,
                       float& al_a, float& al_b) {
  if (partial) {
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) {
      const int key = key0 + 8 * (i >> 2) + (i & 1);
      const bool vis = (i & 2) ? (key >= lo_b && key <= hi_b) : (key >= lo_a && key <= hi_a);
      if (!vis) s[i] = SP_NEG_INF;
    }
  }
  float mx_a = SP_NEG_INF, mx_b = SP_NEG_INF;
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) {
    mx_a = fmaxf(mx_a, fmaxf(s[4 * j], s[4 * j + 1]));
    mx_b = fmaxf(mx_b, fmaxf(s[4 * j + 2], s[4 * j + 3]));
  }
  mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
  mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
  mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
  mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
  const float mn_a = fmaxf(m_a, mx_a * sl2);
  const float mn_b = fmaxf(m_b, mx_b * sl2);
  const float mu_a = mn_a == SP_NEG_INF ? 0.f : mn_a;
  const float mu_b = mn_b == SP_NEG_INF ? 0.f : mn_b;
  al_a = ex2(m_a - mu_a);
  al_b = ex2(m_b - mu_b);
  m_a = mn_a;
  m_b = mn_b;
  float sum_a = 0.f, sum_b = 0.f;
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) {
    s[4 * j] = ex2(fmaf(s[4 * j], sl2, -mu_a));
    s[4 * j + 1] = ex2(fmaf(s[4 * j + 1], sl2, -mu_a));
    s[4 * j + 2] = ex2(fmaf(s[4 * j + 2], sl2, -mu_b));
    s[4 * j + 3] = ex2(fmaf(s[4 * j + 3], sl2, -mu_b));
    sum_a += s[4 * j] + s[4 * j + 1];
    sum_b += s[4 * j + 2] + s[4 * j + 3];
  }
  l_a = l_a * al_a + sum_a;
  l_b = l_b * al_b + sum_b;
}

// S accumulators (fp32) -> P as 16-bit A fragments: one k16 step per 4 registers.
template <int BN, bool BF16>
DEVI void to_a_fragments(const float (&s)[BN / 2], u32 (&p)[BN / 4]) {
#pragma unroll
  for (int i = 0; i < BN / 4; ++i) p[i] = pack2<BF16>(s[2 * i], s[2 * i + 1]);
}

// S = Q K^T for one consumer: q_desc / k_desc describe the first k16 step of
// panel 0; panel p starts q_panel / k_panel bytes further.
template <int D, int BN, bool BF16>
DEVI void gemm_qk(float (&s)[BN / 2], u64 q_desc, u64 k_desc, u32 q_panel, u32 k_panel) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const u32 off_q = (kk >> 2) * q_panel + (kk & 3) * 32;
    const u32 off_k = (kk >> 2) * k_panel + (kk & 3) * 32;
    sm90::Wgmma<BN, BF16>::template ss<0, 0>(s, q_desc + (off_q >> 4), k_desc + (off_k >> 4),
                                             kk > 0);
  }
}

// O += P V: P from registers, V (keys x D) from shared memory, transposed operand.
// One wgmma of N = D per 16 keys, the 64-column panels of V LBO = BN * 128 bytes apart.
template <u32 KV_PANEL>
DEVI u64 v_desc(u32 addr) {
  return sm90::desc_sw128(addr, KV_PANEL, 1024);
}
template <int D, int BN, bool BF16>
DEVI void gemm_pv(float (&o)[D / 2], const u32 (&p)[BN / 4], u64 v_desc) {
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk)
    sm90::Wgmma<D, BF16>::template rs<1>(o, p + 4 * kk, v_desc + ((kk * 2048) >> 4), 1);
}

}  // namespace fwd90

template <int D, int BN, int NWG, int ST, bool BF16, bool PP, int PREG, int CREG>
__global__ void __launch_bounds__(128 * (NWG + 1), 1)
flash_fwd_sm90(const __grid_constant__ TmaDesc tmq, const __grid_constant__ TmaDesc tmk,
               const __grid_constant__ TmaDesc tmv, void* __restrict__ Out,
               double* __restrict__ Lse, const long long* __restrict__ docs,
               const long long* __restrict__ key_lengths, int Sq, int Sk, int Hq, int Hk, int B,
               int n_mblocks, int n_tiles, long long osb, long long oss, long long osh,
               long long lsb, long long lsh, long long q0, long long k0, long long left,
               long long right, int ndocs, float sl2, int accumulate, int out_f32,
               int heavy_group) {
#if SEQPAR_SM90_ENABLED
  using namespace fwd90;
  static_assert(D % 32 == 0 && D <= 256 && BN % 16 == 0 && BN <= 256, "tile shape");
  constexpr int BM = 64 * NWG;
  constexpr int NP = (D + 63) / 64;      // 128-byte panels per row
  constexpr int DP = 64 * NP;            // columns of O: whole panels
  constexpr u32 Q_PANEL = BM * 128;      // bytes of one Q panel
  constexpr u32 KV_PANEL = BN * 128;     // bytes of one K or V panel
  constexpr u32 Q_BYTES = Q_PANEL * NP;
  constexpr u32 KV_BYTES = KV_PANEL * NP;
  constexpr int PP_BAR = 1;              // named barriers PP_BAR .. PP_BAR + NWG - 1

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const u32 base = (sm90::smem_addr(smem_raw) + 1023u) & ~1023u;
  const u32 sQ = base;
  const u32 sK = sQ + Q_BYTES;                 // stage s at sK + s * KV_BYTES
  const u32 sV = sK + ST * KV_BYTES;
  const u32 bars = sV + ST * KV_BYTES;         // 8 bytes each
  const u32 q_full = bars, q_empty = bars + 8;
  auto k_full = [&](int s) { return bars + 16 + 8 * s; };
  auto k_empty = [&](int s) { return bars + 16 + 8 * (ST + s); };
  auto v_full = [&](int s) { return bars + 16 + 8 * (2 * ST + s); };
  auto v_empty = [&](int s) { return bars + 16 + 8 * (3 * ST + s); };

  const MaskArgs mask{q0, k0, left, right, docs, ndocs};
  const int wg = threadIdx.x >> 7;
  const int tw = threadIdx.x & 127;

  if (threadIdx.x == 0) {
    sm90::mbar_init(q_full, 1);
    sm90::mbar_init(q_empty, NWG);
    for (int s = 0; s < ST; ++s) {
      sm90::mbar_init(k_full(s), 1);
      sm90::mbar_init(k_empty(s), NWG);
      sm90::mbar_init(v_full(s), 1);
      sm90::mbar_init(v_empty(s), NWG);
    }
    sm90::mbar_init_fence();
  }
  __syncthreads();

  if (wg == 0) {
    // ---------------- producer ----------------
    sm90::reg_dealloc<PREG>();
    if (tw != 0) return;
    sm90::tma_prefetch_desc(&tmq);
    sm90::tma_prefetch_desc(&tmk);
    sm90::tma_prefetch_desc(&tmv);
    u32 kv_it = 0, q_it = 0;
    for (int r = 0; (long long)r * gridDim.x < n_tiles; ++r) {
      const int idx = tile_index(r, n_tiles);
      if (idx < 0) continue;
      const Tile t = tile_at<BM, BN>(idx, mask, key_lengths, Sq, Sk, Hq, B, n_mblocks, heavy_group);
      if (t.n == 0) continue;
      const int hk = t.h / (Hq / Hk);
      sm90::mbar_wait(q_empty, (q_it & 1) ^ 1);
      sm90::mbar_arrive_expect_tx(q_full, Q_BYTES);
#pragma unroll
      for (int p = 0; p < NP; ++p)
        sm90::tma_load_4d(sQ + p * Q_PANEL, &tmq, q_full, 64 * p, t.m0, t.h, t.b);
      ++q_it;
      for (int i = 0; i < t.n; ++i, ++kv_it) {
        const int n0 = (t.t_lo + t.n - 1 - i) * BN;
        const int s = kv_it % ST;
        const u32 ph = (kv_it / ST) & 1;
        sm90::mbar_wait(k_empty(s), ph ^ 1);
        sm90::mbar_arrive_expect_tx(k_full(s), KV_BYTES);
#pragma unroll
        for (int p = 0; p < NP; ++p)
          sm90::tma_load_4d(sK + s * KV_BYTES + p * KV_PANEL, &tmk, k_full(s), 64 * p, n0, hk, t.b);
        sm90::mbar_wait(v_empty(s), ph ^ 1);
        sm90::mbar_arrive_expect_tx(v_full(s), KV_BYTES);
#pragma unroll
        for (int p = 0; p < NP; ++p)
          sm90::tma_load_4d(sV + s * KV_BYTES + p * KV_PANEL, &tmv, v_full(s), 64 * p, n0, hk, t.b);
      }
    }
    return;
  }

  // ---------------- consumers ----------------
  sm90::reg_alloc<CREG>();
  const int cw = wg - 1;             // consumer index: rows [64 cw, 64 cw + 64) of the tile
  const int warp = tw >> 5, lane = tw & 31;
  const int g = lane >> 2, tq = lane & 3;
  const bool leader = tw == 0;
  if (PP && cw == NWG - 1) sm90::bar_arrive(PP_BAR, 256);  // consumer 0 issues first

  const u64 q_desc0 = sm90::desc_sw128(sQ + cw * 64 * 128, 16, 1024);
  u32 kv_it = 0, q_it = 0;

  for (int r = 0; (long long)r * gridDim.x < n_tiles; ++r) {
    const int idx = tile_index(r, n_tiles);
    if (idx < 0) continue;
    const Tile t = tile_at<BM, BN>(idx, mask, key_lengths, Sq, Sk, Hq, B, n_mblocks, heavy_group);
    const int row_a = t.m0 + 64 * cw + 16 * warp + g;  // this thread's rows: row_a, row_a + 8
    const int w_first = t.m0 + 64 * cw < Sq ? t.m0 + 64 * cw : Sq - 1;
    const int w_last = (t.m0 + 64 * cw + 63 < Sq ? t.m0 + 64 * cw + 63 : Sq - 1);
    int lo_a, hi_a, lo_b, hi_b, lo_wl, hi_wf, dummy;
    row_interval(mask, row_a < Sq ? row_a : Sq - 1, t.klen, lo_a, hi_a);
    row_interval(mask, row_a + 8 < Sq ? row_a + 8 : Sq - 1, t.klen, lo_b, hi_b);
    row_interval(mask, w_first, t.klen, dummy, hi_wf);
    row_interval(mask, w_last, t.klen, lo_wl, dummy);

    float o[DP / 2];
    float m_a = SP_NEG_INF, m_b = SP_NEG_INF, l_a = 0.f, l_b = 0.f;
#pragma unroll
    for (int i = 0; i < DP / 2; ++i) o[i] = 0.f;

    if (t.n > 0) {
      float s[BN / 2];
      u32 p[BN / 4];
      float al_a, al_b;
      sm90::mbar_wait(q_full, q_it & 1);
      ++q_it;

      // first key tile: S, softmax, P
      int n0 = (t.t_lo + t.n - 1) * BN;
      int st = kv_it % ST;
      u32 ph = (kv_it / ST) & 1;
      sm90::mbar_wait(k_full(st), ph);
      if (PP) sm90::bar_sync(PP_BAR + cw, 256);
      sm90::wg_fence();
      gemm_qk<D, BN, BF16>(s, q_desc0, sm90::desc_sw128(sK + st * KV_BYTES, 16, 1024), Q_PANEL,
                           KV_PANEL);
      sm90::wg_commit();
      if (PP) sm90::bar_arrive(PP_BAR + (cw + 1) % NWG, 256);
      sm90::wg_wait<0>();
      sm90::reg_fence(s);
      if (leader) {
        sm90::mbar_arrive(k_empty(st));
        if (t.n == 1) sm90::mbar_arrive(q_empty);
      }
      {
        const bool partial = !(lo_wl <= n0 && hi_wf >= n0 + BN - 1);
        softmax_step<BN>(s, partial, n0 + 2 * tq, lo_a, hi_a, lo_b, hi_b, sl2, m_a, m_b, l_a,
                         l_b, al_a, al_b);
      }
      to_a_fragments<BN, BF16>(s, p);
      int pst = st;
      u32 pph = ph;
      ++kv_it;

      for (int i = 1; i < t.n; ++i, ++kv_it) {
        n0 = (t.t_lo + t.n - 1 - i) * BN;
        st = kv_it % ST;
        ph = (kv_it / ST) & 1;
        sm90::mbar_wait(k_full(st), ph);
        sm90::mbar_wait(v_full(pst), pph);
        if (PP) sm90::bar_sync(PP_BAR + cw, 256);
        sm90::wg_fence();
        gemm_qk<D, BN, BF16>(s, q_desc0, sm90::desc_sw128(sK + st * KV_BYTES, 16, 1024), Q_PANEL,
                             KV_PANEL);
        sm90::wg_commit();
        gemm_pv<DP, BN, BF16>(o, p, v_desc<KV_PANEL>(sV + pst * KV_BYTES));
        sm90::wg_commit();
        if (PP) sm90::bar_arrive(PP_BAR + (cw + 1) % NWG, 256);
        sm90::wg_wait<1>();
        sm90::reg_fence(s);
        if (leader) {
          sm90::mbar_arrive(k_empty(st));
          if (i == t.n - 1) sm90::mbar_arrive(q_empty);
        }
        const bool partial = !(lo_wl <= n0 && hi_wf >= n0 + BN - 1);
        softmax_step<BN>(s, partial, n0 + 2 * tq, lo_a, hi_a, lo_b, hi_b, sl2, m_a, m_b, l_a,
                         l_b, al_a, al_b);
        sm90::wg_wait<0>();
        sm90::reg_fence(o);
        sm90::reg_fence(s);
        if (leader) sm90::mbar_arrive(v_empty(pst));
#pragma unroll
        for (int j = 0; j < DP / 8; ++j) {
          o[4 * j] *= al_a;
          o[4 * j + 1] *= al_a;
          o[4 * j + 2] *= al_b;
          o[4 * j + 3] *= al_b;
        }
        to_a_fragments<BN, BF16>(s, p);
        pst = st;
        pph = ph;
      }
      // last P V
      sm90::mbar_wait(v_full(pst), pph);
      if (PP) sm90::bar_sync(PP_BAR + cw, 256);
      sm90::wg_fence();
      gemm_pv<DP, BN, BF16>(o, p, v_desc<KV_PANEL>(sV + pst * KV_BYTES));
      sm90::wg_commit();
      if (PP) sm90::bar_arrive(PP_BAR + (cw + 1) % NWG, 256);
      sm90::wg_wait<0>();
      sm90::reg_fence(o);
      if (leader) sm90::mbar_arrive(v_empty(pst));
    }

    // ---------------- epilogue: normalise, merge, write ----------------
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = row_a + 8 * half;
      if (row >= Sq) continue;
      const float l = half ? l_b : l_a;
      const float m = half ? m_b : m_a;
      const bool has = l > 0.f;
      if (accumulate && !has) continue;  // nothing seen: the partial result stays
      double* lp = Lse + t.b * lsb + t.h * lsh + row;
      const float inv = has ? (float)(1.0 / (double)l) : 0.f;
      const double lse_new = has ? lse_of(m, l) : -__longlong_as_double(0x7ff0000000000000ll);
      float wo = 0.f, wn = inv;
      double lse_out = lse_new;
      if (accumulate) merge_weights(*lp, lse_new, inv, wo, wn, lse_out);
      const long long obase = t.b * osb + (long long)row * oss + t.h * osh;
      if (out_f32) {
        float* op = reinterpret_cast<float*>(Out) + obase + 2 * tq;
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
          float2* p2 = reinterpret_cast<float2*>(op + 8 * j);
          float2 v2 = make_float2(o[4 * j + 2 * half] * wn, o[4 * j + 2 * half + 1] * wn);
          if (accumulate && wo != 0.f) {
            const float2 old = *p2;
            v2.x = fmaf(wo, old.x, v2.x);
            v2.y = fmaf(wo, old.y, v2.y);
          }
          *p2 = v2;
        }
      } else {
        u16* op = reinterpret_cast<u16*>(Out) + obase + 2 * tq;
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
          u32* p2 = reinterpret_cast<u32*>(op + 8 * j);
          float x = o[4 * j + 2 * half] * wn, y = o[4 * j + 2 * half + 1] * wn;
          if (accumulate && wo != 0.f) {
            float ox, oy;
            unpack2<BF16>(*p2, ox, oy);
            x = fmaf(wo, ox, x);
            y = fmaf(wo, oy, y);
          }
          *p2 = pack2<BF16>(x, y);
        }
      }
      if (tq == 0) *lp = lse_out;
    }
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // built without sm_90a features: fail loudly rather than leave out unwritten
#endif  // SEQPAR_SM90_ENABLED
}

#ifdef SEQPAR_SM90_INSTANTIATE  // offline builds (nvcc -cubin): the shipped configurations
#define SEQPAR_FWD90(D, BN, PP)                                                                 \
  template __global__ void flash_fwd_sm90<D, BN, 2, 2, true, PP, 24, 240>(                     \
      const __grid_constant__ TmaDesc, const __grid_constant__ TmaDesc,                        \
      const __grid_constant__ TmaDesc, void*, double*, const long long*, const long long*, int, \
      int, int, int, int, int, int, long long, long long, long long, long long, long long,     \
      long long, long long, long long, long long, int, float, int, int, int);
SEQPAR_FWD90(64, 128, true)
SEQPAR_FWD90(96, 128, true)
SEQPAR_FWD90(128, 128, true)
SEQPAR_FWD90(192, 112, false)
SEQPAR_FWD90(256, 80, false)
#endif
