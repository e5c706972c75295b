"""The search page and thumbnails, as a person uses them: a real `bentoml serve` of the default model over the
demo collection, driven over HTTP and in a real headless Chromium (Debian's package, through Playwright)."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from PIL import Image
from servekit import start_service

from bench.launcher import Server

pytestmark = pytest.mark.slow  # starts a server (and a browser)

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo" / "images"
API_KEY = "page-key"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("web")
    srv = start_service(root, model=str(REPO / "models" / "default"), demo_dir=str(DEMO), api_key=API_KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as http:
        yield http


def test_demo_index_has_thumbnails_served_with_cache_headers(server: Server, client: httpx.Client) -> None:
    stats = client.post("/stats", json={}).json()
    assert stats["count"] == stats["thumbnails"] == len(list(DEMO.rglob("*.jpg")))
    assert httpx.get(f"{server.url}/thumbnails/1").status_code == 401  # data needs the key; the page does not
    assert httpx.get(f"{server.url}/ui/").status_code == 200
    first = client.get("/thumbnails/1")
    assert first.status_code == 200 and first.headers["content-type"] == "image/webp"
    assert "max-age" in first.headers["cache-control"] and 0 < len(first.content) < 8 << 10
    again = client.get("/thumbnails/1", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    assert client.get("/thumbnails/x").status_code == 400
    assert client.get(f"/thumbnails/{2**64}").status_code == 400
    assert client.get("/thumbnails/99999").json() == {"error": "no item with id 99999"}


def test_root_sends_people_to_the_search_page_and_the_api_docs_live_at_docs(server: Server,
                                                                         client: httpx.Client) -> None:
    landing = httpx.get(f"{server.url}/")  # no key: the redirect reveals nothing
    assert landing.status_code == 307 and landing.headers["location"] == "/ui/"
    page = httpx.get(f"{server.url}/", follow_redirects=True)
    assert page.status_code == 200 and page.url.path == "/ui/" and 'id="results"' in page.text
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text and "./static_content/" in docs.text
    assert client.get("/static_content/swagger-initializer.js").status_code == 200  # what the docs page loads
    spec = client.get("/docs.json").json()
    assert {"/search", "/classify", "/add"} <= set(spec["paths"])
    assert httpx.get(f"{server.url}/docs").status_code == 401  # behind the key, as the docs page was at /
    assert client.post("/", json={}).status_code == 405  # only GET and HEAD are redirected


def test_added_images_get_thumbnails_and_vectors_do_not(client: httpx.Client, cifar10: Path) -> None:
    path = cifar10 / "test" / "ship" / "0007.jpg"
    (image_id,) = client.post("/add", files=[("images", (path.name, path.read_bytes(), "image/jpeg"))]).json()["ids"]
    thumb = client.get(f"/thumbnails/{image_id}")
    assert thumb.status_code == 200
    with Image.open(path) as original:
        assert Image.open(io.BytesIO(thumb.content)).size == original.size  # 32 px: kept
    vector = client.post("/get", json={"id": image_id}).json()["vector"]
    (vector_id,) = client.post("/add", json={"vectors": [vector]}).json()["ids"]
    missing = client.get(f"/thumbnails/{vector_id}")
    assert missing.status_code == 404 and "no thumbnail" in missing.json()["error"]
    bad = client.post("/add", json={"images_b64": [base64.b64encode(b"not an image").decode()]})
    assert bad.status_code == 400 and "image 0" in bad.json()["error"]


def test_search_page_in_headless_chromium(server: Server, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's `chromium` package (.ci/run does)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    query = DEMO / "cat" / "0000.jpg"
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 820})
            page.goto(f"{server.url}/")  # the service's address leads to the page
            assert page.url == f"{server.url}/ui/"
            page.fill("#key", API_KEY)
            page.locator("#key").blur()  # one change event, as a person leaving the field makes
            page.wait_for_function("document.querySelectorAll('#card dd').length > 0 && "
                                   "document.querySelectorAll('#stats dd').length > 0")
            assert "corinfomax-cifar10-tiny" in page.inner_text("#card")

            page.set_input_files("#file", str(query))
            page.wait_for_function("document.querySelectorAll('#results .result').length === 12 && "
                                   "document.querySelectorAll('#classes .bar').length > 0")
            first = page.locator("#results .result").first
            assert "cat/0000.jpg" in first.inner_text() and first.locator(".score").inner_text() == "1.000"
            page.wait_for_function("[...document.querySelectorAll('#results img')]"
                                   ".every((img) => img.complete && img.naturalWidth > 0)")
            page.screenshot(path=str(tmp_path / "search.png"))

            second = page.locator("#results .result").nth(1)
            second_id = second.get_attribute("data-id")
            second.click()
            page.wait_for_function(f"document.querySelector('#results-title').textContent.includes('#{second_id}')")
            page.wait_for_function(f"document.querySelector('#results .result')?.dataset.id === '{second_id}'")

            page.fill("#url", f"{server.url}/thumbnails/1")  # a private address: the guarded fetch refuses it
            page.click("#url-form button")
            page.wait_for_selector("#status.error")
            assert "private or reserved address" in page.inner_text("#status")
            assert API_KEY not in page.url
        finally:
            browser.close()


def test_the_page_searches_the_collection_picked(server: Server, client: httpx.Client, cifar10: Path) -> None:
    """The picker lists the collections; searches, stats and thumbnails then come from the one picked."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's `chromium` package (.ci/run does)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    created = client.post("/create_collection", json={"name": "ships", "model": "corinfomax-cifar10-tiny"})
    assert created.status_code == 200 and created.json()["count"] == 0, created.text
    ships = sorted((cifar10 / "test" / "ship").glob("*.jpg"))[:3]
    added = client.post("/add", files=[("images", (p.name, p.read_bytes(), "image/jpeg")) for p in ships],
                        data={"collection": '"ships"'}).json()["ids"]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{server.url}/ui/")
            page.fill("#key", API_KEY)
            page.locator("#key").blur()  # one change event, as a person leaving the field makes
            page.wait_for_function("document.querySelectorAll('#collection option').length === 2")
            page.select_option("#collection", "ships")
            page.wait_for_function("[...document.querySelectorAll('#stats dd')].some((dd) => dd.textContent === '3')")
            assert "corinfomax-cifar10-tiny" in page.inner_text("#card")  # the collection's model
            page.set_input_files("#file", str(ships[0]))
            page.wait_for_function("document.querySelectorAll('#results .result').length === 3")
            assert sorted(int(i) for i in page.eval_on_selector_all(
                "#results .result", "els => els.map((el) => el.dataset.id)")) == sorted(added)
            page.wait_for_function("[...document.querySelectorAll('#results img')]"
                                   ".every((img) => img.complete && img.naturalWidth > 0)")
        finally:
            browser.close()
    assert client.post("/drop_collection", json={"name": "ships"}).json() == {"dropped": "ships"}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's `chromium` package (.ci/run does)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def open_page(browser: Any, server: Server) -> Any:
    """A fresh tab on the page with the key typed in, ready once the collection's statistics show."""
    page = browser.new_page(viewport={"width": 1280, "height": 820})
    page.goto(f"{server.url}/ui/")
    page.fill("#key", API_KEY)
    page.locator("#key").blur()  # as a person leaves the field: one change event (dispatching one adds a second)
    page.wait_for_function("document.querySelectorAll('#stats dd').length > 0")
    return page


