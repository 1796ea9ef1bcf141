// Probes of the Hopper conventions of kernels/sm90.cuh, one layer at a time:
//   probe_wgmma_ss  C (64 x 128) = A (64 x 128) B^T, B (128 x 128) K-major: both
//                   operands written to shared memory by ordinary stores in the
//                   128-byte swizzle, read by wgmma through descriptors.
//   probe_wgmma_rs  C (64 x N) = P (64 x 64) V, P from registers (A fragments), V
//                   (64 x N) row-major in shared memory, read transposed (MN-major).
//   probe_tma       one TMA box of a 4-D tensor map into shared memory, copied out
//                   byte for byte (the host checks the swizzled image and the
//                   zero fill past the end).
#include "sm90.cuh"

// byte offset of element (row, col) of a tile of `rows` rows stored as 64-column
// panels with the 128-byte swizzle
DEVI u32 sw128_offset(int row, int col, int rows) {
  const int p = col >> 6, cc = col & 63;
  return p * rows * 128 + row * 128 + ((((cc >> 3) ^ (row & 7))) << 4) + (cc & 7) * 2;
}

// accumulator element i of this thread -> (row, col) of the 64 x N tile
DEVI void acc_pos(int i, int& row, int& col) {
  const int tw = threadIdx.x & 127, warp = tw >> 5, lane = tw & 31;
  row = 16 * warp + (lane >> 2) + 8 * ((i >> 1) & 1);
  col = 8 * (i >> 2) + 2 * (lane & 3) + (i & 1);
}

template <bool BF16>
__global__ void __launch_bounds__(128) probe_wgmma_ss(const u16* A, const u16* Bm, float* C) {
#if SEQPAR_SM90_ENABLED
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const u32 base_s = (sm90::smem_addr(smem_raw) + 1023u) & ~1023u;
  unsigned char* base = smem_raw + (base_s - sm90::smem_addr(smem_raw));
  const u32 a_bytes = 64 * 128 * 2;
  for (int i = threadIdx.x; i < 64 * 128; i += 128) {
    const int r = i / 128, c = i % 128;
    *reinterpret_cast<u16*>(base + sw128_offset(r, c, 64)) = A[i];
  }
  for (int i = threadIdx.x; i < 128 * 128; i += 128) {
    const int r = i / 128, c = i % 128;
    *reinterpret_cast<u16*>(base + a_bytes + sw128_offset(r, c, 128)) = Bm[i];
  }
  sm90::fence_proxy_async();
  __syncthreads();
  float d[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) d[i] = 0.f;
  const u64 da = sm90::desc_sw128(base_s, 16, 1024);
  const u64 db = sm90::desc_sw128(base_s + a_bytes, 16, 1024);
  sm90::wg_fence();
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    const u32 oa = (kk >> 2) * 64 * 128 + (kk & 3) * 32;
    const u32 ob = (kk >> 2) * 128 * 128 + (kk & 3) * 32;
    sm90::Wgmma<128, BF16>::template ss<0, 0>(d, da + (oa >> 4), db + (ob >> 4), kk > 0);
  }
  sm90::wg_commit();
  sm90::wg_wait<0>();
  sm90::reg_fence(d);
#pragma unroll
  for (int i = 0; i < 64; ++i) {
    int r, c;
    acc_pos(i, r, c);
    C[r * 128 + c] = d[i];
  }
#endif
}

template <int N, bool BF16>
__global__ void __launch_bounds__(128) probe_wgmma_rs(const u16* P, const u16* V, float* C,
                                                      int lbo, int sbo) {
#if SEQPAR_SM90_ENABLED
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const u32 base_s = (sm90::smem_addr(smem_raw) + 1023u) & ~1023u;
  unsigned char* base = smem_raw + (base_s - sm90::smem_addr(smem_raw));
  for (int i = threadIdx.x; i < 64 * N; i += 128) {
    const int r = i / N, c = i % N;  // r: key, c: output column
    *reinterpret_cast<u16*>(base + sw128_offset(r, c, 64)) = V[i];
  }
  sm90::fence_proxy_async();
  __syncthreads();
  const int tw = threadIdx.x & 127, warp = tw >> 5, lane = tw & 31;
  const int r0 = 16 * warp + (lane >> 2), t = lane & 3;
  const u32* P32 = reinterpret_cast<const u32*>(P);  // 64 x 64 16-bit = 64 x 32 pairs
  u32 a[16];
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    a[4 * kk + 0] = P32[r0 * 32 + 8 * kk + t];
    a[4 * kk + 1] = P32[(r0 + 8) * 32 + 8 * kk + t];
    a[4 * kk + 2] = P32[r0 * 32 + 8 * kk + 4 + t];
    a[4 * kk + 3] = P32[(r0 + 8) * 32 + 8 * kk + 4 + t];
  }
  float d[N / 2];
#pragma unroll
  for (int i = 0; i < N / 2; ++i) d[i] = 0.f;
  const u64 db = sm90::desc_sw128(base_s, lbo, sbo);
  sm90::wg_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
    sm90::Wgmma<N, BF16>::template rs<1>(d, a + 4 * kk, db + ((kk * 2048) >> 4), kk > 0);
  sm90::wg_commit();
  sm90::wg_wait<0>();
  sm90::reg_fence(d);
#pragma unroll
  for (int i = 0; i < N / 2; ++i) {
    int r, c;
    acc_pos(i, r, c);
    C[r * N + c] = d[i];
  }
#endif
}

__global__ void __launch_bounds__(128) probe_tma(const __grid_constant__ TmaDesc tm, u32* out,
                                                 int c0, int c1, int c2, int c3, int bytes) {
#if SEQPAR_SM90_ENABLED
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const u32 base_s = (sm90::smem_addr(smem_raw) + 1023u) & ~1023u;
  const unsigned char* base = smem_raw + (base_s - sm90::smem_addr(smem_raw));
  const u32 bar = base_s + bytes;  // bytes is a multiple of 1024
  if (threadIdx.x == 0) {
    sm90::mbar_init(bar, 1);
    sm90::mbar_init_fence();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    sm90::mbar_arrive_expect_tx(bar, bytes);
    sm90::tma_load_4d(base_s, &tm, bar, c0, c1, c2, c3);
  }
  sm90::mbar_wait(bar, 0);
  const u32* src = reinterpret_cast<const u32*>(base);
  for (int i = threadIdx.x; i < bytes / 4; i += 128) out[i] = src[i];
#endif
}

#ifdef SEQPAR_SM90_INSTANTIATE
template __global__ void probe_wgmma_ss<true>(const u16*, const u16*, float*);
template __global__ void probe_wgmma_rs<128, true>(const u16*, const u16*, float*, int, int);
template __global__ void probe_wgmma_rs<64, true>(const u16*, const u16*, float*, int, int);
#endif
