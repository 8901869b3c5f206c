"""`minivllm serve`, `minivllm chat` and `minivllm complete`.

    minivllm serve DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY] [engine args]
    minivllm chat DIR [--system-prompt TEXT] [-q MESSAGE] [sampling args] [engine args]
    minivllm complete DIR [-q PROMPT] [sampling args] [engine args]

`serve` runs the OpenAI-compatible server (api_server.py). `chat` and `complete` are vLLM's
commands on a local engine instead of a server: a terminal session that streams each answer as
it is generated; `chat` keeps the conversation and applies the chat template, `complete`
continues each line as a prompt of its own. Ctrl-D ends the session, Ctrl-C stops an answer.
Imports of torch, FastAPI and the engine wait until a command runs, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio


def add_parsers(sub: Any) -> None:
    """Register `serve`, `chat` and `complete` on the `minivllm` command's subparsers."""
    from minivllm.cli_args import add_engine_args, add_sampling_args

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    serve.add_argument("model", metavar="DIR", help="Hugging Face checkpoint folder")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $MINIVLLM_API_KEY)",
    )
    serve.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="the model name(s) requests use (default: DIR as given)",
    )
    serve.add_argument(
        "--max-waiting-requests",
        type=int,
        default=None,
        help="refuse requests (503) beyond max_num_seqs running + this many waiting",
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_engine_args(serve)
    serve.set_defaults(func=cmd_serve)

    for name, what, max_tokens in (
        ("chat", "chat in the terminal (the chat template, the conversation kept)", 256),
        ("complete", "complete each line typed in the terminal", 128),
    ):
        p = sub.add_parser(name, help=what)
        p.add_argument("model", metavar="DIR", help="Hugging Face checkpoint folder")
        p.add_argument(
            "-q", "--quick", default=None, metavar="TEXT", help="answer TEXT once and exit"
        )
        if name == "chat":
            p.add_argument("--system-prompt", default=None)
        add_sampling_args(p, max_tokens=max_tokens)
        add_engine_args(p)
        p.set_defaults(func=cmd_chat if name == "chat" else cmd_complete)


def cmd_serve(args: argparse.Namespace) -> int:
    from minivllm.cli_args import engine_kwargs
    from minivllm.entrypoints.api_server import run_server
    from minivllm.entrypoints.async_llm import AsyncLLM

    if args.max_waiting_requests is not None and args.max_waiting_requests < 0:
        raise ValueError(f"--max-waiting-requests must be >= 0, got {args.max_waiting_requests}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    logging.getLogger("minivllm").setLevel(args.log_level.upper())
    api_key = args.api_key or os.environ.get("MINIVLLM_API_KEY") or None
    names = args.served_model_name or [args.model]
    engine = AsyncLLM(
        args.model, max_waiting_requests=args.max_waiting_requests, **engine_kwargs(args)
    )
    try:
        logging.getLogger(__name__).info(
            "serving %s as %s: max_model_len %d, %d KV blocks of %d tokens%s",
            args.model,
            ", ".join(names),
            engine.config.max_model_len,
            engine.runtime.num_kv_blocks,
            engine.config.block_size,
            ", API key required" if api_key else "",
        )
        run_server(engine, args.host, args.port, names, api_key, args.log_level)
    finally:
        engine.shutdown()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    return _session(args, chat=True)


def cmd_complete(args: argparse.Namespace) -> int:
    return _session(args, chat=False)


def _session(args: argparse.Namespace, chat: bool) -> int:
    """The terminal session: read a line, stream the answer, until end of input."""
    import asyncio

    from minivllm.cli_args import engine_kwargs, sampling_params
    from minivllm.entrypoints.async_llm import AsyncLLM

    params = sampling_params(args)
    engine = AsyncLLM(args.model, **engine_kwargs(args))
    # One event loop for the whole session; between answers it is idle while input() reads
    # the terminal on the main thread (where Ctrl-C lands).
    loop = asyncio.new_event_loop()
    messages: list[dict[str, str]] = []
    if chat and args.system_prompt:
        messages.append({"role": "system", "content": args.system_prompt})
    try:
        if args.quick is not None:
            _turn(engine, loop, messages, args.quick, params, chat)
            return 0
        what = "Type a message" if chat else "Type a prompt"
        print(f"minivllm {args.command}: {args.model}. {what}; Ctrl-D quits.", file=sys.stderr)
        while True:
            try:
                line = input("> ")
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                print()
                return 130
            if not line.strip():
                continue
            try:
                _turn(engine, loop, messages, line, params, chat)
            except ValueError as e:  # e.g. the conversation outgrew the context
                print(f"minivllm {args.command}: error: {e}", file=sys.stderr)
    finally:
        loop.close()
        engine.shutdown()


def _turn(
    engine: Any,
    loop: asyncio.AbstractEventLoop,
    messages: list[dict[str, str]],
    text: str,
    params: Any,
    chat: bool,
) -> None:
    """One answer, streamed to stdout; a chat keeps both sides of it (unless interrupted)."""
    import asyncio

    if chat:
        prompt: Any = engine.chat_prompt([*messages, {"role": "user", "content": text}])
    else:
        prompt = text
    task = loop.create_task(_stream(engine, prompt, params))
    try:
        answer = loop.run_until_complete(task)
    except KeyboardInterrupt:
        task.cancel()  # its generate aborts the request
        try:
            loop.run_until_complete(task)
        except (asyncio.CancelledError, KeyboardInterrupt):
            pass
        print("\n[interrupted]", flush=True)
        return
    if chat:
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]


async def _stream(engine: Any, prompt: Any, params: Any) -> str:
    parts = []
    async for out in engine.generate(prompt, params):
        piece = out.outputs[0].text
        if piece:
            sys.stdout.write(piece)
            sys.stdout.flush()
            parts.append(piece)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(parts)
