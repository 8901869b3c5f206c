"""The persistent decode-chain kernel (kernels/decode_chain.py) on the GPU: one program per SM,
every grid barrier inside one launch, bf16 at Qwen3-0.6B's shapes (hidden 1024, qkv 4096,
attention 2048, intermediate 3072), against the per-kernel chain bench_layer_chain.py times; and
replayed from a CUDA graph on new inputs (the barrier's state carried from launch to launch)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

HIDDEN, QKV, ATTN, INTER, EPS = 1024, 4096, 2048, 3072, 1e-6
LAYERS = 6  # every phase kind several times; the error of 28 layers is the bench's to check
DT = torch.bfloat16


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def _weights():
    from minivllm.kernels.decode_chain import ChainWeights

    g = _gen(0)

    def rnd(*shape):
        return (0.02 * torch.randn(*shape, generator=g, device="cuda")).to(DT)

    norm = (torch.rand(LAYERS, 2, HIDDEN, generator=g, device="cuda") + 0.5).to(DT)
    return ChainWeights(
        qkv=rnd(LAYERS, QKV, HIDDEN),
        o=rnd(LAYERS, HIDDEN, ATTN),
        gate_up=rnd(LAYERS, 2 * INTER, HIDDEN),
        down=rnd(LAYERS, HIDDEN, INTER),
        norm=norm,
    )


def _inputs(m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    residual = torch.randn(m, HIDDEN, generator=g, device="cuda").to(DT)
    return residual, torch.randn(m, ATTN, generator=g, device="cuda").to(DT)


def _float32_chain(residual, attn, w) -> torch.Tensor:
    """The same chain in float32 throughout (no bf16 rounding between the ops): the oracle."""
    import torch.nn.functional as F

    def norm(x, weight):
        return weight.float() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)

    res, attn = residual.float(), attn.float()
    for layer in range(LAYERS):
        res = res + attn @ w.o[layer].float().T
        gate, up = (norm(res, w.norm[layer, 1]) @ w.gate_up[layer].float().T).chunk(2, dim=-1)
        res = res + (F.silu(gate) * up) @ w.down[layer].float().T
    return res


def _rel_err(got: torch.Tensor, expect: torch.Tensor) -> float:
    return ((got.float() - expect.float()).norm() / expect.float().norm()).item()


@pytest.mark.parametrize("m", [1, 7, 16])
def test_one_launch_matches_the_per_kernel_chain_bf16(m: int) -> None:
    """One program per SM: against the per-kernel chain to a bf16 rounding here and there (other
    split-K slices, other summation orders), and as close to a float32 oracle as that chain is;
    against itself run one phase per launch (no grid barrier at all, the same summation order)
    bit for bit, so a barrier that lets a program through early shows."""
    from minivllm.kernels.decode_chain import decode_chain, make_workspace, per_kernel_chain

    weights = _weights()
    residual, attn = _inputs(m, 1)
    ws = make_workspace(m, weights)
    assert ws.num_programs == torch.cuda.get_device_properties(0).multi_processor_count
    ws.qkv.fill_(float("nan"))
    got = decode_chain(residual, attn, weights, EPS, ws)
    got_qkv = ws.qkv.clone()
    expect, expect_qkv = per_kernel_chain(residual, attn, weights, EPS)
    assert _rel_err(got, expect) < 1e-2 and _rel_err(got_qkv, expect_qkv) < 1e-2
    oracle = _float32_chain(residual, attn, weights)
    assert _rel_err(got, oracle) <= 1.5 * _rel_err(expect, oracle) + 1e-3
    per_phase = decode_chain(residual, attn, weights, EPS, ws, phases_per_launch=1)
    assert torch.equal(per_phase, got) and torch.equal(ws.qkv, got_qkv)
    again = decode_chain(residual, attn, weights, EPS, ws)
    assert torch.equal(again, got)
    torch.cuda.synchronize()
    assert ws.timeouts.item() == 0 and not ws.tile_counts.any()
    assert ws.barrier.item() == 2 * (4 * LAYERS - 1) * ws.num_programs


@pytest.mark.parametrize("prefetch", [0, 2, 3])
def test_prefetch_modes_change_no_value(prefetch: int) -> None:
    from minivllm.kernels.decode_chain import ChainConfig, decode_chain, make_workspace

    weights = _weights()
    residual, attn = _inputs(4, 2)
    ws = make_workspace(4, weights)
    expect = decode_chain(residual, attn, weights, EPS, ws)
    config = ChainConfig(prefetch=prefetch)
    assert torch.equal(decode_chain(residual, attn, weights, EPS, ws, config=config), expect)
    assert ws.timeouts.item() == 0


def test_graph_replays_on_new_inputs() -> None:
    """Captured once, replayed twice on new inputs: each replay equals an eager launch (the
    barrier counter goes on growing from launch to launch; the tile counters end at zero)."""
    from minivllm.kernels.decode_chain import decode_chain, make_workspace, per_kernel_chain

    m = 8
    weights = _weights()
    residual, attn = _inputs(m, 3)
    out = torch.empty_like(residual)
    ws = make_workspace(m, weights)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up outside the capture
        decode_chain(residual, attn, weights, EPS, ws, out=out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_chain(residual, attn, weights, EPS, ws, out=out)
    eager_ws = make_workspace(m, weights)
    for seed in (4, 5):
        new_residual, new_attn = _inputs(m, seed)
        residual.copy_(new_residual)
        attn.copy_(new_attn)
        out.fill_(float("nan"))
        graph.replay()
        expect = decode_chain(residual, attn, weights, EPS, eager_ws)
        assert torch.equal(out, expect)
        assert _rel_err(out, per_kernel_chain(residual, attn, weights, EPS)[0]) < 1e-2
    torch.cuda.synchronize()
    assert ws.timeouts.item() == 0 and not ws.tile_counts.any()
    assert ws.barrier.item() == 3 * (4 * LAYERS - 1) * ws.num_programs  # warm-up + 2 replays
