"""The persistent decode-chain kernel (kernels/decode_chain.py) against a plain-torch chain with
the same roundings and against the per-kernel chain it stands in for (interpreter on the CPU,
float32 and float16, small shapes; bf16 and Qwen3-0.6B's shapes in tests/gpu).

The interpreter runs programs one after another, so a grid of several programs runs one phase
per launch (no grid barrier inside a launch); the whole chain in one launch runs as one program.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import DEVICE

# Small shapes that keep every code path: K slices of several steps, 2 splits, masked tokens.
HIDDEN, QKV, ATTN, INTER, LAYERS, EPS = 64, 128, 128, 128, 2, 1e-6


def _config():
    from minivllm.kernels.decode_chain import ChainConfig

    return ChainConfig(block_n=16, block_k=32, splits=2, num_stages=2, prefetch=0)


def _case(m: int, dtype: torch.dtype, seed: int = 0):
    from minivllm.kernels.decode_chain import ChainWeights

    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.1):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)

    weights = ChainWeights(
        qkv=rnd(LAYERS, QKV, HIDDEN),
        o=rnd(LAYERS, HIDDEN, ATTN),
        gate_up=rnd(LAYERS, 2 * INTER, HIDDEN),
        down=rnd(LAYERS, HIDDEN, INTER),
        norm=(torch.rand(LAYERS, 2, HIDDEN, generator=gen) + 0.5).to(dtype).to(DEVICE),
    )
    return rnd(m, HIDDEN, scale=1.0), rnd(m, ATTN, scale=1.0), weights


def _rmsnorm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


def _mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # the product rounded once
    return (x.float() @ w.float().T).to(x.dtype)


def _torch_chain(residual, attn, w):
    """(final residual, last layer's qkv) with the kernels' roundings, in plain torch."""
    res = residual
    for layer in range(LAYERS):
        qkv = _mm(_rmsnorm(res, w.norm[layer, 0]), w.qkv[layer])
        res = (_mm(attn, w.o[layer]).float() + res.float()).to(res.dtype)
        gate, up = _mm(_rmsnorm(res, w.norm[layer, 1]), w.gate_up[layer]).chunk(2, dim=-1)
        act = (F.silu(gate.float()).to(res.dtype).float() * up.float()).to(res.dtype)
        res = (_mm(act, w.down[layer]).float() + res.float()).to(res.dtype)
    return res, qkv


def _tol(dtype: torch.dtype) -> dict[str, float]:
    # float32: summation order only; float16: an ulp of a rounding here and there, carried on.
    return {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}


@pytest.mark.parametrize(("m", "dtype"), [(1, torch.float16), (16, torch.float32)])
def test_one_launch_one_program_matches_torch(m: int, dtype: torch.dtype) -> None:
    """The whole chain in one launch (every grid barrier inside it), launched twice on one
    workspace: the barrier's counter grows by one arrival per barrier and launch, the split-K
    tile counters end at zero, and the second launch (new inputs) is right too."""
    from minivllm.kernels.decode_chain import decode_chain, make_workspace

    config = _config()
    _, _, weights = _case(m, dtype)
    ws = make_workspace(m, weights, num_programs=1, config=config)
    for seed in (1, 2):
        residual, attn, _ = _case(m, dtype, seed)
        out = torch.full_like(residual, float("nan"))
        ws.qkv.fill_(float("nan"))
        got = decode_chain(residual, attn, weights, EPS, ws, out=out, config=config)
        expect, expect_qkv = _torch_chain(residual, attn, weights)
        assert got is out
        torch.testing.assert_close(got.cpu(), expect.cpu(), **_tol(dtype))
        torch.testing.assert_close(ws.qkv.cpu(), expect_qkv.cpu(), **_tol(dtype))
    assert ws.barrier.item() == 2 * (4 * LAYERS - 1)
    assert not ws.tile_counts.any()


@pytest.mark.parametrize(("num_programs", "splits"), [(3, 2), (16, 2), (5, 1)])
def test_many_programs_one_phase_per_launch_match_torch(num_programs: int, splits: int) -> None:
    """Several programs share each phase's tasks (3: several tasks each, split-K tiles reduced by
    whichever split comes last; 16: more programs than some phases have tasks; one split: the
    residual added in the task's own epilogue)."""
    from minivllm.kernels.decode_chain import decode_chain, make_workspace

    m, dtype, config = 7, torch.float32, _config()._replace(splits=splits)
    residual, attn, weights = _case(m, dtype, seed=3)
    ws = make_workspace(m, weights, num_programs=num_programs, config=config)
    got = decode_chain(residual, attn, weights, EPS, ws, config=config, phases_per_launch=1)
    expect, expect_qkv = _torch_chain(residual, attn, weights)
    torch.testing.assert_close(got.cpu(), expect.cpu(), **_tol(dtype))
    torch.testing.assert_close(ws.qkv.cpu(), expect_qkv.cpu(), **_tol(dtype))
    assert ws.barrier.item() == 0 and not ws.tile_counts.any()


def test_matches_the_per_kernel_chain() -> None:
    """Against the chain bench_layer_chain.py times (kernels/linear.py's GEMMs, split-K partial
    sums into the fused add + RMSNorm, SiLU-and-multiply), float16, the output in place."""
    from minivllm.kernels.decode_chain import decode_chain, make_workspace, per_kernel_chain

    m, dtype, config = 3, torch.float16, _config()
    residual, attn, w = _case(m, dtype, seed=4)
    res, qkv = per_kernel_chain(residual, attn, w, EPS)
    ws = make_workspace(m, w, num_programs=1, config=config)
    got = decode_chain(residual, attn, w, EPS, ws, out=residual, config=config)
    assert got is residual
    torch.testing.assert_close(got.cpu(), res.cpu(), **_tol(dtype))
    torch.testing.assert_close(ws.qkv.cpu(), qkv.cpu(), **_tol(dtype))


def test_a_barrier_that_cannot_complete_times_out() -> None:
    """Two programs in one launch on the interpreter: the first waits at its first barrier for a
    program that only runs after it ends. It gives up after `barrier_patience` polls and the
    launch returns, with the timeouts counted (on a GPU: programs not all resident)."""
    from minivllm.kernels.decode_chain import decode_chain, make_workspace

    config = _config()
    residual, attn, weights = _case(2, torch.float32)
    ws = make_workspace(2, weights, num_programs=2, config=config)
    for scratch in (ws.gate_up, ws.parts, ws.res_mid, ws.res_layer):
        scratch.zero_()  # read too early: finite, at least
    decode_chain(residual, attn, weights, EPS, ws, config=config, barrier_patience=3)
    assert ws.timeouts.item() > 0


def test_launcher_refuses_what_the_kernel_cannot_run() -> None:
    from minivllm.kernels.decode_chain import ChainConfig, decode_chain, make_workspace

    config = _config()
    residual, attn, weights = _case(4, torch.float16)
    ws = make_workspace(4, weights, num_programs=2, config=config)
    with pytest.raises(AssertionError):  # two programs spinning in turn would never return
        decode_chain(residual, attn, weights, EPS, ws, config=config)
    ws = make_workspace(4, weights, num_programs=1, config=config)
    with pytest.raises(AssertionError):  # block_k must divide every K slice (qkv: 64)
        decode_chain(residual, attn, weights, EPS, ws, config=config._replace(block_k=128))
    big, big_attn, _ = _case(17, torch.float16)
    with pytest.raises(AssertionError):  # 16 tokens at most
        decode_chain(big, big_attn, weights, EPS, ws, config=config)
    assert ChainConfig().block_n == 16


_COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from minivllm.kernels import decode_chain as dc

config = dc.ChainConfig()
kernel = dc._decode_chain_kernel
constexprs = dict(
    H=1024, QKV=4096, ATTN=2048, INTER=3072, SPLITS=config.splits, BM=dc.MAX_TOKENS,
    BN=config.block_n, BK=config.block_k, NUM_STAGES=config.num_stages,
    PREFETCH=config.prefetch, PHASES=dc.PHASES_PER_LAYER,
)
types = dict(
    parts_ptr="*fp32", tile_counts_ptr="*i32", barrier_ptr="*i64", timeouts_ptr="*i32",
    M="i32", eps="fp32", first_phase="i32", last_phase="i32", num_layers="i32",
    patience="i32",
)
signature = {
    name: "constexpr" if name in constexprs else types.get(name, "*bf16")
    for name in kernel.arg_names
}
aligned = {
    (i,): [["tt.divisibility", 16]]
    for i, name in enumerate(kernel.arg_names)
    if signature[name].startswith("*")
}
source = triton.compiler.ASTSource(kernel, signature, constexprs, aligned)
compiled = triton.compile(
    source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=config.num_warps)
)
print(compiled.metadata.shared)
"""


def test_compiles_for_hopper_within_an_sms_shared_memory(tmp_path) -> None:
    """The interpreter runs what the compiler may refuse (and knows nothing of shared memory):
    the default configuration compiles for sm_90 at Qwen3-0.6B's shapes in bf16 (no GPU needed,
    only ptxas) and its pipeline fits the 227 KB of shared memory an H100 / H200 SM offers."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_HOPPER],
        check=False,
        cwd=tmp_path,  # not the repository root, whose kernels/ would shadow other packages
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
    )
    if "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("no ptxas")
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) <= 227 * 1024