def result_ids(page: Any) -> list[int]:
    return [int(i) for i in page.eval_on_selector_all("#results .result", "els => els.map((el) => el.dataset.id)")]


def result_scores(page: Any) -> list[float]:
    return [float(s) for s in page.eval_on_selector_all("#results .score", "els => els.map((el) => el.textContent)")]


def result_labels(page: Any) -> list[str]:
    return page.eval_on_selector_all("#results .result .label", "els => els.map((el) => el.textContent)")


def wait_for_answer(page: Any, title: str) -> None:
    """Wait until the page shows the answer titled ``title``; an error shown instead fails with its text."""
    page.wait_for_function("""(title) => document.querySelector('#status').classList.contains('error') || (
        document.querySelector('#results-title').textContent === title &&
        / results?[.]$/.test(document.querySelector('#status').textContent))""", arg=title)
    assert not page.is_visible("#status.error"), page.inner_text("#status")


def search_by_upload(page: Any, image: Path, count: int = 12) -> None:
    page.set_input_files("#file", str(image))
    wait_for_answer(page, f"Nearest neighbours of {image.name}")
    assert len(result_ids(page)) == count


def test_the_filter_box_narrows_searches_by_label_and_metadata(server: Server, browser: Any) -> None:
    page = open_page(browser, server)
    title = "Nearest neighbours of 0000.jpg"
    search_by_upload(page, DEMO / "cat" / "0000.jpg")
    assert len(set(result_labels(page))) > 1  # unfiltered: neighbours of several classes
    unfiltered = result_scores(page)
    page.fill("#filter-label", "dog")
    page.click("#filter-form button[type=submit]")  # applies to the search on screen
    wait_for_answer(page, title)
    assert result_labels(page) == ["dog"] * 12

    page.fill("#filter-label", "")
    page.fill("#filter-path", "path")
    page.fill("#filter-value", "cat/0033.jpg")  # not JSON: sent as text
    page.click("#filter-form button[type=submit]")
    wait_for_answer(page, title)
    assert len(result_ids(page)) == 1 and "cat/0033.jpg" in page.inner_text("#results .result")

    page.fill("#filter-path", "")
    floor = (unfiltered[4] + unfiltered[5]) / 2  # between the 5th and 6th scores (shown to 3 decimals)
    assert unfiltered[4] - unfiltered[5] > 0.002, unfiltered
    page.fill("#min-score", f"{floor:.4f}")  # the score floor keeps the 5 above it
    page.click("#filter-form button[type=submit]")
    wait_for_answer(page, title)
    assert result_scores(page) == unfiltered[:5]

    page.click("#filter-form button[type=reset]")  # clearing the filter searches unfiltered again
    page.wait_for_function("document.querySelectorAll('#results .result').length === 12")
    page.close()


