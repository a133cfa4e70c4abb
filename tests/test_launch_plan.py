"""The launch plan (tools/launch_plan.py): every kernel launch of the README's benchmark shapes, forward
and backward, with its grid, threads, registers and shared memory (Triton: compiled ahead of time for
sm_90; CUDA: the launchers' own plan, `pyops._C._cuda_launch_plan`, and ptxas' resource usage), and
the occupancy and waves it gets on an H100 SXM. A launch touching >= 1M elements under 2 waves fails,
unless its kernel carries a documented exemption. Nothing runs on a GPU; the first run compiles the
Triton launches (~1 min on 2 cores), later runs read build/launch_plan/."""

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def _load_tool():
    spec = importlib.util.spec_from_file_location("_pyops_launch_plan", ROOT / "tools" / "launch_plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


L = _load_tool()


# ---- the occupancy model --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "threads,regs,smem,want",
    [
        (256, 32, 0, (8, "threads")),  # 2048 threads an SM
        (128, 32, 0, (16, "threads")),
        (32, 16, 0, (32, "blocks")),  # 32 blocks an SM
        (128, 64, 0, (8, "registers")),  # 2048 registers a warp: 8 warps a sub-partition
        (128, 255, 0, (2, "registers")),  # 255 -> 8192 a warp (units of 256): 2 warps a sub-partition
        (128, 96, 0, (5, "registers")),  # 3072 a warp: 5 warps a sub-partition, 20 an SM
        (1024, 64, 0, (1, "registers")),  # exactly the 64K a block may hold
        (1024, 65, 0, (0, "registers")),  # 65 -> 2304 a warp x 32 warps > 64K: cannot launch
        (128, 32, 100 * 1024, (2, "shared memory")),  # 228 KB / (100 KB + 1 KB reserved)
        (128, None, 16384, (13, "shared memory")),  # 233472 // 17408
        (128, 32, 228 * 1024, (0, "shared memory")),  # over the 227 KB a block may have
    ],
)
def test_occupancy_is_the_calculators(threads, regs, smem, want):
    assert L.occupancy(threads, regs, smem) == want


def test_waves_and_verdicts():
    row = L.Row("c", "fwd", "triton", "k", (7, 8, 1), 128, 64, 128, 32 * 64 * 56 * 56).judge()
    assert (row.blocks, row.blocks_per_sm) == (56, 8)
    assert math.isclose(row.waves, 56 / (132 * 8)) and row.under and row.verdict().startswith("UNDER")
    row.exempt = "a reason"
    assert not row.under and row.verdict() == "exempt: a reason"
    small = L.Row("c", "fwd", "triton", "k", (1, 1, 1), 128, 32, 0, L.LARGE - 1).judge()
    assert not small.under and small.verdict() == "small"
    full = L.Row("c", "fwd", "triton", "k", (2 * 132 * 16, 1, 1), 128, 32, 0, L.LARGE).judge()
    assert full.waves == 2.0 and not full.under and full.verdict() == "ok"
    full.exempt = "a reason"
    assert full.verdict() == "ok", "a reason to stay under 2 waves shows only where the launch is under them"
    assert L.Row("c", "fwd", "triton", "k", (2 * 132 * 16 - 1, 1, 1), 128, 32, 0, L.LARGE).judge().under


