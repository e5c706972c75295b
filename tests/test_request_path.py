"""The request path's parts, without a server: admission (backpressure), decoding on the loop or in parallel
parts, reduced-size decode of big photos, the batcher's per-request timings and the stage metrics."""

from __future__ import annotations

import asyncio
import io
import os
import threading
import time
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
import prometheus_client
import pydantic
import pytest
from bentoml.exceptions import BentoMLException
from PIL import Image
from servekit import request_with_body

from corinfomax.core.errors import BadInput
from corinfomax.core.images import ResizeRule, load_image, model_input, to_model_input
from corinfomax.serving.api import bentoml_patches, metrics
from corinfomax.serving.api.admission import Admission, AdmissionGate
from corinfomax.serving.api.batcher import MicroBatcher
from corinfomax.serving.api.config import Settings
from corinfomax.serving.api.direct import arguments, direct_methods
from corinfomax.serving.api.inputs import INLINE_PIXELS, ImageInputs, split_by_cost
from corinfomax.serving.api.serde import RequestError


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_admission_refuses_what_would_wait_too_long_and_always_admits_when_idle() -> None:
    clock = Clock()
    gate = Admission(max_wait_s=2 * 0.11, clock=clock)  # the mean kept within half of it
    assert gate.admit() and gate.admit()  # nothing answered yet: no pace, admit
    clock.now = 0.02
    gate.done()  # 20 ms for the first answer
    clock.now = 0.04
    gate.done()
    assert gate.pace_s == pytest.approx(0.02) and gate.in_flight == 0
    for _ in range(4):  # 1..4 in flight: the fifth would wait (4 + 1) x 20 ms = 100 ms, under the limit
        assert gate.admit()
    assert gate.expected_wait() == pytest.approx(0.1)
    assert gate.admit() and not gate.admit()  # 6 x 20 ms = 120 ms > 110 ms
    assert gate.in_flight == 5 and gate.retry_after() == 1
    for _ in range(5):
        clock.now += 0.02
        gate.done()
    assert gate.pace_s == pytest.approx(0.02)
    gate.admit()
    clock.now += 5.0  # one answer 250x slower than the pace so far counts as the bound: a blip, not a new pace
    gate.done()
    assert gate.pace_s is not None and 0.02 < gate.pace_s < 0.22 / 4
    slow = Admission(max_wait_s=0.2, clock=clock)
    slow.admit()
    clock.now += 5.0
    slow.done()  # one answer took 5 s: alone, a request is still admitted
    assert slow.admit() and not slow.admit() and slow.retry_after() == 1


def test_admission_keeps_the_pace_of_answers_that_come_in_bursts() -> None:
    """The batcher answers a model call's requests at once: 8 answers every 80 ms is 10 ms per answer."""
    clock = Clock()
    gate = Admission(max_wait_s=0.5, clock=clock)
    for _ in range(64):
        assert gate.admit()
    for _ in range(7):  # 56 answered in bursts of 8, 8 still in flight
        clock.now += 0.08
        for _ in range(8):
            gate.done()
    assert gate.pace_s == pytest.approx(0.01, rel=0.3)
    assert gate.expected_wait() == pytest.approx(0.09, rel=0.3)
    while gate.admit():  # refused once the mean wait passes half the bound: (n + 1) x 10 ms > 250 ms
        pass
    assert 20 <= gate.in_flight <= 30


def _asgi(app: Any, path: str, body: bytes = b"{}") -> tuple[list[dict[str, Any]], int]:
    """Run one POST through an ASGI app; the messages it sent and how many times it read the body."""
    sent: list[dict[str, Any]] = []
    reads = 0

    async def receive() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": body[:5] if reads == 1 else body[5:], "more_body": reads == 1}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app({"type": "http", "path": path, "method": "POST", "headers": []}, receive, send))
    return sent, reads


