"""The micro-batcher's loop run in the caller's thread, as `persrec serve` runs it in the main thread."""

from __future__ import annotations

import asyncio
import threading
import time

import persrec
from persrec.serve.http_app import MicroBatcher
from persrec.serve.live import LiveRecommender, RecommendRequest
from persrec.serve.metrics import ServerMetrics
from persrec.serve.store import open_store
from tests.serve.model_dirs import ITEM_IDS


def test_the_loop_answers_from_the_callers_thread_and_ends_with_the_server(model_dirs, tmp_path):
    live = LiveRecommender(
        persrec.load_recommender(model_dirs["PersonalizedHSTU"]), open_store(f"{tmp_path}/s.db")
    )
    batcher = MicroBatcher(live, ServerMetrics(), max_batch=4)
    history, times = ITEM_IDS[:9], list(range(9))
    answers: list = []
    server_alive = threading.Event()
    server_alive.set()

    def event_loop() -> None:  # what uvicorn's thread does: submit and await
        async def ask():
            requests = [RecommendRequest(history=history, timestamps=times, k=3) for _ in range(3)]
            return await asyncio.gather(*(batcher.submit(r) for r in requests))

        answers.extend(asyncio.run(ask()))
        server_alive.clear()

    client = threading.Thread(target=event_loop)
    client.start()
    started = time.monotonic()
    batcher.run(alive=server_alive.is_set)  # returns once the "server" thread is gone
    client.join()
    assert time.monotonic() - started < 10
    expected = live.recommender.recommend(history, k=3, timestamps=times)
    assert [a.recommendation.items for a in answers] == [expected.items] * 3
    batcher.close()  # idempotent with the loop already ended
    live.store.close()
