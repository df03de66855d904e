"""`persrec serve`: the HTTP API (FastAPI; `pip install persrec[serve]`).

    POST /recommend             {"user_id": "u1", "history": [...], "k": 10, "exclude_seen": true}
    POST /events                {"user_id": "u1", "items": [...], "timestamps": [...]}    (write)
    GET  /users/{id}/history    DELETE /users/{id} (write)
    GET  /health                GET /metrics (Prometheus text)      GET /docs (OpenAPI)

Every mistake is a 4xx with `{"error": ..., "field": ...}`. Recommendations of concurrent requests are
scored together (one forward pass per batch, `MicroBatcher`); writes need `Authorization: Bearer <key>`
when the server was started with an API key.
"""

from __future__ import annotations

import asyncio
import hmac
import queue
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from persrec.serve.live import LiveRecommender, LiveResult, RecommendRequest, RequestError
from persrec.serve.metrics import ServerMetrics

ItemId = int | str
MAX_BODY_BYTES = 1 << 20


class RecommendBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: ItemId | None = Field(None, description="a stored user (see POST /events)")
    history: list[ItemId] | None = Field(
        None,
        description="items (oldest first) after the stored history, or the whole history without user_id",
    )
    timestamps: list[int] | None = Field(None, description="one per history item (models with time bias)")
    k: int = Field(10, description="how many items to return")
    exclude_seen: bool = Field(True, description="leave out items of the history")


class EventsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: ItemId
    items: list[ItemId]
    timestamps: list[int] | None = None


def _deliver(future: asyncio.Future, result: Any) -> None:
    if not future.done():  # the client may have gone away and the request been cancelled
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


class MicroBatcher:
    """One thread runs the model; requests that arrive while it is busy are scored together next.

    The event loop hands a request straight to that thread and awaits its answer (no thread-pool hop). The
    loop (`run`) runs in a thread of its own (`start`) or in the caller's: `persrec serve` runs it in the main
    thread, because torch's OpenMP threads only spin between parallel regions for the main thread's team
    here; from another thread every region paid a wake-up (the 2-thread cached call took 24 ms instead of 9).
    """

    def __init__(self, live: LiveRecommender, metrics: ServerMetrics, max_batch: int = 32) -> None:
        self.live, self.metrics, self.max_batch = live, metrics, max_batch
        self._queue: queue.Queue[tuple[RecommendRequest, asyncio.AbstractEventLoop, asyncio.Future] | None]
        self._queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="persrec-batcher", daemon=True)
        self._thread.start()

    async def submit(self, request: RecommendRequest) -> LiveResult:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((request, loop, future))
        return await future

    def _next(self, alive: Callable[[], bool] | None) -> tuple | None:
        """The next request, or None once closed (or once `alive` says the server is gone)."""
        while True:
            try:
                return self._queue.get(timeout=None if alive is None else 0.5)
            except queue.Empty:
                if not alive():
                    return None

    def run(self, alive: Callable[[], bool] | None = None) -> None:
        """Score requests until `close` (or until `alive()` turns false, checked twice a second when idle)."""
        while (first := self._next(alive)) is not None:
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
            self.metrics.batch(len(batch))
            try:
                results = self.live.recommend_many([request for request, _, _ in batch])
            except Exception as error:  # noqa: BLE001 (handed to every waiting request)
                results = [error] * len(batch)
            for (_, loop, future), result in zip(batch, results, strict=True):
                loop.call_soon_threadsafe(_deliver, future, result)

    def close(self) -> None:
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)


def _error(status: int, message: str, field: str | None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status)


def _field_of(location: tuple[Any, ...]) -> str:
    parts = [str(part) for part in location if part not in ("body", "query", "path")]
    return ".".join(parts) or "body"


class Guard:
    """ASGI middleware: a body over `limit` bytes is a 413 before the app reads it; every request is counted
    and timed by its route (plain ASGI: cheaper than an `@app.middleware` per request)."""

    def __init__(self, app: Any, limit: int, metrics: ServerMetrics) -> None:
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [500]

        async def send_counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._limited(scope, receive, send_counted)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.request(scope["method"], path, status[0], time.perf_counter() - start)

    async def _limited(self, scope: dict, receive: Any, send: Any) -> None:
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            response = _error(413, f"the request body may hold at most {self.limit} bytes", "body")
            return await response(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, f"the request body may hold at most {self.limit} bytes")
            return message

        return await self.app(scope, limited, send)


def create_app(
    live: LiveRecommender,
    *,
    api_key: str | None = None,
    max_batch: int = 32,
    max_body_bytes: int = MAX_BODY_BYTES,
    close_store: bool = True,
    model_thread: bool = True,
) -> FastAPI:
    """The app. model_thread False: the caller runs `app.state.batcher.run()` in a thread of its choice (and
    closes the store after it returns); otherwise the app starts a model thread at startup."""
    metrics = ServerMetrics()
    batcher = MicroBatcher(live, metrics, max_batch)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if model_thread:
            batcher.start()
        yield
        batcher.close()  # requests in flight have been answered: uvicorn drains them first
        if close_store and model_thread:
            live.store.close()

    app = FastAPI(title="persrec", version="1", lifespan=lifespan)
    app.state.metrics = metrics
    app.state.live = live
    app.state.batcher = batcher
    app.add_middleware(Guard, limit=max_body_bytes, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"loc": ("body",), "msg": "invalid request"}
        field = "body" if first.get("type") == "json_invalid" else _field_of(tuple(first.get("loc", ())))
        return _error(422, f"{field}: {first.get('msg')}", field)

    @app.exception_handler(RequestError)
    async def refused(_: Request, error: RequestError) -> JSONResponse:
        return _error(error.status, f"{error.field}: {error}", error.field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        field = "body" if error.status_code in (400, 413) else None
        return _error(error.status_code, str(error.detail), field)

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise RequestError(
                "Authorization", "this endpoint needs the header Authorization: Bearer <key>", 401
            )

    @app.post("/recommend")
    async def recommend(body: RecommendBody) -> dict:
        request = RecommendRequest(body.user_id, body.history, body.timestamps, body.k, body.exclude_seen)
        result = await batcher.submit(request)
        metrics.served(result.cache, result.recommendation.staleness)
        rec = result.recommendation
        return {
            "user_id": body.user_id,
            "items": rec.items,
            "scores": rec.scores,
            "cache": result.cache,
            "staleness": rec.staleness,
            "history_length": result.history_length,
        }

    @app.post("/events", dependencies=[Depends(authorized)])
    def events(body: EventsBody) -> dict:
        return live.add_events(body.user_id, body.items, body.timestamps)

    @app.get("/users/{user_id}/history")
    def history(user_id: str) -> dict:
        return live.history(user_id)

    @app.delete("/users/{user_id}", dependencies=[Depends(authorized)])
    def forget(user_id: str) -> dict:
        if not live.store.delete(user_id):
            raise RequestError("user_id", f"unknown user {user_id!r}", 404)
        return {"user_id": user_id, "deleted": True}

    @app.get("/health")
    def health() -> dict:
        rec = live.recommender
        return {
            "status": "ok",
            "model": rec.files.config.model,
            "fingerprint": rec.fingerprint,
            "items": rec.num_items,
            "refresh_every": None if rec.policy is None else rec.policy.every,
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> str:
        return metrics.render()

    return app
