"""`kdk serve-teacher`: load the teacher, bind the socket (so that --port 0 picks a free port
that is known before the first request), announce it, and run uvicorn on it."""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from . import model as served_model
from .app import Settings, create_app


@dataclass
class ServeOptions:
    teacher: str
    preset: str = "default"
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "cpu"
    api_key: str | None = None
    dtype: str = "fp32"
    max_logprobs: int = 256
    max_batch_tokens: int = 8192
    max_request_tokens: int = 65536
    max_new_tokens: int = 1024
    port_file: str | None = None

    def check(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535 (0: a free port); got {self.port}")
        for name in ("max_logprobs", "max_batch_tokens", "max_request_tokens",
                     "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got "
                                 f"{getattr(self, name)}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api-key is empty; pass a key or leave the flag out")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv4 or IPv6, as the host resolves)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as err:
        raise ValueError(f"--host {host!r} does not resolve ({err})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as err:
        sock.close()
        raise ValueError(f"cannot bind --host {host} --port {port}: {err.strerror or err}; "
                         "pass another --port (0 picks a free one)") from None
    # listening now: a client that connects before uvicorn accepts waits in the backlog
    sock.listen(2048)
    return sock


def url_of(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def write_port_file(path: str, port: int) -> None:
    """PORT and a newline, written whole (rename) so that a reader never sees half of it."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{port}\n")
    tmp.replace(target)


def serve(opts: ServeOptions) -> int:
    import uvicorn

    opts.check()
    served = served_model.load(opts.teacher, preset=opts.preset, device=opts.device,
                               dtype=opts.dtype)
    app = create_app(served, Settings(api_key=opts.api_key, max_logprobs=opts.max_logprobs,
                                      max_batch_tokens=opts.max_batch_tokens,
                                      max_request_tokens=opts.max_request_tokens,
                                      max_new_tokens=opts.max_new_tokens))
    sock = bind(opts.host, opts.port)
    port = sock.getsockname()[1]
    print(f"kdk serve-teacher: serving {served.name} on {url_of(opts.host, port)}", flush=True)
    if opts.port_file:
        write_port_file(opts.port_file, port)
    config = uvicorn.Config(app, log_level="warning", access_log=False,
                            timeout_keep_alive=30)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    print("kdk serve-teacher: stopped", file=sys.stderr, flush=True)
    return 0