def test_the_gate_answers_503_with_retry_after_and_drains_the_body() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    gate = AdmissionGate(app, routes={"/embed": "embed"}, max_wait_ms=10)
    gate.admission.in_flight, gate.admission.pace_s = 3, 0.5  # a busy worker: (3 + 1) x 0.5 s ahead
    sent, reads = _asgi(gate, "/embed")
    headers = dict(sent[0]["headers"])
    assert sent[0]["status"] == 503 and headers[b"retry-after"] == b"2" and reads == 2
    assert b"CORINFOMAX_MAX_QUEUE_MS" in sent[1]["body"] and gate.admission.in_flight == 3
    assert _asgi(gate, "/metrics")[0][0]["status"] == 200  # only API routes are gated
    refused = prometheus_client.REGISTRY.get_sample_value("corinfomax_admission_refused_total", {"endpoint": "embed"})
    assert refused is not None and refused >= 1


def test_split_by_cost_balances_and_covers_every_image() -> None:
    costs = [9_000_000, 100, 9_000_000, 100, 9_000_000, 100, 9_000_000, 100]
    parts = split_by_cost(costs, 2)
    assert sorted(i for part in parts for i in part) == list(range(8))
    assert [sum(costs[i] for i in part) for part in parts] == [18_000_200, 18_000_200]
    assert split_by_cost([5], 4) == [[0]]


