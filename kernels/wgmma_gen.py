"""Writes the wgmma wrappers of kernels/sm90.cuh (between its GENERATED markers).

Run after changing the shapes: ``python kernels/wgmma_gen.py``. Each wrapper is
one m64nNk16 wgmma with fp32 accumulators, in two forms: both operands from
shared memory (descriptors) and A from registers (four 32-bit registers per
thread, the mma.sync m16n8k16 A fragment of the thread's warp).
"""
import re
from pathlib import Path

SHAPES = (64, 80, 96, 112, 128, 176, 192, 256)
TYPES = (("false", "f16"), ("true", "bf16"))


def wrapper(n, bf16, ty):
    nd = n // 2
    regs = ", ".join(f"%{i}" for i in range(nd))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(nd))
    ss = (f'    asm volatile(\n'
          f'        "{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{nd + 2}, 0;\\n"\n'
          f'        "wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{ty}.{ty} "\n'
          f'        "{{{regs}}}, "\n'
          f'        "%{nd}, %{nd + 1}, p, 1, 1, %{nd + 3}, %{nd + 4};\\n}}\\n"\n'
          f'        : {outs}\n'
          f'        : "l"(da), "l"(db), "r"(acc), "n"(TA), "n"(TB));\n')
    rs = (f'    asm volatile(\n'
          f'        "{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{nd + 5}, 0;\\n"\n'
          f'        "wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{ty}.{ty} "\n'
          f'        "{{{regs}}}, "\n'
          f'        "{{%{nd}, %{nd + 1}, %{nd + 2}, %{nd + 3}}}, %{nd + 4}, p, 1, 1, %{nd + 6};\\n}}\\n"\n'
          f'        : {outs}\n'
          f'        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc), "n"(TB));\n')
    return (f"template <> struct Wgmma<{n}, {bf16}> {{\n"
            f"  template <int TA, int TB>\n"
            f"  static DEVI void ss(float* d, u64 da, u64 db, int acc) {{\n{ss}  }}\n"
            f"  template <int TB>\n"
            f"  static DEVI void rs(float* d, const u32* a, u64 db, int acc) {{\n{rs}  }}\n"
            f"}};\n")


def main():
    path = Path(__file__).with_name("sm90.cuh")
    text = path.read_text()
    body = "\n".join(wrapper(n, b, t) for n in SHAPES for b, t in TYPES)
    begin, end = "// BEGIN GENERATED (kernels/wgmma_gen.py)\n", "// END GENERATED\n"
    new = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: begin + body + end, text,
                 flags=re.S)
    path.write_text(new)


if __name__ == "__main__":
    main()
