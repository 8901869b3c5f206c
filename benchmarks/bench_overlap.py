"""Feasibility: a decode step's forward as two micro-batches whose attention and non-attention
work overlap on separate CUDA streams ("two-batch overlap"), against the plain forward, each
captured in a CUDA graph. Qwen3-0.6B shape, dummy weights, bf16, contexts uniform 100..2048.

    python benchmarks/bench_overlap.py --rows 256 128 64 32
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from minivllm import LLM
from minivllm.demo import make_demo_checkpoint
from minivllm.layers.attention import AttentionMetadata


def _meta(seq_lens, block_tables, slots) -> AttentionMetadata:
    n = seq_lens.shape[0]
    dev = seq_lens.device
    order = torch.argsort(seq_lens, descending=True, stable=True).to(torch.int32)
    return AttentionMetadata(
        num_decodes=n,
        slot_mapping=slots,
        decode_seq_lens=seq_lens,
        decode_block_tables=block_tables,
        prefill_cu_seqlens_q=torch.zeros(1, dtype=torch.int32, device=dev),
        prefill_seq_lens=seq_lens[:0],
        prefill_block_tables=block_tables[:0],
        max_prefill_query_len=0,
        decode_row_order=order,
    )


def _pre(layer, positions, h, residual, meta):
    if residual is None:
        residual = h
        x = layer.input_layernorm(h)
    else:
        x, residual = layer.input_layernorm(h, residual)
    a = layer.self_attn
    qkv = a.qkv_proj(x)
    q, k, v = qkv.split([a.q_size, a.kv_size, a.kv_size], dim=-1)
    q = q.view(-1, a.num_heads, a.head_dim)
    k = k.view(-1, a.num_kv_heads, a.head_dim)
    v = v.view(-1, a.num_kv_heads, a.head_dim)
    q, k = a.rotary_emb(positions, q, k, a.q_norm, a.k_norm, kv_write=a.attn.kv_write(v, meta))
    return q, k, v, residual


def _post(layer, o, residual):
    h = layer.self_attn.o_proj(o.flatten(1), partials=True)
    h, residual = layer.post_attention_layernorm(h, residual)
    return layer.mlp(h), residual


def forward_overlap(model, ids, positions, metas, split, streams, keep):
    """Micro-batch i's non-attention work on streams[i]; both attentions on streams[2], in the
    order A0 B0 A1 B1 ...; tensors crossing streams are kept alive in `keep`."""
    main = torch.cuda.current_stream()
    for s in streams:
        s.wait_stream(main)
    h = model.model.embed_tokens(ids)
    cuts = [(0, split), (split, ids.shape[0])]
    state = [[h[a:b], None] for a, b in cuts]
    attn_stream = streams[2]
    for layer in model.model.layers:
        for i, (a, b) in enumerate(cuts):
            with torch.cuda.stream(streams[i]):
                q, k, v, state[i][1] = _pre(layer, positions[a:b], state[i][0], state[i][1],
                                            metas[i])
            attn_stream.wait_stream(streams[i])
            with torch.cuda.stream(attn_stream):
                o = layer.self_attn.attn(q, k, v, metas[i])
            streams[i].wait_stream(attn_stream)
            keep += [q, v, o]
            with torch.cuda.stream(streams[i]):
                state[i][0], state[i][1] = _post(layer, o, state[i][1])
    outs = []
    for i in range(2):
        with torch.cuda.stream(streams[i]):
            outs.append(model.model.norm(state[i][0], state[i][1])[0])
        main.wait_stream(streams[i])
    keep += outs
    return torch.cat(outs)


def _graph_us(fn, reps=20) -> tuple[float, torch.Tensor]:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3)
    times.sort()
    return times[len(times) // 2], out.clone()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[256, 192, 128, 64, 32])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_demo_checkpoint(Path(tmp) / "m", "qwen3-0.6b", write_weights=False)
        llm = LLM(str(model_dir), dtype="bfloat16", load_format="dummy", max_model_len=4096,
                  enforce_eager=True)
    runner = llm.model_runner
    model = runner.model
    num_blocks = runner.kv_cache_info.num_blocks
    block_size = runner.kv_cache_info.block_size
    runner.kv_cache.normal_()
    dev = "cuda"
    gen = torch.Generator().manual_seed(0)
    print(f"{'rows':>5}{'plain us':>10}{'overlap':>9}{'no prio':>9}{'gain':>7}  max|diff|")
    for n in args.rows:
        seq_lens = torch.randint(100, 2049, (n,), generator=gen, dtype=torch.int32)
        max_blocks = 2048 // block_size + 1
        perm = torch.randperm(num_blocks, generator=gen)[: n * max_blocks].view(n, max_blocks)
        block_tables = perm.to(torch.int32)
        pos = seq_lens - 1
        slots = (block_tables[torch.arange(n), pos // block_size] * block_size
                 + pos % block_size).to(torch.int32)
        ids = torch.randint(0, 10000, (n,), generator=gen, dtype=torch.int32).to(dev)
        positions = pos.to(dev)
        seq_lens, block_tables, slots = seq_lens.to(dev), block_tables.to(dev), slots.to(dev)
        meta = _meta(seq_lens, block_tables, slots)
        split = n // 2
        metas = [_meta(seq_lens[a:b], block_tables[a:b], slots[a:b])
                 for a, b in ((0, split), (split, n))]
        with torch.inference_mode():
            t_plain, out_plain = _graph_us(lambda: model(ids, positions, meta))
            res = []
            for prio in (-1, 0):
                streams = [torch.cuda.Stream(priority=prio), torch.cuda.Stream(priority=prio),
                           torch.cuda.Stream(priority=0)]
                keep: list = []
                res.append(_graph_us(
                    lambda s=streams, k=keep: forward_overlap(model, ids, positions, metas,
                                                              split, s, k)))
        diff = (res[0][1].float() - out_plain.float()).abs().max().item()
        print(f"{n:>5}{t_plain:>10.0f}{res[0][0]:>9.0f}{res[1][0]:>9.0f}"
              f"{t_plain / res[0][0] - 1:>7.1%}  {diff:.4f}", flush=True)


if __name__ == "__main__":
    main()
