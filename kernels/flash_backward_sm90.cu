// seqpar: attention backward for Hopper (sm_90a), one fused kernel per call.
//
//   bwd_sm90<D, BF16, MASK, PREG, CREG>   fp16 / bf16, D = 64 or 128
//   bwd_sm90_prep                         lse -> log2 units, delta padded, flags zeroed
//
// Work item = (batch, K/V head, key tile of BN = 128 keys), dealt to a persistent grid
// of one block per SM (round-robin, or snake order under a mask: see item_index). Roles:
//   warpgroup 0  producer (registers PREG): one thread loads the item's K and V tile
//                once by TMA, then streams the (query tile of BM = 64 rows, query head
//                of the GQA group) steps: Q, dO by TMA, log2-lse and delta by bulk
//                copy, into a two-stage ring completed on mbarriers.
//   warpgroups 1, 2  consumers (registers CREG); consumer w owns keys
//                [64 w, 64 w + 64) of the tile. Per step:
//                  S^T  = K Q^T     dP^T = V dO^T      (wgmma, both from shared memory)
//                  P^T  = exp2(S^T sl2 - lse2)         dS^T = P^T (dP^T - delta)
//                  dV  += P^T dO    dK  += dS^T Q      (wgmma, P^T and dS^T from registers)
//                  dS^T -> shared memory (16-bit, swizzled), then
//                  dQ_w  = dS K[:, half w]   (D = 128)  (wgmma, both from shared memory,
//                  dQ_w  = dS_w K_w          (D = 64)    dS read transposed)
//                  dq   += scale dQ_w       (fp32 vector atomics; with D = 64 consumer 0
//                                            adds dQ_0 + dQ_1, staged in shared memory)
//                dK, dV stay in registers over the item (all heads of the group) and are
//                written once.
// Determinism: the atomics into one dq tile happen in a fixed order, increasing key
// tile, when `ordered` is set: a flag per (batch, query head, query tile, half) holds
// 1 + the last key tile that added to it; a step waits for its key tile's predecessor
// when that tile contributes to the same query tile (the key tiles that see a query tile
// are one interval, the mask's bounds being monotone). Steps go from the last query
// tile to the first, so a tile's predecessor is one step ahead in the steady state.
// Every block of the grid is resident (one per SM), and an item waits only on an item
// dealt before it, so the waits always end; a wait longer than ORDER_TIMEOUT_NS gives up
// the order (the sum stays right, its rounding order is then not fixed).
//
// Layouts: q, dout (B, Sq, Hq, D) and k, v (B, Sk, Hk, D) through TMA tensor maps (any
// 16-byte-multiple strides; rows past the end read as zeros); lse2 and delta (B, Hq,
// Mpad) float32 from bwd_sm90_prep; dq (B, Sq, Hq, D), dk, dv (B, Sk, Hk, D) float32 with
// element strides, 8-byte aligned. dq must hold zeros (or the running sum, when
// accumulating) before the launch; accumulate != 0 adds dk, dv to what they hold.
#include "sm90.cuh"
#include "mask.cuh"