# ---- CUDA resource usage, matched by kernel name ----------------------------------------------------
RESOURCE_USAGE = """
Resource usage:
 Common:
  GLOBAL:28 CONSTANT[4]:224
 Function _ZN5pyops12_GLOBAL__N_120stats_partial_kernelIfEEvPKT_PdS5_S5_lllll:
  REG:45 STACK:0 SHARED:7168 LOCAL:0 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN5pyops12_GLOBAL__N_120stats_partial_kernelIdEEvPKT_PdS5_S5_lllll:
  REG:60 STACK:0 SHARED:14336 LOCAL:0 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN5pyops12_GLOBAL__N_112elemt_kernelIfEEvPKT_S4_PS2_lll:
  REG:28 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_resource_usage_matches_the_dtypes_instantiation():
    usage = L.parse_resource_usage(RESOURCE_USAGE)
    assert len(usage) == 3
    if any("stats_partial_kernel<float>" in name for name in usage):  # a demangler was found
        assert L.match_resources("stats_partial_kernel", "float32", usage) == (45, 7168, 1)
        assert L.match_resources("stats_partial_kernel", "float64", usage) == (60, 14336, 1)
        assert L.match_resources("elemt_kernel", "float32", usage) == (28, 0, 1)  # not bwd_elemt, not stats
    assert L.match_resources("combine_kernel", "float32", usage) is None


def test_cuda_rows_from_a_plan(monkeypatch):
    """The CUDA rows as _C._cuda_launch_plan would give them (a stand-in here): judged with the
    extension's registers where it has sm_90 code, flagged under 2 waves, exempt where it says why."""
    calls = []

    def plan(op, sizes):
        calls.append((op, sizes))
        if op != "batch_norm":
            return []
        partial = {"kernel": "stats_partial_kernel", "grid": (2, 14, 1), "block": (32, 8, 1), "smem": 0}
        combine = {"kernel": "stats_combine_kernel", "grid": [1], "block": [256], "smem": 0, "elements": 448}
        exempt = dict(partial, why="a reason")
        return [partial, combine, exempt]

    monkeypatch.setattr(L, "cuda_plan_function", lambda: plan)
    case = L.cases()[1]  # batch_norm (32, 64, 56, 56) channels_last
    rows, notes = L.cuda_rows([case])
    assert [op for op, _ in calls] == [p for p, _ in case.cuda]
    assert calls[0][1]["channels_last"] == 1 and calls[0][1]["dtype"] == "float32" and calls[0][1]["shape"][1] == 64
    partial, combine, exempt = rows
    assert partial.grid == (2, 14, 1) and partial.threads == 256 and partial.elements == case.elements
    assert partial.under and not combine.under and not exempt.under
    assert combine.grid == (1, 1, 1) and combine.verdict() == "small"
    assert notes
    if partial.regs is not None:  # the extension's sm_90 code (or nvcc's cache) gave its registers
        assert partial.smem > 0, "stats_partial_kernel's static shared memory"
    assert "| `stats_partial_kernel` | 2x14x1 | 28 | 256 |" in L.markdown(rows)


# ---- the plan ---------------------------------------------------------------------------------------
def _check(rows, notes):
    table = L.report(rows, notes)
    print("\n" + table)
    under = [r for r in rows if r.under]
    assert not under, f"{len(under)} large launches under {L.MIN_WAVES:g} waves on an H100:\n" + "\n".join(
        f"  {r.case} {r.phase} {r.backend} {r.kernel}: grid {r.grid}, {r.blocks} blocks, {r.blocks_per_sm} a SM "
        f"({r.limiter}), {r.waves:.2f} waves" + (f" ({r.note})" if r.note else "")
        for r in under
    )


def test_triton_launch_plan():
    """Every Triton launch of the README's shapes, compiled for sm_90, at >= 2 waves where large."""
    rows = L.triton_rows()
    for case in L.cases():
        mine = [r for r in rows if r.case == case.name]
        assert mine, f"{case.name}: no Triton launch recorded"
        if case.family in ("batch_norm", "conv", "activation"):
            assert {r.phase for r in mine} == {"fwd", "bwd"}, f"{case.name}: forward and backward launches"
    failed = [r for r in rows if r.regs is None or r.smem is None]
    assert not failed, "launches without registers or shared memory:\n" + "\n".join(
        f"  {r.case} {r.kernel}: {r.note}" for r in failed
    )
    _check(rows, [])


def test_cuda_launch_plan():
    """Every native CUDA launch of the README's shapes, from the launchers' own plan."""
    if L.cuda_plan_function() is None:
        pytest.skip("pyops._C has no _cuda_launch_plan (the CUDA launchers' plan): no CUDA rows to check")
    rows, notes = L.cuda_rows()
    assert rows, "_cuda_launch_plan returned no launch for any case"
    for case in L.cases():
        # a dense convolution is cuDNN's on CUDA (csrc/cuda/conv_plan.h): no pyops kernel to plan
        handed_to_cudnn = case.name.startswith("conv2d dense")
        assert handed_to_cudnn or any(r.case == case.name for r in rows), f"{case.name}: no CUDA launch in the plan"
    unknown = [r for r in rows if r.regs is None and r.under]
    if unknown and len(unknown) == sum(r.under for r in rows):
        pytest.skip(
            "CUDA launches under 2 waves whose registers are unknown (no sm_90 code in the extension, no "
            "nvcc cache; `python tools/launch_plan.py --nvcc` fills it): "
            + ", ".join(f"{r.case} {r.kernel}" for r in unknown)
        )
    _check(rows, notes)