def test_a_bad_filter_shows_the_services_error(server: Server, browser: Any) -> None:
    page = open_page(browser, server)
    page.fill("#filter-path", "year")
    page.fill("#filter-value", '{"between": [2019, 2021]}')  # JSON, but no operator of the filter grammar
    page.set_input_files("#file", str(DEMO / "dog" / "0000.jpg"))
    page.wait_for_selector("#status.error")
    error = page.inner_text("#status")
    assert "metadata.year" in error and "unknown operator" in error and "between" in error, error
    page.fill("#filter-path", "no spaces")
    page.fill("#filter-value", "1")
    page.click("#filter-form button[type=submit]")
    page.wait_for_function("document.querySelector('#status').textContent.includes('bad field')")
    page.close()


def test_more_and_less_like_this_run_recommendations(server: Server, browser: Any, client: httpx.Client,
                                                     tmp_path: Path) -> None:
    page = open_page(browser, server)
    search_by_upload(page, DEMO / "cat" / "0000.jpg")
    liked = result_ids(page)[1]
    page.click(f"#results .result[data-id='{liked}'] button.more")
    wait_for_answer(page, f"Like #{liked}")
    assert page.eval_on_selector_all("#chips .chip.positive", "els => els.map((el) => el.dataset.id)") == [str(liked)]
    expected = client.post("/recommend", json={"positive": [liked], "k": 12}).json()["results"][0]
    assert result_ids(page) == [hit["id"] for hit in expected] and liked not in result_ids(page)

    disliked = result_ids(page)[-1]  # one of the recommendations now shown, whichever the model ranks last

    page.click(f"#results .result[data-id='{disliked}'] button.less")
    wait_for_answer(page, f"Like #{liked}, unlike #{disliked}")
    expected = client.post("/recommend", json={"positive": [liked], "negative": [disliked], "k": 12}).json()
    assert result_ids(page) == [hit["id"] for hit in expected["results"][0]]

    page.fill("#filter-label", "cat")  # the filter applies to recommendations too
    page.click("#filter-form button[type=submit]")
    wait_for_answer(page, f"Like #{liked}, unlike #{disliked}")
    assert set(result_labels(page)) == {"cat"}
    page.screenshot(path=str(tmp_path / "recommend.png"))
    page.click(f"#chips .chip.negative[data-id='{disliked}'] button")  # removing a chip recommends again
    wait_for_answer(page, f"Like #{liked}")
    page.click("#clear-examples")  # back to the search the examples refined, still filtered
    wait_for_answer(page, "Nearest neighbours of 0000.jpg")
    assert page.is_hidden("#examples") and set(result_labels(page)) == {"cat"}
    page.close()


def test_the_duplicates_view_finds_a_planted_copy(server: Server, browser: Any, client: httpx.Client,
                                                 tmp_path: Path) -> None:
    original = DEMO / "cat" / "0000.jpg"  # in the demo index
    copy = io.BytesIO()
    with Image.open(original) as im:
        # a re-encoded copy, planted beside it: at quality 90 it scores ~0.996, clear of the 0.95 that folding uses
        # (at quality 50 a 32-px image loses enough to fall below it: docs/RESULTS.md, the v4 section)
        im.save(copy, "JPEG", quality=90)
    (planted,) = client.post("/add", files=[("images", ("copy.jpg", copy.getvalue(), "image/jpeg"))]).json()["ids"]
    page = open_page(browser, server)
    search_by_upload(page, original)
    demo_id = result_ids(page)[0]
    assert "cat/0000.jpg" in page.inner_text(f"#results .result[data-id='{demo_id}']")
    page.fill("#threshold", "0.9")
    page.click("#dup-query")  # duplicates of the uploaded image: the indexed original and the planted copy
    wait_for_answer(page, "Duplicates of 0000.jpg (similarity \u2265 0.9)")
    assert result_ids(page)[:2] == [demo_id, planted]  # the original scores 1, its copy a little less
    assert page.locator("#classes .bar").count() > 0  # still the query image's classes
    scores = result_scores(page)
    assert all(score >= 0.9 for score in scores) and scores == sorted(scores, reverse=True)

    page.click(f"#results .result[data-id='{demo_id}'] button.dups")  # a result's duplicates: its own item left out
    wait_for_answer(page, f"Duplicates of item #{demo_id} (similarity \u2265 0.9)")
    assert planted in result_ids(page) and demo_id not in result_ids(page)
    page.screenshot(path=str(tmp_path / "duplicates.png"))

    page.check("#fold")  # a search folding near-duplicates lists the copy under its original, k still shown
    search_by_upload(page, original)
    assert result_ids(page)[0] == demo_id and planted not in result_ids(page)
    assert f"folded in: #{planted}" in page.inner_text("#results .result")
    page.close()
