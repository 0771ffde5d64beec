"""The review page (DESIGN.md "Review page") in Debian's Chromium, driven by Selenium, on
the endpoint serving conftest's ``people_run`` (real photos scored and clustered) with a
labels log: name a person, merge two, take faces out, confirm three suggestions from the
keyboard, forget a name — after each, the labels log (pandas) and the people page after a
reload.  Also: the JSON routes' 4xx, two reviewers at once, thumbnails from S3 and a photo
that cannot be read.  Screenshots go to docs/review-*.png."""
from __future__ import annotations

import io
import os
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

TOKEN = "review-token"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
DOCS = Path(__file__).resolve().parent.parent / "docs"
WAIT_S = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint(ray_cluster, people_run, tmp_path_factory):
    """serve_api.py's app on the people_run table and people, a fresh labels log, a token."""
    import httpx
    from ray import serve

    from serve.app import build_app

    table, _, people = people_run
    labels_dir = tmp_path_factory.mktemp("review") / "labels"
    for attempt in range(3):  # a free port can be taken before the proxy binds
        port = _free_port()
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            break
        except Exception:
            serve.shutdown()
            if attempt == 2:
                raise
    try:
        serve.run(build_app({"table": table, "people": people, "labels": str(labels_dir), "token": TOKEN,
                             "direct_ingress": False}), name="faceray", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        http = httpx.Client(base_url=url, timeout=120, headers={"authorization": f"Bearer {TOKEN}"})
        yield {"url": url, "labels": labels_dir, "http": http, "table": table, "people": people}
        http.close()
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def browser(endpoint):
    """Headless Chromium from Debian (no Selenium Manager download), the token typed once."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for tool in (CHROMIUM, CHROMEDRIVER):
        if not Path(tool).exists():
            pytest.skip(f"{tool} missing: make setup installs Debian's chromium and chromium-driver")
    os.environ["SE_AVOID_STATS"] = "true"
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1180,860",
                "--disable-gpu", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(WAIT_S)
    try:
        driver.get(endpoint["url"] + "/review#people")
        dialog = wait(driver, lambda d: d.find_element("id", "token-input").is_displayed())
        assert dialog
        driver.find_element("id", "token-input").send_keys(TOKEN)
        driver.find_element("id", "author-input").send_keys("tester")
        driver.find_element("id", "token-ok").click()
        wait(driver, lambda d: d.find_elements("css selector", ".person-card"))
        yield driver
    finally:
        driver.quit()


# ---------------------------------------------------------------- helpers

def wait(driver, cond, timeout: float = WAIT_S):
    """Until ``cond`` holds; an element the page re-rendered meanwhile is looked up again."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=[StaleElementReferenceException]).until(cond)


def log(endpoint) -> pd.DataFrame:
    return pd.read_parquet(endpoint["labels"]).sort_values("at", kind="stable")


def cards(driver) -> list[dict]:
    """The people grid's cards as shown: person, name, size."""
    return driver.execute_script("""return [...document.querySelectorAll('#people-grid .person-card')].map(
        c => ({person: c.dataset.person, name: c.dataset.name || null, size: +c.dataset.size}));""")


def open_people(driver, endpoint, which: str = "people") -> list[dict]:
    """The people page after a reload (what the labels log says now): ``people`` (all,
    unnamed first), ``named`` or ``unnamed``."""
    driver.get(endpoint["url"] + "/review#" + which)
    driver.refresh()
    wait(driver, lambda d: d.find_element("id", "people-more").text.endswith("people")
         or d.find_elements("css selector", "#people-grid .person-card"))
    return cards(driver)


def open_hash(driver, endpoint, where: str, ready: str) -> None:
    from urllib.parse import quote

    driver.get(endpoint["url"] + "/review#" + quote(where))
    driver.refresh()
    wait(driver, lambda d: d.find_elements("css selector", ready))


def saved(driver) -> None:
    """The page's act has been answered (its "saved: …" notice shows)."""
    wait(driver, lambda d: d.find_element("id", "notice").is_displayed()
         and d.find_element("id", "notice").text.startswith("saved"))


def thumbs_loaded(driver) -> None:
    """Every thumbnail in the window has arrived (what a screenshot should show)."""
    wait(driver, lambda d: d.execute_script("""return [...document.querySelectorAll('img[data-src]')].filter(i => {
        const r = i.getBoundingClientRect(); return r.bottom > 0 && r.top < innerHeight && !i.dataset.loaded;
    }).length === 0;"""))


def screenshot(driver, name: str) -> None:
    """docs/<name>.png, scaled down and palette-reduced (small enough to keep in the repo)."""
    from PIL import Image

    thumbs_loaded(driver)
    img = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    img = img.resize((img.width * 3 // 4, img.height * 3 // 4), Image.LANCZOS)
    DOCS.mkdir(exist_ok=True)
    img.quantize(colors=192, method=Image.Quantize.MEDIANCUT).save(DOCS / f"{name}.png", optimize=True)


def person_faces(endpoint, **ref) -> set[tuple[str, int]]:
    r = endpoint["http"].get("/v1/review/person", params={**ref, "limit": 500})
    assert r.status_code == 200, r.text
    return {(f["image_uri"], f["face_index"]) for f in r.json()["faces"]}


def by_name(people: list[dict], name: str) -> dict | None:
    return next((c for c in people if c["name"] == name), None)


def unnamed(people: list[dict], skip: set[str] = frozenset()) -> list[dict]:
    return [c for c in people if c["name"] is None and c["person"] not in skip and c["size"] >= 2]


# ---------------------------------------------------------------- the page

ANN, BOB = "Ann Example", "Bob Merged"


def test_people_grid_lists_unnamed_first_largest_first(browser, endpoint):
    shown = open_people(browser, endpoint)
    sizes = [c["size"] for c in shown]
    assert all(c["name"] is None for c in shown) and sizes == sorted(sizes, reverse=True)
    r = endpoint["http"].get("/v1/review/people", params={"limit": 200})
    assert r.json()["total"] > len(shown) - 1 and r.json()["people"][:len(shown)][0]["person"] == shown[0]["person"]
    assert "faces named" in browser.find_element("id", "progress").text
    screenshot(browser, "review-people")


def test_name_a_person(browser, endpoint):
    target = unnamed(open_people(browser, endpoint))[0]
    faces = person_faces(endpoint, person=target["person"])
    assert len(faces) == target["size"]
    open_hash(browser, endpoint, f"person/{target['person']}", "#person-faces .face")
    box = browser.find_element("id", "name-input")
    box.send_keys(ANN)
    browser.find_element("id", "name-btn").click()
    wait(browser, lambda d: ANN in d.find_element("id", "person-title").text)
    rows = log(endpoint)
    assert (rows.action == "name").all() and set(rows.name) == {ANN} and (rows.source == "review").all()
    assert set(zip(rows.image_uri, rows.face_index)) == faces and set(rows.author) == {"tester"}
    ann = by_name(open_people(browser, endpoint, "named"), ANN)
    assert ann is not None and ann["size"] == target["size"]
    assert target["person"] not in {c["person"] for c in open_people(browser, endpoint)}
    open_hash(browser, endpoint, f"name/{ANN}", "#person-faces .face")
    screenshot(browser, "review-person")


def test_merge_two_people(browser, endpoint):
    shown = open_people(browser, endpoint)
    a, b = unnamed(shown)[:2]
    before = len(log(endpoint))
    for target in (a, b):
        browser.find_element("css selector", f".person-card[data-person='{target['person']}'] .pick-box").click()
    browser.find_element("id", "merge-name").send_keys(BOB)
    browser.find_element("id", "merge-btn").click()
    saved(browser)
    rows = log(endpoint).iloc[before:]
    assert (rows.action == "name").all() and set(rows.name) == {BOB} and len(rows) == a["size"] + b["size"]
    bob = by_name(open_people(browser, endpoint, "named"), BOB)
    assert bob["size"] == a["size"] + b["size"]
    assert {a["person"], b["person"]}.isdisjoint({c["person"] for c in open_people(browser, endpoint)})


def test_take_faces_out(browser, endpoint):
    size = by_name(open_people(browser, endpoint, "named"), ANN)["size"]
    open_hash(browser, endpoint, f"name/{ANN}", "#person-faces .face")
    faces = browser.find_elements("css selector", "#person-faces .face")
    out = [(f.get_attribute("data-uri"), int(f.get_attribute("data-index"))) for f in faces[-2:]]
    before = len(log(endpoint))
    for f in faces[-2:]:
        f.click()
    browser.find_element("id", "takeout-btn").click()
    wait(browser, lambda d: d.find_element("id", "person-size").text == f"{size - 2} faces")
    rows = log(endpoint).iloc[before:]
    assert list(rows.action) == ["not", "not"] and set(rows.name) == {ANN}
    assert set(zip(rows.image_uri, rows.face_index)) == set(out)
    assert by_name(open_people(browser, endpoint, "named"), ANN)["size"] == size - 2
    assert not set(out) & person_faces(endpoint, name=ANN)


def test_confirm_three_suggestions_from_the_keyboard(browser, endpoint):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    ann_before = person_faces(endpoint, name=ANN)
    open_hash(browser, endpoint, f"suggest/{ANN}", "#suggested-faces .face")
    screenshot(browser, "review-suggestions")
    shown = browser.find_elements("css selector", "#suggested-faces .face")
    picked = [(f.get_attribute("data-uri"), int(f.get_attribute("data-index"))) for f in shown[:3]]
    assert not set(picked) & ann_before  # suggestions are faces not yet Ann's
    before = len(log(endpoint))
    keys = ActionChains(browser)
    keys.send_keys(" ", Keys.ARROW_RIGHT, " ", Keys.ARROW_RIGHT, " ").perform()
    wait(browser, lambda d: d.find_element("id", "selected-count").text == "3 selected")
    ActionChains(browser).send_keys("y").perform()
    saved(browser)
    rows = log(endpoint).iloc[before:]
    assert list(rows.action) == ["name"] * 3 and set(rows.name) == {ANN}
    assert set(zip(rows.image_uri, rows.face_index)) == set(picked)
    assert set(picked) <= person_faces(endpoint, name=ANN)
    ann = by_name(open_people(browser, endpoint, "named"), ANN)
    assert ann["size"] >= len(ann_before) + 3


def test_forget_a_name(browser, endpoint):
    bob = by_name(open_people(browser, endpoint, "named"), BOB)
    open_hash(browser, endpoint, f"name/{BOB}", "#person-faces .face")
    before = len(log(endpoint))
    browser.find_element("id", "forget-btn").click()
    browser.switch_to.alert.accept()
    wait(browser, lambda d: d.current_url.endswith("#people"))
    rows = log(endpoint).iloc[before:]
    assert list(rows.action) == ["forget"] and list(rows.name) == [BOB] and rows.image_uri.isna().all()
    assert by_name(open_people(browser, endpoint, "named"), BOB) is None
    r = endpoint["http"].get("/v1/review/people", params={"limit": 200}).json()["people"]
    assert sum(p["size"] for p in r if p["name"] is None and p["person"] in bob_people(endpoint, bob)) == bob["size"]
    assert BOB not in endpoint["http"].get("/v1/review/names").json()["names"]


def bob_people(endpoint, bob: dict) -> set[str]:
    """The clusters whose faces the merge named (from the log)."""
    rows = log(endpoint)
    named = rows[(rows.action == "name") & (rows.name == BOB)]
    people = pd.read_parquet(endpoint["people"], columns=["image_uri", "face_index", "person"])
    return set(people.merge(named, on=["image_uri", "face_index"]).person)


def test_a_bad_request_shows_its_reason_and_keeps_the_work(browser, endpoint):
    target = unnamed(open_people(browser, endpoint))[0]
    open_hash(browser, endpoint, f"person/{target['person']}", "#person-faces .face")
    faces = browser.find_elements("css selector", "#person-faces .face")
    faces[0].click()
    box = browser.find_element("id", "name-input")
    box.send_keys("   ")
    browser.find_element("id", "name-btn").click()
    wait(browser, lambda d: d.find_element("id", "error").is_displayed())
    assert "400" in browser.find_element("id", "error-text").text
    assert "empty" in browser.find_element("id", "error-text").text
    assert box.get_attribute("value") == "   " and "selected" in faces[0].get_attribute("class")
    open_hash(browser, endpoint, "person/p999999", "#error:not([hidden])")
    assert "unknown person" in browser.find_element("id", "error-text").text


# ---------------------------------------------------------------- the JSON routes

def test_routes_give_4xx_with_a_reason(endpoint):
    import httpx

    http = endpoint["http"]
    photo = log(endpoint).image_uri.dropna().iloc[0]
    cases = [
        (http.get("/v1/review/person", params={"person": "p999999"}), 404, "unknown person"),
        (http.get("/v1/review/person", params={"name": "Nobody Here"}), 404, "no person is named"),
        (http.get("/v1/review/person"), 400, "exactly one of"),
        (http.post("/v1/review/name", json={"person": "p000001", "to": " "}), 400, "empty"),
        (http.post("/v1/review/decide", json={"name": ANN, "confirm": [{"image_uri": "/no/such.jpg", "face_index": 0}]}),
         404, "face not in the table"),
        (http.post("/v1/review/merge", json={"people": [{"person": "p000001"}]}), 422, "people"),
        (http.get("/v1/faces/thumbnail", params={"image_uri": photo, "face_index": 99}), 404, "face not in the table"),
        (http.get("/v1/review/people", params={"limit": 0}), 400, "limit"),
        (httpx.get(endpoint["url"] + "/v1/review/people"), 401, "bearer"),
    ]
    for r, status, reason in cases:
        assert r.status_code == status, (r.request.url, r.text)
        assert reason in r.json()["error"], r.text
    two = [p for p in http.get("/v1/review/people", params={"limit": 50}).json()["people"] if p["name"] is None][:2]
    r = http.post("/v1/review/merge", json={"people": [{"person": p["person"]} for p in two]})
    assert r.status_code == 400 and "needs a name" in r.json()["error"]
    assert endpoint["http"].get("/review/nope.js").status_code == 404
    spec = http.get("/openapi.json").json()  # documented at /docs, with their response models
    for route in ("/v1/review/people", "/v1/review/person", "/v1/review/name", "/v1/review/merge",
                  "/v1/review/decide", "/v1/review/forget", "/v1/review/suggestions", "/v1/review/progress",
                  "/v1/review/names", "/v1/faces/thumbnail"):
        assert route in spec["paths"], route
    assert "ReviewPeopleOut" in spec["components"]["schemas"] and "/review" not in spec["paths"]
    assert httpx.get(endpoint["url"] + "/review").status_code == 200  # the page itself is open; /v1 is not


def test_two_reviewers_at_once_both_land_and_the_later_decision_wins(endpoint):
    http = endpoint["http"]
    targets = [p["person"] for p in http.get("/v1/review/people", params={"limit": 50}).json()["people"]
               if p["name"] is None and p["size"] >= 2][:2]
    before = len(log(endpoint))
    results = []

    def name(person: str, to: str) -> None:
        results.append(http.post("/v1/review/name", json={"person": person, "to": to, "author": to}).status_code)

    threads = [threading.Thread(target=name, args=(p, f"Reviewer {i}")) for i, p in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [200, 200]
    rows = log(endpoint).iloc[before:]
    assert set(rows.name) == {"Reviewer 0", "Reviewer 1"}
    names = set(http.get("/v1/review/names").json()["names"])
    assert {"Reviewer 0", "Reviewer 1"} <= names
    # the same face decided twice: the later row wins, as the log's replay says
    face = sorted(person_faces(endpoint, name="Reviewer 0"))[0]
    ref = {"image_uri": face[0], "face_index": face[1]}
    assert http.post("/v1/review/decide", json={"name": "Reviewer 1", "confirm": [ref]}).status_code == 200
    assert face in person_faces(endpoint, name="Reviewer 1") and face not in person_faces(endpoint, name="Reviewer 0")
    assert http.post("/v1/review/decide", json={"name": "Reviewer 0", "confirm": [ref]}).status_code == 200
    assert face in person_faces(endpoint, name="Reviewer 0")


def test_thumbnail_is_the_face_cut_by_its_box(endpoint):
    from PIL import Image

    http = endpoint["http"]
    p = http.get("/v1/review/people", params={"limit": 1, "faces": 1, "size": 64}).json()["people"][0]
    url = p["faces"][0]["thumbnail"]
    first, again = http.get(url), http.get(url)
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    assert first.content == again.content
    assert Image.open(io.BytesIO(first.content)).size == (64, 64)
    stats = http.get("/v1/model").json()["table"]["thumbnails"]
    assert stats["hits"] >= 1


# ---------------------------------------------------------------- thumbnails alone

def test_thumbnails_from_s3_and_a_placeholder_for_an_unreadable_photo(local_s3, data_dir, tmp_path):
    from PIL import Image

    from serve.thumbnails import Thumbnails

    photo = sorted((data_dir / "identities").rglob("*.jpg"))[0]
    local_s3.create_bucket("thumbs")
    (tmp_path / "p").mkdir()
    shutil.copy(photo, tmp_path / "p" / "a.jpg")
    local_s3.upload_dir(tmp_path / "p", "thumbs", "photos")
    thumbs = Thumbnails(cache_bytes=10_000_000, read_timeout_s=5)
    data, real = thumbs.get("s3://thumbs/photos/a.jpg", 0, (80.0, 80.0, 90.0, 90.0), 100)
    img = np.asarray(Image.open(io.BytesIO(data)))
    assert real and img.shape == (128, 128, 3) and img.std() > 10  # snapped up to 128, a real picture
    assert thumbs.get("s3://thumbs/photos/a.jpg", 0, (80.0, 80.0, 90.0, 90.0), 128) == (data, True)
    gone, real = thumbs.get("s3://thumbs/photos/missing.jpg", 0, (0.0, 0.0, 10.0, 10.0), 64)
    assert not real and Image.open(io.BytesIO(gone)).size == (64, 64)
    (tmp_path / "bad.jpg").write_bytes(b"not a photo")
    assert thumbs.get(str(tmp_path / "bad.jpg"), 0, None, 64)[1] is False
    assert thumbs.stats()["hits"] == 1 and thumbs.stats()["failures"] == 2
