"""The HTTP API through FastAPI's TestClient: live refresh equals load_recommender, and every mistake is a 4xx."""

from __future__ import annotations

import random

import pytest
from fastapi.testclient import TestClient

import persrec
from persrec.serve.http_app import create_app
from persrec.serve.live import LiveRecommender
from persrec.serve.store import open_store
from tests.serve.model_dirs import ITEM_IDS, SHAPES

KEY = "s3cret-token"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _client(model_dir, store_url: str, refresh_every: int = 1, **options) -> TestClient:
    rec = persrec.load_recommender(model_dir, refresh_every=refresh_every)
    return TestClient(create_app(LiveRecommender(rec, open_store(store_url)), api_key=KEY, **options))


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("refresh_every", [1, 3])
def test_after_a_stream_of_events_the_server_equals_recommend(model_dirs, tmp_path, shape, refresh_every):
    rec = persrec.load_recommender(model_dirs[shape], refresh_every=refresh_every)
    rng = random.Random(7)
    items: list[str] = []
    times: list[int] = []
    seen_cache = set()
    with _client(model_dirs[shape], f"{tmp_path}/s.db", refresh_every) as client:
        for _ in range(14):
            new = [rng.choice(ITEM_IDS) for _ in range(rng.randint(1, 3))]
            stamps = [len(times) + i for i in range(len(new))]
            items += new
            times += stamps
            answer = client.post(
                "/events", json={"user_id": "u2", "items": new, "timestamps": stamps}, headers=AUTH
            )
            assert answer.status_code == 200 and answer.json()["history_length"] == len(items)
            for _ in range(2):  # the second request is served from the stored cache
                got = client.post("/recommend", json={"user_id": "u2", "k": 6}).json()
                expected = rec.recommend(items, k=6, timestamps=times, user="u2")
                assert got["items"] == expected.items
                assert got["scores"] == pytest.approx(expected.scores, abs=1e-5)
                assert got["staleness"] == expected.staleness and got["history_length"] == len(items)
                seen_cache.add(got["cache"])
        history = client.get("/users/u2/history").json()
        assert history["items"] == items and history["timestamps"] == times
        metrics = client.get("/metrics").text
    if shape.startswith("Personalized"):
        assert {"hit", "refresh"} <= seen_cache
        assert (
            "persrec_expert_cache_hits_total" in metrics and "persrec_staleness_interactions_count" in metrics
        )
        hits = next(
            line for line in metrics.splitlines() if line.startswith("persrec_expert_cache_hits_total")
        )
        assert int(hits.split()[-1]) >= 14
    else:
        assert seen_cache == {"none"}


def test_redis_store_serves_the_same(model_dirs, redis_url):
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    rec = persrec.load_recommender(model_dirs["PersonalizedSASRec"], refresh_every=2)
    with _client(model_dirs["PersonalizedSASRec"], redis_url, 2) as client:
        history = ITEM_IDS[:9]
        client.post("/events", json={"user_id": 17, "items": history}, headers=AUTH)
        first = client.post("/recommend", json={"user_id": 17, "k": 4}).json()
        second = client.post("/recommend", json={"user_id": "17", "k": 4}).json()
    assert (first["cache"], second["cache"]) == ("miss", "hit")
    assert first["items"] == second["items"] == rec.recommend(history, k=4).items


def test_history_in_the_request_extends_the_stored_one(model_dirs, tmp_path):
    rec = persrec.load_recommender(model_dirs["SASRec"])
    with _client(model_dirs["SASRec"], f"{tmp_path}/s.db") as client:
        client.post("/events", json={"user_id": "a", "items": ITEM_IDS[:5]}, headers=AUTH)
        both = client.post("/recommend", json={"user_id": "a", "history": ITEM_IDS[5:8], "k": 3}).json()
        alone = client.post(
            "/recommend", json={"history": ITEM_IDS[:8], "k": 3, "exclude_seen": False}
        ).json()
        assert client.get("/users/a/history").json()["items"] == ITEM_IDS[:5]  # the request stored nothing
    assert both["items"] == rec.recommend(ITEM_IDS[:8], k=3).items
    assert alone["items"] == rec.recommend(ITEM_IDS[:8], k=3, exclude_seen=False).items


