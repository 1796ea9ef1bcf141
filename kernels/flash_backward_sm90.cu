// seqpar: attention backward for Hopper (sm_90a), one fused kernel per call.
//
//   bwd_sm90<D, BF16, MASK, PREG, CREG>   fp16 / bf16, D = 64 or 128
//   bwd_sm90_prep                         lse -> log2 units, delta padded, flags and the
//                                         dQ sums zeroed
//   bwd_sm90_dq                           the dQ sums -> dq (written, or added)
//
// Work item = (batch, K/V head, key tile of BN = 128 keys), dealt to a persistent grid
// of one block per SM (round-robin, or snake order under a mask: see item_index). Roles:
//   warpgroup 0  producer (registers PREG): one thread loads the item's K and V tile
//                once by TMA, then streams the (query tile of BM = 64 rows, query head
//                of the GQA group) steps: Q, dO by TMA, log2-lse and delta by bulk
//                copy, into a two-stage ring completed on mbarriers. A second thread,
//                the dQ writer, adds each step's dQ tile (staged in shared memory by
//                the consumers) into the float32 dQ sums with one bulk reduction.
//   warpgroups 1, 2  consumers (registers CREG); consumer w owns keys
//                [64 w, 64 w + 64) of the tile. Per step:
//                  S^T  = K Q^T     dP^T = V dO^T      (wgmma, both from shared memory)
//                  P^T  = exp2(S^T sl2 - lse2)         dS^T = P^T (dP^T - delta)
//                  dV  += P^T dO    dK  += dS^T Q      (wgmma, P^T and dS^T from registers)
//                  dS^T -> shared memory (16-bit, swizzled), then
//                  dQ_w  = dS K[:, half w]   (D = 128)  (wgmma, both from shared memory,
//                  dQ_w  = dS_w K_w          (D = 64)    dS read transposed)
//                  scale dQ_w -> shared memory (fp32, swizzled; with D = 64 consumer 0
//                                adds consumer 1's dQ_1 there), for the dQ writer
//                dK, dV stay in registers over the item (all heads of the group) and are
//                written once.
// dQ sums: float32, (B, Hq, query tile, D / 64 column halves) chunks of 64 x 64, each
// chunk contiguous and stored as the shared-memory tile is (row r, 8-column group j at
// group position j ^ (r & 7), which keeps the consumers' stores free of bank
// conflicts), so one bulk reduction adds a whole tile; bwd_sm90_dq undoes the layout.
// Determinism: the reductions into one chunk happen in a fixed order, increasing key
// tile, when `ordered` is set: a flag per chunk holds 1 + the last key tile that added
// to it; the writer waits for its key tile's predecessor when that tile contributes to
// the same query tile (the key tiles that see a query tile are one interval, the mask's
// bounds being monotone). The consumers never wait for the order, only for the staging
// buffer. Steps go from the last query tile to the first, so a tile's predecessor is a
// step ahead in the steady state. Every block of the grid is resident (one per SM), and
// an item waits only on an item dealt before it, so the waits always end; a wait longer
// than ORDER_TIMEOUT_NS gives up the order (the sum stays right, its rounding order is
// then not fixed).
//
// Layouts: q, dout (B, Sq, Hq, D) and k, v (B, Sk, Hk, D) through TMA tensor maps (any
// 16-byte-multiple strides; rows past the end read as zeros); lse2 and delta (B, Hq,
// Mpad) float32 from bwd_sm90_prep; the dQ sums zeroed by it; dk, dv (B, Sk, Hk, D)
// float32 with element strides, 8-byte aligned; accumulate != 0 adds dk, dv (and, in
// bwd_sm90_dq, dq) to what they hold.
#include "sm90.cuh"
#include "mask.cuh"

namespace bwd90 {

constexpr int BM = 64;    // query rows per step
constexpr int BN = 128;   // keys per work item (64 per consumer warpgroup)
constexpr int ST = 2;     // Q / dO stages
constexpr int DQ_TILE = BM * 64;  // floats of one dQ chunk (64 rows x 64 columns)
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

// Position of (row, column) in a dQ chunk: 8-column group j = col / 8 stored at group
// position j ^ (row & 7).
DEVI int dq_pos(int row, int col) { return row * 64 + (((col >> 3) ^ (row & 7)) << 3) + (col & 7); }

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
         const float* __restrict__ Lse2, const float* __restrict__ Dlt, float* __restrict__ dQw,
         float* __restrict__ dK, float* __restrict__ dV, int* __restrict__ flags,
         const long long* __restrict__ docs, int Sq, int Sk, int Hq, int Hk, int B,
         int n_mtiles, int n_items, long long dksb, long long dkss, long long dksh, long long dvsb, long long dvss,
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
  constexpr int NF = D / 64;              // dQ chunks per query tile (column halves)
  constexpr u32 DQ_BYTES = DQ_TILE * 4;   // one staged dQ chunk
  // staging slots per chunk: a consumer runs up to two steps ahead of the writer's waits
  // for the order (one slot left the D = 128 deterministic rate at 0.73 x any order)
  constexpr int DQ_ST = 2;
  constexpr int NSLOT = NF * DQ_ST;
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
  const u32 sDQ = sDl + ST * BM * 4;          // dQ slot i at sDQ + i * DQ_BYTES
  const u32 bars = sDQ + NSLOT * DQ_BYTES;
  const u32 kv_full = bars, kv_empty = bars + 8;
  auto q_full = [&](int s) { return bars + 16 + 8 * s; };
  auto q_empty = [&](int s) { return bars + 16 + 8 * (ST + s); };
  auto dq_slot = [&](int c, u32 step) { return (int)(step % DQ_ST) * NF + c; };
  auto dq_full = [&](int i) { return bars + 16 + 8 * (2 * ST + i); };
  auto dq_empty = [&](int i) { return bars + 16 + 8 * (2 * ST + NSLOT + i); };
  auto generic = [&](u32 a) { return smem_raw + (a - sm90::smem_addr(smem_raw)); };
  // generic pointers to the lse2 / delta stages (read with ordinary loads)
  const float* pL = reinterpret_cast<const float*>(generic(sL));
  const float* pDl = reinterpret_cast<const float*>(generic(sDl));