namespace bwd90 {

constexpr int BM = 64;    // query rows per step
constexpr int BN = 128;   // keys per work item (64 per consumer warpgroup)
constexpr int ST = 2;     // Q / dO stages
constexpr unsigned long long ORDER_TIMEOUT_NS = 2000000000ull;

// Query tiles [first, last] that see keys of tile n (first > last when none).
template <bool MASK>
DEVI void query_tiles(const MaskArgs& mask, int n, int Sq, int Sk, int n_mtiles, int& first,
                      int& last) {
  const int n0 = n * BN;
  const int n1 = (n0 + BN < Sk ? n0 + BN : Sk) - 1;
  first = 0;
  last = n_mtiles - 1;
  if (n < 0 || n1 < n0) {
    last = -1;
    return;
  }
  if constexpr (MASK) {
    int r0, r1;
    query_span(mask, Sq, n0, n1, r0, r1);
    if (r1 < r0) {
      last = -1;
    } else {
      first = r0 / BM;
      last = r1 / BM;
    }
  }
}

// The work item of this block in round r (-1 when none). Items are numbered key tile
// outer, (batch, K/V head) inner, so an item's predecessor (the key tile before, same
// head) comes B * Hk numbers earlier: in the same round or an earlier one. Round r
// takes items r * grid .. r * grid + grid - 1, in reverse on odd rounds with `snake`
// (masks make items uneven: the snake evens the blocks' totals).
DEVI int item_index(int r, int n_items, int snake) {
  const long long base = (long long)r * gridDim.x;
  const int c = (snake && (r & 1)) ? (int)gridDim.x - 1 - (int)blockIdx.x : (int)blockIdx.x;
  return base + c < n_items ? (int)(base + c) : -1;
}

// S^T accumulators (fp32) -> 16-bit A fragments, one k16 step per 4 registers.
template <bool BF16>
DEVI void pack_a(const float (&s)[BM / 2], u32 (&a)[BM / 4]) {
#pragma unroll
  for (int i = 0; i < BM / 4; ++i) a[i] = pack2<BF16>(s[2 * i], s[2 * i + 1]);
}

// X^T = A_rows Y^T over D: A (64 keys, K-major) and Y (BM query rows, K-major) in smem.
template <int D, bool BF16>
DEVI void gemm_t(float (&acc)[BM / 2], u32 a_addr, u32 a_panel, u32 y_addr, u32 y_panel) {
  const u64 da = sm90::desc_sw128(a_addr, 16, 1024);
  const u64 dy = sm90::desc_sw128(y_addr, 16, 1024);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const u32 oa = (kk >> 2) * a_panel + (kk & 3) * 32;
    const u32 oy = (kk >> 2) * y_panel + (kk & 3) * 32;
    sm90::Wgmma<BM, BF16>::template ss<0, 0>(acc, da + (oa >> 4), dy + (oy >> 4), kk > 0);
  }
}

// acc (64 keys x D) += A (registers, keys x BM queries) Y (BM rows x D, MN-major in smem).
template <int D, bool BF16>
DEVI void gemm_acc(float (&acc)[D / 2], const u32 (&a)[BM / 4], u32 y_addr, u32 y_panel) {
  const u64 dy = sm90::desc_sw128(y_addr, y_panel, 1024);
#pragma unroll
  for (int kk = 0; kk < BM / 16; ++kk)
    sm90::Wgmma<D, BF16>::template rs<1>(acc, a + 4 * kk, dy + ((kk * 2048) >> 4), 1);
}

// dQ (BM queries x 64 columns) = dS K over KSTEPS x 16 keys: dS read transposed from
// dS^T (keys x BM queries), K (keys x 64 columns of one panel) MN-major.
template <bool BF16, int KSTEPS>
DEVI void gemm_dq(float (&acc)[32], u32 ds_addr, u32 k_addr, u32 k_panel) {
  const u64 da = sm90::desc_sw128(ds_addr, BN * 128, 1024);
  const u64 db = sm90::desc_sw128(k_addr, k_panel, 1024);
#pragma unroll
  for (int kk = 0; kk < KSTEPS; ++kk)
    sm90::Wgmma<64, BF16>::template ss<1, 1>(acc, da + ((kk * 2048) >> 4),
                                             db + ((kk * 2048) >> 4), kk > 0);
}

// Waits until *flag >= want, or until the timeout (then the order is given up).
DEVI void wait_flag(const int* flag, int want) {
  if (sm90::ld_acquire(flag) >= want) return;
  const u64 t0 = sm90::global_ns();
  while (sm90::ld_acquire(flag) < want) {
    sm90::sleep_ns(64);
    if (sm90::global_ns() - t0 > ORDER_TIMEOUT_NS) return;
  }
}

}  // namespace bwd90

