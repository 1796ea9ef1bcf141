// seqpar: device primitives shared by the attention kernels (no CUDA headers:
// 16-bit values are raw bits converted with PTX, so NVRTC needs no include path).
#pragma once

#define DEVI __device__ __forceinline__

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define SP_NEG_INF (__int_as_float(0xff800000))
#define SP_LN2 0.69314718055994530942f

DEVI u32 smem_u32(const void* p) {
  u32 r;
  asm volatile("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }\n"
               : "=r"(r) : "l"(p));
  return r;
}

// 16-byte async copy global -> shared; zero-fills when !pred (no bytes read).
DEVI void cp_async16(u32 dst, const void* src, bool pred) {
  int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :: "r"(dst), "l"(src), "r"(n) : "memory");
}
// the same, for data read once in a long stream: also asks L2 to fetch 256 bytes
DEVI void cp_async16_stream(u32 dst, const void* src, bool pred) {
  int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n"
               :: "r"(dst), "l"(src), "r"(n) : "memory");
}
DEVI void cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> DEVI void cp_wait() {
  asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
}

DEVI void ldsm_x4(u32 a, u32& r0, u32& r1, u32& r2, u32& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(a));
}
DEVI void ldsm_x4_t(u32 a, u32& r0, u32& r1, u32& r2, u32& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(a));
}

template <bool BF16>
DEVI void mma16816(float* c, const u32* a, u32 b0, u32 b1) {
  if constexpr (BF16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// (lo, hi) floats -> packed 16-bit pair, round to nearest even.
template <bool BF16>
DEVI u32 pack2(float lo, float hi) {
  u32 r;
  if constexpr (BF16) {
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  } else {
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  }
  return r;
}

template <bool BF16>
DEVI void unpack2(u32 x, float& lo, float& hi) {
  if constexpr (BF16) {
    lo = __uint_as_float(x << 16);
    hi = __uint_as_float(x & 0xffff0000u);
  } else {
    asm("{ .reg .b16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h; }\n"
        : "=f"(lo), "=f"(hi) : "r"(x));
  }
}

DEVI float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// one 16-bit value <-> float (round to nearest even)
template <bool BF16>
DEVI float half_to_float(u16 x) {
  float y;
  if constexpr (BF16) {
    y = __uint_as_float(((u32)x) << 16);
  } else {
    asm("{ cvt.f32.f16 %0, %1; }\n" : "=f"(y) : "h"(x));
  }
  return y;
}
template <bool BF16>
DEVI u16 float_to_half(float x) {
  u16 y;
  if constexpr (BF16) {
    asm("{ cvt.rn.bf16.f32 %0, %1; }\n" : "=h"(y) : "f"(x));
  } else {
    asm("{ cvt.rn.f16.f32 %0, %1; }\n" : "=h"(y) : "f"(x));
  }
  return y;
}
