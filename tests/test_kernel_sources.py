"""CPU checks of the Hopper kernel's sources and configurations (no GPU needed)."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from seqpar.local import cupy_sm90

KERNELS = Path(__file__).resolve().parents[1] / "kernels"


def test_source_inlines_headers_once():
    src = cupy_sm90.source("flash_forward_sm90.cu")
    assert not re.search(r'^#include "', src, flags=re.M)
    assert src.count("#define SEQPAR_SM90_CUH") == 1
    assert "template <> struct Wgmma<128, true>" in src
    assert "flash_fwd_sm90" in src


def test_generated_wgmma_wrappers_in_sync():
    """kernels/sm90.cuh holds exactly what kernels/wgmma_gen.py writes."""
    spec = importlib.util.spec_from_file_location("wgmma_gen", KERNELS / "wgmma_gen.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    body = "\n".join(gen.wrapper(n, b, t) for n in gen.SHAPES for b, t in gen.TYPES)
    text = (KERNELS / "sm90.cuh").read_text()
    section = text.split("// BEGIN GENERATED (kernels/wgmma_gen.py)\n")[1].split("// END GENERATED")[0]
    assert section == body


@pytest.mark.parametrize("d", sorted(cupy_sm90.CONFIGS))
def test_configs_fit_the_chip(d):
    """Shared memory within the 227 KB a block may opt into; the registers of the
    producer and consumers within the 64 K of an SM (setmaxnreg: multiples of 8)."""
    cfg = cupy_sm90.CONFIGS[d]
    panels = -(-d // 64)  # d = 96 takes two 64-column panels
    smem = 128 * panels * (64 * cfg.nwg + 2 * cfg.stages * cfg.bn) + 8 * (2 + 4 * cfg.stages)
    assert cupy_sm90.shared_bytes(d, cfg) == smem + 1024 <= 232448
    assert cfg.preg % 8 == 0 and cfg.creg % 8 == 0
    assert 128 * (cfg.preg + cfg.nwg * cfg.creg) <= 65536
    assert cfg.bn % 16 == 0 and cfg.bn <= 256 and d % 32 == 0 and d <= 256
    # the wgmma shapes the configuration needs are generated: S (N = keys per tile)
    # and O (N = whole panels)
    text = (KERNELS / "sm90.cuh").read_text()
    for n in (cfg.bn, 64 * panels):
        assert f"struct Wgmma<{n}, true>" in text


def test_kernel_table_lists_the_hopper_head_dims():
    """The choice table's sm90 rows name the head dims the Hopper modules take."""
    from seqpar.local import _launch, cupy_sm90_backward

    assert _launch.SM90_HEAD_DIMS == cupy_sm90.SUPPORTED_HEAD_DIMS
    assert _launch.SM90_BACKWARD_HEAD_DIMS == cupy_sm90_backward.SUPPORTED_HEAD_DIMS
    assert set(_launch.SM90_HEAD_DIMS) <= set(_launch.SUPPORTED_HEAD_DIMS)
    rows = {table: next(r for r in rows if r[0] == "sm90")
            for table, rows in (("fwd", _launch.KERNELS), ("bwd", _launch.BACKWARD_KERNELS))}
    assert rows["fwd"][2] == _launch.SM90_HEAD_DIMS
    assert rows["bwd"][2] == _launch.SM90_BACKWARD_HEAD_DIMS


def _tile_order(n_tiles, n_mblocks, bhs, group):
    """(batch x head, query block) of each work index, as tile_at of
    kernels/flash_forward_sm90.cu deals them in its longest-first order."""
    order = []
    for idx in range(n_tiles):
        first = idx // (group * bhs) * group
        rows = min(group, n_mblocks - first)
        within = idx - first * bhs
        bh = within // rows
        order.append((bh, n_mblocks - 1 - (first + within - bh * rows)))
    return order