  // visible keys [lo, hi] of the rows of a partial step, relative to the warpgroup's
  // first key and clamped to [0, 64] / [-1, 63]: bytes after the barriers (no static
  // shared memory, whose 1024-byte padding would not fit beside D = 128's tiles)
  signed char(*s_lo)[BM] = reinterpret_cast<signed char(*)[BM]>(generic(bars + 8 * (6 + 2 * NSLOT)));
  signed char(*s_hi)[BM] = s_lo + 2;

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
    for (int i = 0; i < NSLOT; ++i) {
      sm90::mbar_init(dq_full(i), 128);  // every thread of the consumer that stages it
      sm90::mbar_init(dq_empty(i), 1);
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
    } else if (tw == 32) {
      // ---------------- dQ writer: one bulk reduction per staged chunk ----------------
      u32 it = 0;
      for (int r = 0; (long long)r * gridDim.x < n_items; ++r) {
        const int item = item_index(r, n_items, snake);
        if (item < 0) continue;
        const int n = item / (B * Hk), bk = item - n * (B * Hk);
        const int b = bk / Hk, hk = bk - b * Hk;
        int mf, ml, pf, pl;
        query_tiles<MASK>(mask, n, Sq, Sk, n_mtiles, mf, ml);
        if (ml < mf) continue;
        query_tiles<MASK>(mask, n - 1, Sq, Sk, n_mtiles, pf, pl);  // the key tile before
        for (int m = ml; m >= mf; --m) {
          const bool after = pl >= pf && m >= pf && m <= pl;  // the key tile before adds to m
          for (int g = 0; g < G; ++g, ++it) {
            const long long chunk0 = (((long long)b * Hq + hk * G + g) * n_mtiles + m) * NF;
#pragma unroll
            for (int c = 0; c < NF; ++c) {
              int* flag = flags + chunk0 + c;
              if (ordered && after) wait_flag(flag, n);
              const int slot = dq_slot(c, it);
              sm90::mbar_wait(dq_full(slot), (it / DQ_ST) & 1);
              sm90::bulk_reduce_add_f32(dQw + (chunk0 + c) * DQ_TILE, sDQ + slot * DQ_BYTES,
                                        DQ_BYTES);
              sm90::bulk_commit();
              sm90::bulk_wait_read<0>();
              sm90::mbar_arrive(dq_empty(slot));
              if (ordered) {
                sm90::bulk_wait<0>();
                __threadfence();
                sm90::st_release(flag, n + 1);
              }
            }
          }
        }
      }
      sm90::bulk_wait<0>();
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
    int mf, ml;
    query_tiles<MASK>(mask, n, Sq, Sk, n_mtiles, mf, ml);

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
        for (int g = 0; g < G; ++g, ++it) {
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
                int lo, hi;
                row_interval(mask, row, Sk, lo, hi);
                const int k_w = n0 + 64 * w;
                lo -= k_w;
                hi -= k_w;
                s_lo[w][tw] = (signed char)(lo < 0 ? 0 : lo > 64 ? 64 : lo);
                s_hi[w][tw] = (signed char)(hi < -1 ? -1 : hi > 63 ? 63 : hi);
              }
              sm90::bar_sync(WG_BAR + w, 128);
            }
#pragma unroll
            for (int j = 0; j < BM / 8; ++j)
#pragma unroll
              for (int c = 0; c < 2; ++c) {
                const int col = 8 * j + 2 * tq + c;
                // this thread's keys relative to the warpgroup's first: ka, ka + 8
                const int ka = 16 * warp + g8;
                const int lo = MASK ? s_lo[w][col] : 0;
                const int hi = MASK ? s_hi[w][col] : Sk - 1 - (n0 + 64 * w);
                if (ka < lo || ka > hi) st[4 * j + c] = SP_NEG_INF;
                if (ka + 8 < lo || ka + 8 > hi) st[4 * j + 2 + c] = SP_NEG_INF;
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
          // scale dQ -> the staging chunk, once the writer has taken the previous one.
          // With D = 64 consumer 1 stages its half and consumer 0 adds its own to it
          // (the same fragment layout: each thread reads back the positions it holds).
          // Rows r = 16 warp + g8 + 8 half, columns 8 j + 2 tq: byte r * 256 + 8 tq, with
          // the 8-column group at (j ^ g8) * 32 (the chunk is 1024-byte aligned, so the
          // xor touches only bits 5-7); computed in place, not hoisted out of the loop.
          const int slot = dq_slot(NF == 2 ? w : 0, it);
          const u32 stage = sDQ + slot * DQ_BYTES + (16 * warp + g8) * 256 + 8 * tq + (g8 << 5);
          if (NF == 2 || w == 1) sm90::mbar_wait(dq_empty(slot), ((it / DQ_ST) & 1) ^ 1);
          if (NF == 1) {
            if (w == 0) sm90::bar_sync(DQ_BAR, 256);
          }
#pragma unroll
          for (int half = 0; half < 2; ++half) {
#pragma unroll
            for (int j = 0; j < 8; ++j) {
              const u32 addr = (stage ^ (j << 5)) + half * 2048;
              float x = dq[4 * j + 2 * half] * scale, y = dq[4 * j + 2 * half + 1] * scale;
              if (NF == 1 && w == 0) {
                const float2 o = sm90::ld_shared2(addr);
                x += o.x;
                y += o.y;
              }
              sm90::st_shared2(addr, x, y);
            }
          }
          if (NF == 1 && w == 1) {
            sm90::bar_sync(DQ_BAR, 256);
          } else {
            sm90::fence_proxy_async();
            sm90::mbar_arrive(dq_full(slot));
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
// (float32, contiguous (B, Hq, Sq)) -> padded copy; flags and the n_sums4 float4 of the
// dQ sums zeroed. Outputs (B, Hq, Mpad).
__global__ void bwd_sm90_prep(const double* __restrict__ Lse, const float* __restrict__ Delta,
                              float* __restrict__ Lse2, float* __restrict__ Dlt,
                              int* __restrict__ flags, long long n_flags,
                              float4* __restrict__ sums, long long n_sums4, int Sq, int Hq,
                              int B, int Mpad, long long lsb, long long lsh, long long lss) {
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
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n_sums4; i += stride)
    sums[i] = make_float4(0.f, 0.f, 0.f, 0.f);
}

// dq (B, Sq, Hq, D) float32, element strides (8-byte aligned rows) = (or += with
// accumulate) the dQ sums of bwd_sm90, read out of their chunk layout.
__global__ void bwd_sm90_dq(const float* __restrict__ sums, float* __restrict__ dq, int Sq,
                            int Hq, int B, int D, int n_mtiles, long long sb, long long ss,
                            long long sh, int accumulate) {
  const int nf = D / 64, quads = D / 4;
  const long long total = (long long)B * Sq * Hq * quads;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += stride) {
    long long t = i / quads;
    const int col = (int)(i - t * quads) * 4;
    const int h = (int)(t % Hq);
    t /= Hq;
    const int row = (int)(t % Sq);
    const int b = (int)(t / Sq);
    const long long chunk = (((long long)b * Hq + h) * n_mtiles + row / 64) * nf + col / 64;
    const float4 x = *reinterpret_cast<const float4*>(
        sums + chunk * bwd90::DQ_TILE + bwd90::dq_pos(row & 63, col & 63));
    float2* p = reinterpret_cast<float2*>(dq + b * sb + row * ss + h * sh + col);
    float2 lo = make_float2(x.x, x.y), hi = make_float2(x.z, x.w);
    if (accumulate) {
      const float2 olo = p[0], ohi = p[1];
      lo.x += olo.x; lo.y += olo.y; hi.x += ohi.x; hi.y += ohi.y;
    }
    p[0] = lo;
    p[1] = hi;
  }
}

#ifdef SEQPAR_SM90_INSTANTIATE  // offline builds (nvcc -cubin): the shipped configurations
#define SEQPAR_BWD90(D, BF, MASK)                                                           \
  template __global__ void bwd_sm90<D, BF, MASK, 24, 240>(                                 \
      const __grid_constant__ TmaDesc, const __grid_constant__ TmaDesc,                    \
      const __grid_constant__ TmaDesc, const __grid_constant__ TmaDesc, const float*,      \
      const float*, float*, float*, float*, int*, const long long*, int, int, int, int, int, \
      int, int, long long, long long, long long, long long, long long, long long, long long, \
      long long, long long, long long, int, float, float, int, int, int);
SEQPAR_BWD90(128, true, false)
SEQPAR_BWD90(128, true, true)
SEQPAR_BWD90(64, true, false)
SEQPAR_BWD90(64, false, true)
#endif
