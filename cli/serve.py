"""``finetune serve``: one base model and its LoRA adapters behind an OpenAI-compatible API (``serve/``).

    finetune serve --adapter sql=runs/sql/adapter --adapter chat=runs/chat/adapter
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "sql", "prompt": "SELECT", "max_tokens": 16, "temperature": 0}'

Binds to 127.0.0.1 unless told otherwise (``--host 0.0.0.0`` exposes it to the network: there is no
authentication). Needs the ``[serve]`` extra: ``pip install -e '.[serve]'``.
"""

from __future__ import annotations

import socket
import sys

from finetune_ref.cli.common import INFERENCE_DTYPE_HELP, add_model_args, port, positive_int, resolve_model_dir
from finetune_ref.cli.generate import parse_named_adapters


def cmd_serve(args) -> int:
    try:
        import uvicorn

        from finetune_ref.serve.app import build_app
        from finetune_ref.serve.engine import Engine
    except ImportError as e:
        raise ValueError(f"serving needs the [serve] extra ({e.name} is missing): pip install -e '.[serve]'") from None
    from finetune_ref.models.tokenizer import Tokenizer
    from finetune_ref.recipes.inference import load_inference_model

    dirs, names = parse_named_adapters(args.adapter)
    if dirs and names is None:
        raise ValueError("--adapter: name each adapter (NAME=DIR); clients choose it with \"model\": \"NAME\"")
    sock = listen(args.host, args.port)  # before the model loads: a taken port fails in a second, not minutes
    model_dir = resolve_model_dir(args.model, args.cache_dir)
    tokenizer = Tokenizer.from_dir(model_dir)
    model = load_inference_model(model_dir, args.dtype, dirs or None, adapter_names=names, quantize=args.quantize)
    engine = Engine(model, tokenizer, model_name=args.served_model_name or model_dir.name, max_batch=args.max_batch)
    print(f"serving {engine.model_name}" + (f" with adapters {names}" if names else "") +
          f" on http://{args.host}:{args.port}/v1 (max batch {args.max_batch})", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(build_app(engine), host=args.host, port=args.port,
                                          log_level=args.log_level))
    server.run(sockets=[sock])  # the socket bound above: no other process can take the port meanwhile
    return 0


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (what uvicorn would bind), or one line naming --host / --port.

    Raises:
        ValueError: the host does not resolve, or the port is taken or not allowed (below 1024 without rights).
    """
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as err:
        raise ValueError(f"--host {host}: not an address of this machine ({err.strerror})") from None
    try:
        return socket.create_server((host, port), family=family)
    except OSError as err:
        raise ValueError(f"--port {port}: cannot listen on {host}:{port} ({err.strerror}); stop what uses it or "
                         "choose another --port") from None


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the model and its LoRA adapters with an OpenAI-compatible API")
    add_model_args(p, dtype_help=INFERENCE_DTYPE_HELP)
    p.add_argument("--quantize", choices=["nf4"], default=None,
                   help="quantize a 16/32-bit base to NF4 (blocksize 64, double quantization) while loading "
                        "(default: none, serve the weights as stored)")
    p.add_argument("--adapter", action="append", metavar="NAME=DIR",
                   help="a PEFT adapter directory served as model NAME (repeat for several; default: none, the "
                        "base alone)")
    p.add_argument("--served-model-name", default=None,
                   help="the base model's id in the API (default: its folder name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    p.add_argument("--port", type=port, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--max-batch", type=positive_int, default=8,
                   help="requests decoded together at most; more wait (default 8)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="the server's log level (uvicorn's)")
    p.set_defaults(func=cmd_serve)