template <int D, bool BF16, bool MASK, int PREG, int CREG>
__global__ void __launch_bounds__(384, 1)
bwd_sm90(const __grid_constant__ TmaDesc tmq, const __grid_constant__ TmaDesc tmk,
         const __grid_constant__ TmaDesc tmv, const __grid_constant__ TmaDesc tmg,
         const float* __restrict__ Lse2, const float* __restrict__ Dlt, float* __restrict__ dQ,
         float* __restrict__ dK, float* __restrict__ dV, int* __restrict__ flags,
         const long long* __restrict__ docs, int Sq, int Sk, int Hq, int Hk, int B,
         int n_mtiles, int n_items, long long dqsb, long long dqss, long long dqsh,
         long long dksb, long long dkss, long long dksh, long long dvsb, long long dvss,
         long long dvsh, long long q0, long long k0, long long left, long long right,
         int ndocs, float sl2, float scale, int accumulate, int ordered, int snake) {
#if SEQPAR_SM90_ENABLED
  using namespace bwd90;
  static_assert(D == 64 || D == 128, "head dim");
  constexpr int NP = D / 64;              // 128-byte panels per row
  constexpr u32 Q_PANEL = BM * 128;       // one Q or dO panel
  constexpr u32 KV_PANEL = BN * 128;      // one K or V panel
  constexpr u32 Q_BYTES = Q_PANEL * NP;
  constexpr u32 KV_BYTES = KV_PANEL * NP;
  constexpr u32 DS_BYTES = BN * BM * 2;   // dS^T, keys x queries, 16-bit
  constexpr int NF = D == 128 ? 2 : 1;    // dq flags per query tile (one per column half)
  constexpr int DQ_LD = 64 + 4;            // floats per row of a staged dQ tile (padded)
  constexpr u32 DQ_BYTES = BM * DQ_LD * 4;
  constexpr int DS_BAR = 1;               // named barrier of the 256 consumer threads
  constexpr int WG_BAR = 2;               // 2 + w: consumer warpgroup w alone
  constexpr int DQ_BAR = 4;               // D = 64: consumer 1's dQ staged for consumer 0
  const int Mpad = n_mtiles * BM;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const u32 base = (sm90::smem_addr(smem_raw) + 1023u) & ~1023u;
  const u32 sK = base;
  const u32 sV = sK + KV_BYTES;
  const u32 sQ = sV + KV_BYTES;               // stage s at sQ + s * Q_BYTES
  const u32 sG = sQ + ST * Q_BYTES;           // dO
  const u32 sDS = sG + ST * Q_BYTES;          // 2 buffers
  const u32 sL = sDS + 2 * DS_BYTES;          // lse2, stage s at sL + s * BM * 4
  const u32 sDl = sL + ST * BM * 4;           // delta
  const u32 sDQ = sDl + ST * BM * 4;          // D = 64: consumer 1's dQ for consumer 0
  const u32 bars = sDQ + (NF == 1 ? DQ_BYTES : 0);
  const u32 kv_full = bars, kv_empty = bars + 8;
  auto q_full = [&](int s) { return bars + 16 + 8 * s; };
  auto q_empty = [&](int s) { return bars + 16 + 8 * (ST + s); };
  auto generic = [&](u32 a) { return smem_raw + (a - sm90::smem_addr(smem_raw)); };
  // generic pointers to the lse2 / delta stages (read with ordinary loads)
  const float* pL = reinterpret_cast<const float*>(generic(sL));
  const float* pDl = reinterpret_cast<const float*>(generic(sDl));

  // visible keys [lo, hi] (local, clamped to [0, Sk - 1]) of the rows of a partial step
  __shared__ int s_lo[2][MASK ? BM : 1], s_hi[2][MASK ? BM : 1];

  const MaskArgs mask{q0, k0, left, right, docs, ndocs};
  const int G = Hq / Hk;
  const int wg = threadIdx.x >> 7;
  const int tw = threadIdx.x & 127;

  if (threadIdx.x == 0) {
    sm90::mbar_init(kv_full, 1);
    sm90::mbar_init(kv_empty, 2);
    for (int s = 0; s < ST; ++s) {
      sm90::mbar_init(q_full(s), 1);
      sm90::mbar_init(q_empty(s), 2);
    }
    sm90::mbar_init_fence();
  }
  __syncthreads();

  if (wg == 0) {
    sm90::reg_dealloc<PREG>();
    if (tw == 0) {
      // ---------------- producer: TMA ----------------
      sm90::tma_prefetch_desc(&tmq);
      sm90::tma_prefetch_desc(&tmk);
      sm90::tma_prefetch_desc(&tmv);
      sm90::tma_prefetch_desc(&tmg);
      u32 kv_it = 0, it = 0;
      for (int r = 0; (long long)r * gridDim.x < n_items; ++r) {
        const int item = item_index(r, n_items, snake);
        if (item < 0) continue;
        const int n = item / (B * Hk), bk = item - n * (B * Hk);
        const int b = bk / Hk, hk = bk - b * Hk;
        int mf, ml;
        query_tiles<MASK>(mask, n, Sq, Sk, n_mtiles, mf, ml);
        if (ml < mf) continue;
        sm90::mbar_wait(kv_empty, (kv_it & 1) ^ 1);
        sm90::mbar_arrive_expect_tx(kv_full, 2 * KV_BYTES);
#pragma unroll
        for (int p = 0; p < NP; ++p) {
          sm90::tma_load_4d(sK + p * KV_PANEL, &tmk, kv_full, 64 * p, n * BN, hk, b);
          sm90::tma_load_4d(sV + p * KV_PANEL, &tmv, kv_full, 64 * p, n * BN, hk, b);
        }
        ++kv_it;
        for (int m = ml; m >= mf; --m) {
          for (int g = 0; g < G; ++g, ++it) {
            const int h = hk * G + g;
            const int s = it % ST;
            sm90::mbar_wait(q_empty(s), ((it / ST) & 1) ^ 1);
            sm90::mbar_arrive_expect_tx(q_full(s), 2 * Q_BYTES + 2 * BM * 4);
#pragma unroll
            for (int p = 0; p < NP; ++p) {
              sm90::tma_load_4d(sQ + s * Q_BYTES + p * Q_PANEL, &tmq, q_full(s), 64 * p, m * BM, h, b);
              sm90::tma_load_4d(sG + s * Q_BYTES + p * Q_PANEL, &tmg, q_full(s), 64 * p, m * BM, h, b);
            }
            const long long row0 = ((long long)b * Hq + h) * Mpad + (long long)m * BM;
            sm90::bulk_load(sL + s * BM * 4, Lse2 + row0, BM * 4, q_full(s));
            sm90::bulk_load(sDl + s * BM * 4, Dlt + row0, BM * 4, q_full(s));
          }
        }
      }
    }
    return;
  }

  // ---------------- consumers ----------------
  sm90::reg_alloc<CREG>();
  const int w = wg - 1;                    // keys [64 w, 64 w + 64) of the tile
  const int warp = tw >> 5, lane = tw & 31;
  const int g8 = lane >> 2, tq = lane & 3;
  const bool leader = tw == 0;
  u32 kv_it = 0, it = 0;

  for (int r = 0; (long long)r * gridDim.x < n_items; ++r) {
    const int item = item_index(r, n_items, snake);
    if (item < 0) continue;
    const int n = item / (B * Hk), bk = item - n * (B * Hk);
    const int b = bk / Hk, hk = bk - b * Hk;
    const int n0 = n * BN;
    const int key_a = n0 + 64 * w + 16 * warp + g8;  // this thread's keys: key_a, key_a + 8
    int mf, ml, pf, pl;
    query_tiles<MASK>(mask, n, Sq, Sk, n_mtiles, mf, ml);
    query_tiles<MASK>(mask, n - 1, Sq, Sk, n_mtiles, pf, pl);  // the key tile before

    float dk[D / 2], dv[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) dk[i] = dv[i] = 0.f;

    if (ml >= mf) {
      sm90::mbar_wait(kv_full, kv_it & 1);
      const u32 k_rows = sK + 64 * w * 128, v_rows = sV + 64 * w * 128;
      for (int m = ml; m >= mf; --m) {
        const int m0 = m * BM;
        // does any pair of (keys of this warpgroup, rows of m) need the mask?
        bool partial = n0 + 64 * w + 64 > Sk;
        if constexpr (MASK) {
          int lo_f, hi_f, lo_l, hi_l;
          row_interval(mask, m0, Sk, lo_f, hi_f);
          row_interval(mask, (m0 + BM < Sq ? m0 + BM : Sq) - 1, Sk, lo_l, hi_l);
          partial = partial || lo_l > n0 + 64 * w || hi_f < n0 + 64 * w + 63;
        }
        const bool after = pl >= pf && m >= pf && m <= pl;  // the key tile before adds to m
        for (int g = 0; g < G; ++g, ++it) {
          const int h = hk * G + g;
          const int s = it % ST;
          const u32 q_s = sQ + s * Q_BYTES, g_s = sG + s * Q_BYTES;
          const u32 ds_buf = sDS + (it & 1) * DS_BYTES;  // alternate: a buffer is rewritten two steps on
          float st[BM / 2], dpt[BM / 2];
          sm90::mbar_wait(q_full(s), (it / ST) & 1);
          sm90::wg_fence();
          gemm_t<D, BF16>(st, k_rows, KV_PANEL, q_s, Q_PANEL);
          sm90::wg_commit();
          gemm_t<D, BF16>(dpt, v_rows, KV_PANEL, g_s, Q_PANEL);
          sm90::wg_commit();
          // this thread's query columns: 8 j + 2 tq + {0, 1}
          float2 lse2[BM / 8], dl[BM / 8];
#pragma unroll
          for (int j = 0; j < BM / 8; ++j) {
            lse2[j] = *reinterpret_cast<const float2*>(pL + s * BM + 8 * j + 2 * tq);
            dl[j] = *reinterpret_cast<const float2*>(pDl + s * BM + 8 * j + 2 * tq);
          }
          sm90::wg_wait<1>();
          sm90::reg_fence(st);
          if (partial) {  // uniform over the warpgroup
            if constexpr (MASK) {
              if (tw < BM) {
                const int row = m0 + tw < Sq ? m0 + tw : Sq - 1;
                row_interval(mask, row, Sk, s_lo[w][tw], s_hi[w][tw]);
              }
              sm90::bar_sync(WG_BAR + w, 128);
            }
#pragma unroll
            for (int j = 0; j < BM / 8; ++j)
#pragma unroll
              for (int c = 0; c < 2; ++c) {
                const int col = 8 * j + 2 * tq + c;
                const int lo = MASK ? s_lo[w][col] : 0, hi = MASK ? s_hi[w][col] : Sk - 1;
                if (key_a < lo || key_a > hi) st[4 * j + c] = SP_NEG_INF;
                if (key_a + 8 < lo || key_a + 8 > hi) st[4 * j + 2 + c] = SP_NEG_INF;
              }
          }
#pragma unroll
          for (int j = 0; j < BM / 8; ++j) {
            st[4 * j] = ex2(fmaf(st[4 * j], sl2, -lse2[j].x));
            st[4 * j + 1] = ex2(fmaf(st[4 * j + 1], sl2, -lse2[j].y));
            st[4 * j + 2] = ex2(fmaf(st[4 * j + 2], sl2, -lse2[j].x));
            st[4 * j + 3] = ex2(fmaf(st[4 * j + 3], sl2, -lse2[j].y));
          }
          sm90::wg_wait<0>();
          sm90::reg_fence(dpt);
#pragma unroll
          for (int j = 0; j < BM / 8; ++j) {
            dpt[4 * j] = st[4 * j] * (dpt[4 * j] - dl[j].x);
            dpt[4 * j + 1] = st[4 * j + 1] * (dpt[4 * j + 1] - dl[j].y);
            dpt[4 * j + 2] = st[4 * j + 2] * (dpt[4 * j + 2] - dl[j].x);
            dpt[4 * j + 3] = st[4 * j + 3] * (dpt[4 * j + 3] - dl[j].y);
          }
          u32 pa[BM / 4], sa[BM / 4];
          pack_a<BF16>(st, pa);
          pack_a<BF16>(dpt, sa);
          // dS^T rows (keys) -> shared memory, 128-byte swizzled rows of 64 queries
          {
            const int r = 64 * w + 16 * warp + g8;
            unsigned char* ds = smem_raw + (ds_buf - sm90::smem_addr(smem_raw));
#pragma unroll
            for (int j = 0; j < BM / 8; ++j) {
              *reinterpret_cast<u32*>(ds + r * 128 + ((j ^ (r & 7)) << 4) + 4 * tq) = sa[2 * j];
              *reinterpret_cast<u32*>(ds + (r + 8) * 128 + ((j ^ ((r + 8) & 7)) << 4) + 4 * tq) =
                  sa[2 * j + 1];
            }
          }
          sm90::wg_fence();
          gemm_acc<D, BF16>(dv, pa, g_s, Q_PANEL);
          gemm_acc<D, BF16>(dk, sa, q_s, Q_PANEL);
          sm90::wg_commit();
          sm90::fence_proxy_async();
          sm90::bar_sync(DS_BAR, 256);  // both halves of dS^T written
          // dQ: with D = 128 each warpgroup takes one 64-column panel of K; with D = 64
          // the warpgroups take the steps in turn.
          // dQ: with D = 128 consumer w takes the 64 columns of K's panel w over all
          // keys; with D = 64 all columns over its own 64 keys (the writers add the two)
          float dq[32];
          if constexpr (NF == 2)
            gemm_dq<BF16, BN / 16>(dq, ds_buf, sK + w * KV_PANEL, KV_PANEL);
          else
            gemm_dq<BF16, 4>(dq, ds_buf + 64 * w * 128, sK + 64 * w * 128, KV_PANEL);
          sm90::wg_commit();
          sm90::wg_wait<0>();
          sm90::reg_fence(dv);
          sm90::reg_fence(dk);
          sm90::reg_fence(dq);
          if (leader) sm90::mbar_arrive(q_empty(s));
          // dq += scale dQ, by atomics; with `ordered` after the key tile before has
          // added to this tile (its flag reaches n), then flag = n + 1. With D = 64
          // consumer 0 first adds consumer 1's half (the same fragment layout: each
          // thread reads back the positions it holds) and adds the sum alone.
          float* stage1 = reinterpret_cast<float*>(generic(sDQ));
          if (NF == 1 && w == 1) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
              const int row = 16 * warp + g8 + 8 * half;
#pragma unroll
              for (int j = 0; j < 8; ++j)
                *reinterpret_cast<float2*>(stage1 + row * DQ_LD + 8 * j + 2 * tq) =
                    make_float2(dq[4 * j + 2 * half], dq[4 * j + 2 * half + 1]);
            }
            sm90::bar_sync(DQ_BAR, 256);
          } else {
            if (NF == 1) {
              sm90::bar_sync(DQ_BAR, 256);
#pragma unroll
              for (int half = 0; half < 2; ++half) {
                const int row = 16 * warp + g8 + 8 * half;
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                  const float2 o = *reinterpret_cast<const float2*>(stage1 + row * DQ_LD + 8 * j +
                                                                    2 * tq);
                  dq[4 * j + 2 * half] += o.x;
                  dq[4 * j + 2 * half + 1] += o.y;
                }
              }
            }
            int* flag = flags + (((long long)b * Hq + h) * n_mtiles + m) * NF + (NF == 2 ? w : 0);
            if (ordered) {
              if (leader && after) wait_flag(flag, n);
              sm90::bar_sync(WG_BAR + w, 128);
            }
#pragma unroll
            for (int half = 0; half < 2; ++half) {
              const int row = m0 + 16 * warp + g8 + 8 * half;
              if (row >= Sq) continue;
              float* qp = dQ + b * dqsb + h * dqsh + (long long)row * dqss +
                          (NF == 2 ? 64 * w : 0) + 2 * tq;
#pragma unroll
              for (int j = 0; j < 8; ++j)
                sm90::red_add2(qp + 8 * j, dq[4 * j + 2 * half] * scale,
                               dq[4 * j + 2 * half + 1] * scale);
            }
            if (ordered) {
              __threadfence();
              sm90::bar_sync(WG_BAR + w, 128);
              if (leader) sm90::st_release(flag, n + 1);
            }
          }
        }
      }
      if (leader) sm90::mbar_arrive(kv_empty);
      ++kv_it;
    }

    // dK (scaled), dV of this warpgroup's keys, written (or added) once
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int key = key_a + 8 * half;
      if (key >= Sk) continue;
      float* kp = dK + b * dksb + hk * dksh + (long long)key * dkss + 2 * tq;
      float* vp = dV + b * dvsb + hk * dvsh + (long long)key * dvss + 2 * tq;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        float2 kv = make_float2(dk[4 * j + 2 * half] * scale, dk[4 * j + 2 * half + 1] * scale);
        float2 vv = make_float2(dv[4 * j + 2 * half], dv[4 * j + 2 * half + 1]);
        if (accumulate) {
          const float2 ko = *reinterpret_cast<const float2*>(kp + 8 * j);
          const float2 vo = *reinterpret_cast<const float2*>(vp + 8 * j);
          kv.x += ko.x; kv.y += ko.y; vv.x += vo.x; vv.y += vo.y;
        }
        *reinterpret_cast<float2*>(kp + 8 * j) = kv;
        *reinterpret_cast<float2*>(vp + 8 * j) = vv;
      }
    }
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // built without sm_90a features: fail loudly rather than leave outputs unwritten
#endif  // SEQPAR_SM90_ENABLED
}

