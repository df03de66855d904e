"""`persrec serve RUN_DIR`: load the model, open the store, run the FastAPI app under uvicorn.

uvicorn handles SIGTERM / SIGINT gracefully: it stops accepting connections, answers the requests in
flight, then runs the app's shutdown (the micro-batcher stops, the store closes). With `--workers N`,
uvicorn starts N processes that each load the model; they share the store (SQLite in WAL mode, or Redis).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from persrec.config import ConfigError

OPTIONS_ENV = "PERSREC_SERVE_OPTIONS"


@dataclass
class ServeOptions:
    run_dir: str
    store: str | None = None
    refresh_every: int = 1
    cache_dtype: str = "float32"
    api_key_file: str | None = None
    max_batch: int = 32
    threads: int = 0
    device: str = "cpu"


def _api_key(path: str | None) -> str | None:
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--api_key_file {path}: no such file")
    key = file.read_text().strip()
    if not key or any(c.isspace() for c in key):
        raise ConfigError(f"--api_key_file {path}: expected one token without spaces")
    return key


def _check_bindable(host: str, port: int) -> None:
    """A port in use or a host this machine does not have is a one-line mistake, not uvicorn's traceback."""
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as error:
        raise ConfigError(
            f"--host {host} --port {port}: cannot listen there ({error.strerror or error})"
        ) from error


def build_app(options: ServeOptions, model_thread: bool = True) -> Any:
    from persrec.serve.http_app import create_app
    from persrec.serve.live import LiveRecommender
    from persrec.serve.recommender_api import load_recommender
    from persrec.serve.store import open_store

    key = _api_key(options.api_key_file)
    rec = load_recommender(
        options.run_dir,
        device=options.device,
        refresh_every=options.refresh_every,
        threads=options.threads or None,
    )
    store = open_store(options.store, options.cache_dtype, rec.files.directory.parent / "serving.db")
    return create_app(
        LiveRecommender(rec, store), api_key=key, max_batch=options.max_batch, model_thread=model_thread
    )


def app_from_environment() -> Any:
    """uvicorn's factory for `--workers N`: each worker process builds its own app from the options."""
    return build_app(ServeOptions(**json.loads(os.environ[OPTIONS_ENV])))


def _serve_with_model_on_main_thread(server: Any, app: Any) -> None:
    """uvicorn's event loop in a thread, the model in the main thread (see `MicroBatcher`).

    SIGTERM / SIGINT reach uvicorn as they would in its own main thread: it stops accepting connections,
    answers the requests in flight (the model keeps running here), runs the app's shutdown, which closes the
    batcher, and returns; then the store is closed. A second SIGINT forces the exit.
    """
    import signal
    import threading

    http = threading.Thread(target=server.run, name="persrec-http", daemon=True)
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, server.handle_exit) for sig in handled}
    http.start()
    try:
        app.state.batcher.run(alive=http.is_alive)
        http.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        app.state.live.store.close()


def serve_main(argv: list[str]) -> int:
    from persrec.cli import CommandParser

    parser = CommandParser(
        prog="persrec serve",
        description="Serve recommendations over HTTP (FastAPI + uvicorn; pip install 'persrec[serve]').",
        epilog="example:\n  persrec serve runs/ml --port 8080 &\n  curl -s localhost:8080/recommend -H "
        "'content-type: application/json' -d '{\"history\": [12, 7, 33], \"k\": 5}'",
    )
    parser.add_argument("run_dir", type=Path, help="run directory or its best/ directory")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (loopback unless told otherwise)"
    )
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--store", help="sqlite:///path.db (default: serving.db beside best/) or redis://host:port/db"
    )
    parser.add_argument("--workers", type=int, default=1, help="server processes")
    parser.add_argument(
        "--refresh_every", type=int, default=1, help="rebuild a user's expert cache every N events"
    )
    parser.add_argument("--cache_dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--api_key_file", help="file with a bearer token that POST /events and DELETE need")
    parser.add_argument("--max_batch", type=int, default=32, help="requests scored together at most")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads per worker (0: torch's default)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--log_level", default="info")
    args = parser.parse_args(argv)
    try:
        import uvicorn
    except ImportError as error:
        raise ConfigError("persrec serve needs FastAPI and uvicorn: pip install 'persrec[serve]'") from error
    for name in ("port", "workers", "max_batch"):
        value = getattr(args, name)
        if not (0 <= value <= 65535 if name == "port" else value >= 1):
            raise ConfigError(f"--{name}: out of range ({value})")
    _check_bindable(args.host, args.port)
    options = ServeOptions(
        str(args.run_dir),
        args.store,
        args.refresh_every,
        args.cache_dtype,
        args.api_key_file,
        args.max_batch,
        args.threads,
        args.device,
    )
    if args.workers == 1:
        app = build_app(options, model_thread=False)  # a mistake is reported before the port is bound
        config = uvicorn.Config(
            app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=30
        )
        _serve_with_model_on_main_thread(uvicorn.Server(config), app)
        return 0
    build_app(options).state.live.store.close()  # model, store and key checked once, in this process
    os.environ[OPTIONS_ENV] = json.dumps(asdict(options))
    uvicorn.run(
        "persrec.serve.server:app_from_environment",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        timeout_graceful_shutdown=30,
    )
    return 0