@pytest.mark.parametrize("group", [1, 3, 8, 16, 64])
@pytest.mark.parametrize("n_mblocks,bhs", [(1, 1), (8, 18), (11, 10), (32, 256), (128, 16)])
def test_longest_first_order_is_a_permutation(group, n_mblocks, bhs):
    """Every tile dealt once, whole groups of query blocks longest first."""
    order = _tile_order(n_mblocks * bhs, n_mblocks, bhs, group)
    assert sorted(order) == [(bh, mb) for bh in range(bhs) for mb in range(n_mblocks)]
    blocks = [mb for _, mb in order]
    for i in range(1, len(blocks)):  # a later group never holds a longer query block
        if (i // (group * bhs)) != ((i - 1) // (group * bhs)):
            assert max(blocks[i:]) < min(blocks[:i])


def test_heavy_group_rule():
    """Grouped only where the rounds would hold one or two blocks of many heads whose
    K/V outgrow L2: batch 8 at 4096 tokens, not batch 1 at 4096 (gpu_kernel_notes.md)."""
    rule, g = cupy_sm90.heavy_group, cupy_sm90.HEAVY_GROUP
    assert rule(8, 16, 16, 4096, 128, 2, 132) == g
    assert rule(8, 8, 8, 4096, 256, 2, 132) == g
    assert rule(1, 16, 16, 65536, 128, 2, 132) == g
    assert rule(1, 8, 8, 4096, 256, 2, 132) == 1      # all K/V fits L2
    assert rule(1, 8, 8, 16384, 256, 2, 132) == 1     # 16 blocks of each head a round
    assert rule(1, 16, 16, 4096, 64, 2, 132) == 1


@pytest.mark.parametrize("module", sorted(
    p.stem for p in (Path(__file__).resolve().parents[1] / "seqpar" / "local").glob("*.py")))
def test_local_modules_import_alone(module):
    """Each module of seqpar/local imports first in a fresh interpreter: no circle
    between them that only a lucky import order hides (no GPU needed to import)."""
    name = "seqpar.local" if module == "__init__" else f"seqpar.local.{module}"
    # a plain process, not a rank of this job: MPI stays uninitialised
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_"))}
    env["MPI4PY_RC_INITIALIZE"] = "false"
    done = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True,
                          text=True, timeout=120, check=False, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr


def test_prepared_launch_signature(monkeypatch):
    """What keys a kept Hopper launch (seqpar.local.cupy_kernel._signature), checked with
    stand-in arrays: q, k, v by address, out and lse by alignment only, the settings and
    SEQPAR_KERNEL; nothing kept for key lengths or document starts."""
    from types import SimpleNamespace

    import numpy as np

    from seqpar.local import cupy_kernel
    from seqpar.masks import Mask

    class Array(SimpleNamespace):
        pass

    fake = SimpleNamespace(ndarray=Array)

    def array(ptr, shape=(1, 64, 4, 96)):
        strides = tuple(int(np.prod(shape[i + 1:])) * 2 for i in range(len(shape)))
        return Array(data=SimpleNamespace(ptr=ptr), shape=shape, strides=strides,
                     dtype=np.dtype(np.float16))

    q, k, v = array(1 << 20), array(2 << 20), array(3 << 20)
    causal = Mask.build(causal=True)
    monkeypatch.delenv("SEQPAR_KERNEL", raising=False)

    def key(out=None, mask=causal, **kw):
        return cupy_kernel._signature(fake, kw.pop("q", q), k, v, out, None, 0.1, mask, 0, 0,
                                      kw.pop("key_lengths", None), False)

    assert key() == key() is not None
    assert key(q=array(4 << 20)) != key()
    assert key(out=array(5 << 20)) == key(out=array(6 << 20))  # out: alignment, not address
    assert key(out=array(5 << 20)) != key(out=array((5 << 20) + 2))
    assert key(mask=None) != key()
    assert key(key_lengths=object()) is None
    assert key(mask=Mask.build(causal=True, seqlens=[32, 32])) is None
    assert cupy_kernel._signature(fake, np.zeros((1, 64, 4, 96)), k, v, None, None, 0.1,
                                  None, 0, 0, None, False) is None  # not a device array
    before = key()
    monkeypatch.setenv("SEQPAR_KERNEL", "mma")
    assert key() != before