// lse (natural log, float64, any strides in elements) -> lse2 = lse * log2(e) (+inf where
// the row saw no key, and in the padding rows, so that exp2(s - lse2) = 0 there); delta
// (float32, contiguous (B, Hq, Sq)) -> padded copy; flags zeroed. Outputs (B, Hq, Mpad).
__global__ void bwd_sm90_prep(const double* __restrict__ Lse, const float* __restrict__ Delta,
                              float* __restrict__ Lse2, float* __restrict__ Dlt,
                              int* __restrict__ flags, long long n_flags, int Sq, int Hq, int B,
                              int Mpad, long long lsb, long long lsh, long long lss) {
  const long long total = (long long)B * Hq * Mpad;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += stride) {
    const long long bh = i / Mpad;
    const int row = (int)(i - bh * Mpad);
    const int b = (int)(bh / Hq), h = (int)(bh - (long long)b * Hq);
    float l2 = __int_as_float(0x7f800000), d = 0.f;
    if (row < Sq) {
      const double lse = Lse[b * lsb + h * lsh + row * lss];
      if (lse != -__longlong_as_double(0x7ff0000000000000LL)) l2 = (float)(lse * 1.4426950408889634);
      d = Delta[bh * Sq + row];
    }
    Lse2[i] = l2;
    Dlt[i] = d;
  }
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n_flags; i += stride)
    flags[i] = 0;
}

#ifdef SEQPAR_SM90_INSTANTIATE  // offline builds (nvcc -cubin): the shipped configurations
#define SEQPAR_BWD90(D, BF, MASK)                                                           \
  template __global__ void bwd_sm90<D, BF, MASK, 24, 240>(                                 \
      const __grid_constant__ TmaDesc, const __grid_constant__ TmaDesc,                    \
      const __grid_constant__ TmaDesc, const __grid_constant__ TmaDesc, const float*,      \
      const float*, float*, float*, float*, int*, const long long*, int, int, int, int, int, \
      int, int, long long, long long, long long, long long, long long, long long, long long, \
      long long, long long, long long, long long, long long, long long, int, float, float,  \
      int, int, int);
SEQPAR_BWD90(128, true, false)
SEQPAR_BWD90(128, true, true)
SEQPAR_BWD90(64, true, false)
SEQPAR_BWD90(64, false, true)
#endif
