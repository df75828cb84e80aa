"""``robustmedsam serve``: the inference server (for Slicer's own use, or a remote GPU).

Prints one JSON line when it listens: ``{"url", "pid", "protocol", "model", "device"}``
plus ``"token"`` when it made one and no --token-file was given (the parent process
reads it from the pipe). Token: ``$ROBUSTMEDSAM_TOKEN``, else the lines of an existing
--token-file (remote mode: one token per client), else a new one per start (local
mode), written to --token-file (mode 0600) when that names a file not yet there.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from RobustMedSAMLib.commands.segment import add_model_arguments
from RobustMedSAMLib.names import DEFAULT_MODEL

MiB = 2**20


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the inference server (HTTP; bearer token; 127.0.0.1 by default)",
        description="Serve one model over HTTP for the Slicer module, `segment --server URL` "
        "and scripts (protocol: docs/server.md). Listens on 127.0.0.1 unless --host says "
        "otherwise; put a TLS reverse proxy in front of any other address, or give "
        "--ssl-keyfile/--ssl-certfile.",
    )
    net = parser.add_argument_group("network and security")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    net.add_argument("--port", type=int, default=0, help="port (default 0: a free one)")
    net.add_argument("--token-file", type=Path, help="tokens to accept, or where to write one")
    net.add_argument("--ssl-keyfile", type=Path, help="TLS private key (PEM)")
    net.add_argument("--ssl-certfile", type=Path, help="TLS certificate chain (PEM)")
    add_model_arguments(parser, DEFAULT_MODEL, f"default: {DEFAULT_MODEL}")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-sessions", type=int, default=8, help="open sessions (default 8)")
    limits.add_argument("--max-upload-mb", type=int, default=1024, help="volume upload (1024)")
    limits.add_argument(
        "--max-memory-mb",
        type=int,
        default=16384,
        help="volumes + masks + embedding caches of all sessions (16384)",
    )
    limits.add_argument(
        "--cache-mb", type=int, default=1024, help="embedding cache per session (1024)"
    )
    limits.add_argument(
        "--idle-timeout",
        type=float,
        default=900.0,
        help="seconds after which an idle session is freed (900)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from RobustMedSAMLib.device import check_half
    from RobustMedSAMLib.errors import InputError

    for name in ("max_sessions", "max_upload_mb", "max_memory_mb", "cache_mb"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1")
    if args.idle_timeout <= 0:
        raise InputError("--idle-timeout must be > 0 seconds")
    if (args.ssl_keyfile is None) != (args.ssl_certfile is None):
        raise InputError("give both --ssl-keyfile and --ssl-certfile (or neither)")
    check_half(args.device, args.half)  # before a token file is written
    tokens, made = server_tokens(args.token_file)
    served = load_served_model(args)
    from RobustMedSAMLib.server.app import ServerConfig, create_app

    config = ServerConfig(
        tokens=tokens,
        max_sessions=args.max_sessions,
        max_memory_bytes=args.max_memory_mb * MiB,
        max_upload_bytes=args.max_upload_mb * MiB,
        idle_seconds=args.idle_timeout,
        cache_bytes=args.cache_mb * MiB,
    )
    app = create_app(config, served)
    ready = {"model": served.name, "device": served.info["device"]}
    if made and args.token_file is None:
        ready["token"] = tokens[0]
    try:
        serve(app, args, ready)
    finally:
        app.state.store.stop()
    return 0


def server_tokens(token_file: Path | None) -> tuple[list[str], bool]:
    """``(tokens, made_here)``; see the module docstring for the order."""
    import secrets

    from RobustMedSAMLib.errors import InputError
    from RobustMedSAMLib.server.client import TOKEN_ENV

    if os.environ.get(TOKEN_ENV, "").strip():
        return [os.environ[TOKEN_ENV].strip()], False
    if token_file is not None and token_file.exists():
        lines = [line.strip() for line in token_file.read_text().splitlines()]
        tokens = [line for line in lines if line and not line.startswith("#")]
        if not tokens:
            raise InputError(f"token file {token_file} holds no token (one per line)")
        if any(len(t) < 16 for t in tokens):
            raise InputError(f"{token_file}: tokens must be at least 16 characters")
        return tokens, False
    token = secrets.token_urlsafe(32)
    if token_file is not None:
        if not token_file.parent.is_dir():
            raise InputError(f"folder of --token-file does not exist: {token_file.parent}")
        handle = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(handle, "w") as out:
            out.write(token + "\n")
    return [token], True


def load_served_model(args: argparse.Namespace):
    """The ServedModel for the --model flags (loaded once, shared by all sessions)."""
    import torch

    from RobustMedSAMLib.formats.atomic import sha256_of
    from RobustMedSAMLib.inference.batch import _model_id
    from RobustMedSAMLib.inference.loader import load_named_model
    from RobustMedSAMLib.server.app import ServedModel, model_catalogue

    loaded = load_named_model(
        args.model,
        args.checkpoint,
        args.encoder,
        args.decoder,
        args.device,
        args.half,
        args.fast_cpu,
        args.engine,
    )
    if loaded.model.device.type == "cpu":
        torch.set_flush_denormal(True)
    files = {
        k: {"name": Path(p).name, "sha256": sha256_of(p)} for k, p in loaded.checkpoints.items()
    }
    info = {
        "name": loaded.name,
        "preprocessing": loaded.preprocessing,
        "device": str(loaded.model.device),
        "precision": loaded.precision,
        "engine": loaded.engine,
        "files": files,
    }
    size = loaded.model.config.image_size
    return ServedModel(
        loaded.name,
        loaded.predictor,
        info,
        size,
        _model_id(loaded.checkpoints),
        model_catalogue(loaded.name, size, loaded.engine),
    )


def serve(app, args: argparse.Namespace, ready: dict) -> None:
    """Run uvicorn on a socket bound here (so port 0 resolves); print the ready line."""
    import json
    import socket

    import uvicorn

    from RobustMedSAMLib.server.protocol import PROTOCOL_VERSION

    sock = listening_socket(args.host, args.port)
    port = sock.getsockname()[1]
    tls = args.ssl_certfile is not None
    host = f"[{args.host}]" if sock.family == socket.AF_INET6 else args.host
    url = f"{'https' if tls else 'http'}://{host}:{port}"
    if not tls and not _is_loopback(args.host):
        print(
            f"robustmedsam serve: warning: listening on {args.host} without TLS; put a TLS "
            "reverse proxy in front (docs/server.md)",
            file=sys.stderr,
        )
    line = json.dumps({"url": url, "pid": os.getpid(), "protocol": PROTOCOL_VERSION, **ready})

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            print(line, flush=True)

    config = uvicorn.Config(
        app,
        log_level="warning",
        timeout_keep_alive=30,
        timeout_graceful_shutdown=5,  # a vanished client must not hold up a stop
        access_log=False,
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
    )
    Server(config).run(sockets=[sock])


def listening_socket(host: str, port: int):
    """A TCP socket bound to ``host:port`` (0: a free port), with TCP_NODELAY, which the
    accepted connections inherit: without it a response written in two parts waits for
    the client's delayed ACK, about 40 ms per request on Linux."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        from RobustMedSAMLib.errors import InputError

        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