def _photo(side: int, seed: int = 0, orientation: int | None = None) -> bytes:
    """A smooth random JPEG of ``side`` x ``3 * side // 4`` pixels (optionally with an EXIF orientation)."""
    small = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((side, 3 * side // 4), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    image.save(buffer, "JPEG", quality=90, exif=exif)
    return buffer.getvalue()


def test_big_photos_decode_at_reduced_size_close_to_the_full_decode() -> None:
    rule = ResizeRule((224, 224), 256)
    data = _photo(3000)
    pixels, size = model_input(data, rule)
    full = to_model_input(load_image(data), rule)
    assert pixels.shape == full.shape == (224, 224, 3) and size == (3000, 2250)
    assert np.abs(pixels.astype(np.float64) - full).mean() < 2.0  # grey levels, of 255
    assert load_image(data, min_side=256).size == (375, 282)  # decoded at 1/8
    assert model_input(_photo(400, orientation=6), rule)[1] == (300, 400)  # the full size, turned by EXIF


class _Embedder:
    """What ``ImageInputs`` needs of an embedder; records the thread each image was decoded in."""

    def __init__(self, meet: int = 1) -> None:
        self.resize = ResizeRule((64, 64), 64)
        self.threads: set[int] = set()
        self.meeting = threading.Barrier(meet, timeout=10)  # each new thread waits here for ``meet`` threads in all

    def preprocess(self, data: bytes) -> np.ndarray:
        if threading.get_ident() not in self.threads:
            self.threads.add(threading.get_ident())
            self.meeting.wait()
        return model_input(data, self.resize)[0]


def _inputs(decoders: int) -> tuple[ImageInputs, _Embedder]:
    embedder = _Embedder(meet=decoders)  # the parts must run at once, or the first thread waits in vain
    settings = Settings.from_env()
    return ImageInputs(settings, decoders=decoders), embedder


def test_a_request_of_big_photos_is_decoded_in_parallel_parts_and_small_ones_on_the_loop() -> None:
    inputs, embedder = _inputs(decoders=2)
    photos = [_photo(1600, seed) for seed in range(8)]
    loop_thread: list[int] = []

    async def decode(raw: list[bytes]) -> np.ndarray:
        loop_thread.append(threading.get_ident())
        return await inputs.pixels(raw, embedder)  # type: ignore[arg-type]  # what pixels needs of one

    out = asyncio.run(decode(photos))
    assert len(embedder.threads) == 2 and loop_thread[0] not in embedder.threads
    np.testing.assert_array_equal(out, np.stack([model_input(p, embedder.resize)[0] for p in photos]))
    embedder.threads.clear()
    embedder.meeting = threading.Barrier(1)  # from here on, nobody waits for anyone
    small = [_photo(64, seed) for seed in range(4)]
    assert 4 * 64 * 48 <= INLINE_PIXELS
    assert asyncio.run(decode(small)).shape == (4, 64, 64, 3) and embedder.threads == {loop_thread[-1]}
    broken = photos[:3] + [b"not an image"] + photos[3:]
    with pytest.raises(BadInput, match="^image 3: "):
        asyncio.run(decode(broken))
    inputs.close()


def test_the_batcher_reports_each_requests_wait_and_model_call() -> None:
    reports: list[tuple[float, float]] = []

    def model(batch: np.ndarray) -> np.ndarray:
        time.sleep(0.05)
        return batch * 2

    async def scenario() -> None:
        batcher = MicroBatcher(model, max_batch=8, on_request=lambda q, s: reports.append((q, s)))
        first = asyncio.ensure_future(batcher(np.ones((1, 1))))
        await asyncio.sleep(0.01)
        await asyncio.gather(first, batcher(np.ones((1, 1))))
        batcher.close()

    asyncio.run(scenario())
    (first_wait, first_call), (second_wait, second_call) = reports
    assert first_wait < second_wait and second_wait >= 0.03  # the second waited behind the first call
    assert first_call >= 0.05 and second_call >= 0.05


def test_stage_timer_observes_each_stage_of_a_request_once_it_is_answered() -> None:
    def count(stage: str) -> float:
        return prometheus_client.REGISTRY.get_sample_value(
            "corinfomax_stage_seconds_count", {"endpoint": "probe_endpoint", "stage": stage}) or 0.0

    async def app(scope: Any, receive: Any, send: Any) -> None:
        metrics.handler_started()
        with metrics.timed("decode"):
            pass
        metrics.model_wait(0.001, 0.002)
        metrics.handler_finished()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        assert count("parse") == before["parse"]  # observed only after the last byte
        await send({"type": "http.response.body", "body": b"{}"})

    before = {stage: count(stage) for stage in metrics.STAGES}
    _asgi(metrics.StageTimer(app, routes={"/probe": "probe_endpoint"}), "/probe")
    grown = {stage: count(stage) - before[stage] for stage in metrics.STAGES}
    assert grown == {"parse": 1, "decode": 1, "queue": 1, "inference": 1, "index": 0, "respond": 1}
    metrics.record("index", 1.0)  # outside a request: nothing to record into, no error


def test_decoded_sizes_name_the_images_original_size(tmp_path: Path) -> None:
    from corinfomax.serving.extract.inputs import InputFile, decode

    path = tmp_path / "big.jpg"
    path.write_bytes(_photo(2000))
    pixels, record = decode(InputFile(str(path), None), ResizeRule((32, 32), 32))
    assert pixels is not None and pixels.shape == (32, 32, 3) and (record.width, record.height) == (2000, 1500)


def test_the_direct_path_reads_requests_as_bentomls_parsers_do_with_uploads_as_bytes() -> None:
    @bentoml.service
    class Tiny:
        @bentoml.api
        async def search(self, images: list[Path] = [], ids: list[int] | None = None,  # noqa: B006
                         k: int = 10) -> dict:
            return {}

        @bentoml.api
        async def with_context(self, ctx: bentoml.Context) -> dict:
            return {}

    service: Any = Tiny
    bentoml_patches.validate_strictly(service)
    assert list(direct_methods(service)) == ["/search"]  # what takes BentoML's context stays with BentoML
    spec = service.apis["search"].input_spec
    form = (b'--zz\r\nContent-Disposition: form-data; name="images"; filename="a.jpg"\r\n\r\n\xff\xd8\r\n'
            b'--zz\r\nContent-Disposition: form-data; name="k"\r\n\r\n3\r\n--zz--\r\n')
    parsed = asyncio.run(arguments(spec, request_with_body(form, "multipart/form-data; boundary=zz")))
    assert parsed == {"images": [b"\xff\xd8"], "ids": None, "k": 3}
    assert asyncio.run(arguments(spec, request_with_body(b'{"ids": [1]}', "application/x-weird")))["ids"] == [1]
    for body, content_type, error in [(b'{"ids": [true]}', "application/json", pydantic.ValidationError),
                                      (b'{"fitler": 1}', "application/json", pydantic.ValidationError),
                                      (b"k=3&fitler=1", "application/x-www-form-urlencoded", pydantic.ValidationError),
                                      (b"images=http://x/a.jpg", "application/x-www-form-urlencoded", RequestError),
                                      (b"\x80\x04N.", "application/vnd.bentoml+pickle", BentoMLException),
                                      (b"--x\r\n", "multipart/form-data", RequestError)]:
        with pytest.raises(error):
            asyncio.run(arguments(spec, request_with_body(body, content_type)))


class _Owner:
    """An index service's shape for the channel: API methods by name (``.func``), called on an instance."""

    def __init__(self) -> None:
        from corinfomax.serving.api.envelope import envelope

        def search(owner: Any, vectors: np.ndarray, k: int) -> list[int]:
            if k < 1:
                raise BadInput("k must be positive")
            if k == 99:
                raise ValueError("a bug")
            return [int(vectors.sum()), k, threading.get_ident() != owner.loop_thread]

        self.apis = {"search": type("Method", (), {"func": staticmethod(envelope(search))})()}
        self.loop_thread = threading.get_ident()


def test_the_index_channel_calls_the_owners_methods_by_name_with_the_envelopes_answers(tmp_path: Path) -> None:
    from corinfomax.serving.api.channel import ChannelDropped, ChannelServer, IndexChannel, IndexFailed

    owner = _Owner()
    fallback_calls: list[str] = []

    async def fallback(name: str, **kwargs: Any) -> Any:
        fallback_calls.append(name)
        return {"ok": "over HTTP"}

    async def scenario() -> None:
        path = tmp_path / "sockets" / "index-1.sock"
        channel = IndexChannel(path)
        assert await channel.call("search", {"vectors": np.ones((2, 3)), "k": 1}, fallback) == {"ok": "over HTTP"}
        server = await ChannelServer(owner, owner, path).start()
        assert (path.parent.stat().st_mode & 0o777) == 0o700
        calls = [channel.call("search", {"vectors": np.ones((2, 3)), "k": k}, fallback) for k in (1, 2, 3)]
        assert [answer["ok"][:2] for answer in await asyncio.gather(*calls)] == [[6, 1], [6, 2], [6, 3]]
        assert (await channel.call("search", {"vectors": np.ones(1), "k": 1}, fallback))["ok"][2]  # in a thread
        assert await channel.call("search", {"vectors": np.ones(1), "k": 0}, fallback) == {
            "error": "k must be positive", "status": 400}
        for name, k in (("search", 99), ("nothing", 1)):
            with pytest.raises(IndexFailed):
                await channel.call(name, {"vectors": np.ones(1), "k": k}, fallback)
        await server.close()
        assert not path.exists()
        with pytest.raises(ChannelDropped):  # an idle connection of the closed server
            await channel.call("search", {"vectors": np.ones(1), "k": 1}, fallback)

    asyncio.run(scenario())
    assert fallback_calls == ["search"]
    open_folder = tmp_path / "open"
    open_folder.mkdir(mode=0o755)
    open_folder.chmod(0o755)

    with pytest.raises(PermissionError):
        asyncio.run(ChannelServer(owner, owner, open_folder / "index-1.sock").start())


@pytest.mark.slow  # a Python subprocess: OpenMP reads its thread count once, when FAISS loads it
def test_the_index_service_runs_faiss_on_one_openmp_thread_in_every_thread() -> None:
    import subprocess
    import sys

    code = ("import corinfomax.serving.api.index_owner\n"
            "import faiss, threading\n"
            "seen = []\n"
            "thread = threading.Thread(target=lambda: seen.append(faiss.omp_get_max_threads()))\n"
            "thread.start(); thread.join()\n"
            "print(faiss.omp_get_max_threads(), seen[0])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "4"}).stdout.split()
    assert out == ["1", "1"]  # in the thread that loaded FAISS and in a new one (BentoML's pool's)