BAD_REQUESTS = [
    ("post", "/recommend", {"user_id": "nobody"}, 404, "user_id"),
    ("post", "/recommend", {"user_id": "a", "k": 0}, 422, "k"),
    ("post", "/recommend", {"user_id": "a", "k": 31}, 422, "k"),
    ("post", "/recommend", {"user_id": "a", "k": "ten"}, 422, "k"),
    ("post", "/recommend", {"history": ["m1000", "not-an-item"]}, 422, "history"),
    ("post", "/recommend", {"history": "m1000"}, 422, "history"),
    ("post", "/recommend", {}, 422, "history"),
    ("post", "/recommend", {"user_id": "a", "colour": "red"}, 422, "colour"),
    ("post", "/recommend", {"user_id": "a", "exclude_seen": "maybe"}, 422, "exclude_seen"),
    ("post", "/events", {"user_id": "a", "items": ["zz"]}, 422, "items"),
    ("post", "/events", {"user_id": "a", "items": []}, 422, "items"),
    ("post", "/events", {"user_id": "a", "items": ["m1000"], "timestamps": [1, 2]}, 422, "timestamps"),
    ("post", "/events", {"items": ["m1000"]}, 422, "user_id"),
    ("get", "/users/nobody/history", None, 404, "user_id"),
    ("delete", "/users/nobody", None, 404, "user_id"),
]


def test_mistakes_are_4xx_json_naming_the_field(model_dirs, tmp_path):
    with _client(model_dirs["SASRec"], f"{tmp_path}/s.db", max_body_bytes=4096) as client:
        client.post("/events", json={"user_id": "a", "items": ITEM_IDS[:3]}, headers=AUTH)
        for method, path, body, status, field in BAD_REQUESTS:
            kwargs = {"headers": AUTH} | ({"json": body} if body is not None else {})
            answer = getattr(client, method)(path, **kwargs)
            assert (answer.status_code, answer.json()["field"]) == (status, field), (
                path,
                body,
                answer.json(),
            )
            assert answer.json()["error"]
        broken = client.post(
            "/recommend", content=b'{"user_id": ', headers={"content-type": "application/json"}
        )
        assert (broken.status_code, broken.json()["field"]) == (422, "body")
        huge = client.post("/recommend", content=b" " * 5000, headers={"content-type": "application/json"})
        assert (huge.status_code, huge.json()["field"]) == (413, "body")
        assert client.get("/no/such/path").status_code == 404
        assert client.get("/health").json()["status"] == "ok"  # still serving after all of that
        text = client.get("/metrics").text
    assert 'status="500"' not in text and 'path="/recommend",status="422"' in text


def test_write_endpoints_need_the_bearer_token(model_dirs, tmp_path):
    with _client(model_dirs["SASRec"], f"{tmp_path}/s.db") as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            answer = client.post("/events", json={"user_id": "a", "items": ["m1000"]}, headers=headers)
            assert (answer.status_code, answer.json()["field"]) == (401, "Authorization")
            assert client.delete("/users/a", headers=headers).status_code == 401
        assert (
            client.post("/events", json={"user_id": "a", "items": ["m1000"]}, headers=AUTH).status_code == 200
        )
        assert client.post("/recommend", json={"user_id": "a"}).status_code == 200  # reads need no token
        assert client.delete("/users/a", headers=AUTH).json() == {"user_id": "a", "deleted": True}
        assert client.get("/users/a/history").status_code == 404
        assert "/recommend" in client.get("/openapi.json").json()["paths"]


def test_time_models_need_timestamps(model_dirs, tmp_path):
    with _client(model_dirs["PersonalizedHSTU"], f"{tmp_path}/s.db") as client:
        answer = client.post("/events", json={"user_id": "a", "items": ["m1000"]}, headers=AUTH)
        assert (answer.status_code, answer.json()["field"]) == (422, "timestamps")
        answer = client.post("/recommend", json={"history": ["m1000"]})
        assert (answer.status_code, answer.json()["field"]) == (422, "timestamps")


def test_concurrent_requests_are_scored_together(model_dirs, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    rec = persrec.load_recommender(model_dirs["PersonalizedSASRec"])
    with _client(model_dirs["PersonalizedSASRec"], f"{tmp_path}/s.db") as client:
        for user in range(8):
            client.post("/events", json={"user_id": user, "items": ITEM_IDS[user : user + 10]}, headers=AUTH)

        def ask(user: int) -> list:
            return client.post("/recommend", json={"user_id": user, "k": 5}).json()["items"]

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, [u % 8 for u in range(48)]))
        batches = client.get("/metrics").text
    for user, items in zip([u % 8 for u in range(48)], answers, strict=True):
        assert items == rec.recommend(ITEM_IDS[user : user + 10], k=5, user=user).items
    count = next(line for line in batches.splitlines() if line.startswith("persrec_batch_size_count"))
    assert int(count.split()[-1]) <= 48
