"""The `ponder` command: generate, chat, serve (and bench, think as they land)."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from ponder.config import add_engine_arguments, engine_options
from ponder.sampling_params import add_sampling_arguments, sampling_fields


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    add_sampling_arguments(p)


def _origins(value: str) -> list[str]:
    return [origin.strip() for origin in value.split(",") if origin.strip()]


def sampling_params(args, llm):
    from ponder import SamplingParams

    return SamplingParams.with_defaults(llm.engine.sampling_defaults, max_tokens=args.max_tokens, stop=args.stop,
                                        **sampling_fields(args))


def cmd_generate(args) -> int:
    from ponder import LLM

    llm = LLM(args.model, **engine_options(args))
    prompt = llm.chat_prompt([{"role": "user", "content": args.prompt}]) if args.chat_template else args.prompt
    for delta in llm.stream(prompt, sampling_params(args, llm)):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args) -> int:
    from ponder import LLM

    llm = LLM(args.model, **engine_options(args))
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("ponder chat — empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except EOFError:
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        reply = []
        for delta in llm.stream(llm.chat_prompt(messages), sampling_params(args, llm)):
            reply.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


def cmd_bench(args) -> int:
    from ponder.bench.cli import run

    return run(args)


def server_config(args):
    """`ponder serve`'s ServerConfig from its flags (and $PONDER_API_KEY)."""
    from ponder.server.app import ServerConfig

    return ServerConfig(host=args.host, port=args.port, api_key=args.api_key or os.environ.get("PONDER_API_KEY"),
                        served_model_name=args.served_model_name,
                        max_waiting_requests=None if args.max_waiting_requests < 0 else args.max_waiting_requests,
                        drain_timeout=args.drain_timeout, log_level=args.log_level, access_log=args.access_log,
                        allowed_origins=args.allowed_origins)


def cmd_serve(args) -> int:
    if args.model_arg and args.model and args.model_arg != args.model:
        raise ValueError(f"two models given: {args.model_arg!r} and --model {args.model!r}")
    split = (args.prefill_replicas, args.decode_replicas)
    if (split[0] is None) != (split[1] is None):
        raise ValueError("--prefill-replicas and --decode-replicas go together")
    if args.replicas is not None and split[0] is not None:
        raise ValueError("--replicas or --prefill-replicas/--decode-replicas, not both")
    distributed = args.replicas is not None or split[0] is not None
    if not distributed and (args.ray_address or args.router or args.replica_cpus or args.object_store_mb
                            or args.replica_channel):
        raise ValueError("--ray-address, --router, --replica-cpus, --replica-channel and --object-store-mb go "
                         "with --replicas N "
                         "(or --prefill-replicas P --decode-replicas D)")
    for flag, count in (("--replicas", args.replicas), ("--prefill-replicas", split[0]),
                        ("--decode-replicas", split[1])):
        if count is not None and count < 1:
            raise ValueError(f"{flag} must be >= 1, got {count}")
    if args.replica_cpus is not None and args.replica_cpus < 1:
        raise ValueError(f"--replica-cpus must be >= 1, got {args.replica_cpus}")
    if args.object_store_mb is not None and args.object_store_mb < 64:
        raise ValueError(f"--object-store-mb must be >= 64, got {args.object_store_mb}")
    config = server_config(args)
    for sig in (signal.SIGTERM, signal.SIGINT):   # a shutdown signal is a clean exit once drained
        signal.signal(sig, lambda *_: sys.exit(0))
    model = args.model_arg or args.model
    if not distributed:
        from ponder.server.launch import serve

        serve(model, engine_options(args), config)
        return 0
    from ponder.distributed.cluster import ClusterError      # Ray itself is imported only from here on
    from ponder.distributed.serve import serve_replicas

    try:
        serve_replicas(model, engine_options(args), config, args.replicas or 0, args.ray_address,
                       args.router or "prefix-aware", args.replica_cpus or 1, *(count or 0 for count in split),
                       object_store_mb=args.object_store_mb, channel=args.replica_channel or "socket")
    except ClusterError as e:
        print(f"ponder: error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_think(args) -> int:
    from ponder.think.cli import run

    return run(args, engine_options(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ponder", description="An LLM inference engine that can think harder.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="stream a completion of a prompt to stdout")
    gen.add_argument("prompt")
    gen.add_argument("--chat-template", action="store_true", help="wrap the prompt as a user chat message")
    add_engine_arguments(gen)
    _sampling_args(gen)
    gen.set_defaults(func=cmd_generate)
    chat = sub.add_parser("chat", help="interactive chat with the model")
    chat.add_argument("--system", default=None, help="system message")
    add_engine_arguments(chat)
    _sampling_args(chat)
    chat.set_defaults(func=cmd_chat)
    srv = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    srv.add_argument("model_arg", nargs="?", default=None, metavar="MODEL", help="same as --model")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $PONDER_API_KEY)")
    srv.add_argument("--served-model-name", default=None, help="the model name clients send (default: the model's)")
    srv.add_argument("--max-waiting-requests", type=int, default=256,
                     help="requests allowed to wait for a slot before new ones get 503 (-1: unbounded)")
    srv.add_argument("--drain-timeout", type=float, default=30.0,
                     help="on SIGTERM, seconds in-flight requests get to finish before they are aborted")
    srv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    srv.add_argument("--access-log", action="store_true", help="log every request")
    srv.add_argument("--allowed-origins", action="extend", type=_origins, default=None, metavar="ORIGINS",
                     help="web origins (e.g. https://app.example.com) whose pages may call the API (CORS); "
                          "comma-separated or repeated; '*' allows any (default: none)")
    dist = srv.add_argument_group("replicas (on Ray)")
    dist.add_argument("--replicas", type=int, default=None, metavar="N",
                      help="serve N engine replicas as Ray actors behind a router (default: one engine, no Ray)")
    dist.add_argument("--prefill-replicas", type=int, default=None, metavar="P",
                      help="prefill/decode split: P replicas compute prompts and first tokens, then hand the KV "
                           "to one of the --decode-replicas through Ray's object store")
    dist.add_argument("--decode-replicas", type=int, default=None, metavar="D",
                      help="prefill/decode split: D replicas continue requests from their hand-offs "
                           "(least-loaded) and run think requests whole")
    dist.add_argument("--ray-address", default=None, metavar="ADDR",
                      help="join the Ray cluster at ADDR (default: start a local one on loopback)")
    dist.add_argument("--router", default=None, choices=["prefix-aware", "round-robin", "least-loaded"],
                      help="how requests are spread over the replicas, the prefill replicas with a split "
                           "(default: prefix-aware)")
    dist.add_argument("--object-store-mb", type=int, default=None, metavar="MB",
                      help="the local Ray cluster's object store, which KV hand-offs pass through (default: 256; "
                           "a cluster joined with --ray-address keeps its own)")
    dist.add_argument("--replica-channel", default=None, choices=["socket", "ray"],
                      help="how requests and outputs travel between the front end and the replicas: a TCP "
                           "connection to each (default; on a multi-node cluster the replicas' nodes must accept "
                           "it) or Ray's actor calls (slower; P/D replicas always use Ray)")
    dist.add_argument("--replica-cpus", type=int, default=None, metavar="C",
                      help="CPUs each replica takes (its engine's threads unless --num-threads; default: 1)")
    add_engine_arguments(srv)
    srv.set_defaults(func=cmd_serve)
    from ponder.bench.cli import add_parser as add_bench_parser

    add_bench_parser(sub).set_defaults(func=cmd_bench)
    from ponder.think.cli import add_parser as add_think_parser

    add_think_parser(sub).set_defaults(func=cmd_think)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, ModuleNotFoundError, FileNotFoundError) as e:
        print(f"ponder: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
