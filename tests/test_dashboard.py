"""The web dashboard: mounted in a host app, its actions and protections, and in a browser."""

from __future__ import annotations

import base64
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tasklib_sqla import TaskRegistry, pause_queue, set_limit, submit_task
from tasklib_sqla.dashboard import CSRF_COOKIE, Dashboard
from tasklib_sqla.testing import TaskQueue, TestDatabase
from tests import tasks as t

ROOT = Path(__file__).resolve().parents[1]
XSS = "<script>alert(1)</script><img src=x onerror=alert(2)>"


@pytest.fixture
def tasklib_registry() -> TaskRegistry:
    return t.registry


@pytest.fixture
def seeded(tasklib: TaskQueue) -> TaskQueue:
    """One failed task whose arguments hold a script, one completed task."""

    async def seed() -> None:
        await submit_task(t.always_fails, message=XSS)
        await submit_task(t.add, a=1)
        await tasklib.arun(check=False)

    import asyncio

    asyncio.run(seed())
    return tasklib


def _client(url: str, **options: object) -> Iterator[TestClient]:
    host = FastAPI()
    dash = Dashboard(url, **options)  # type: ignore[arg-type]
    host.mount("/admin/tasks", dash)
    with TestClient(host) as client:
        yield client
    # The client's event loop has closed: its connections closed with it (LoopEngines).


@pytest.fixture
def client(seeded: TaskQueue, tasklib_database: TestDatabase) -> Iterator[TestClient]:
    yield from _client(tasklib_database.url)


def _failed_id(seeded: TaskQueue) -> str:
    return str(seeded.assert_submitted(t.always_fails).id)


def test_pages_render_mounted_in_a_host_app(client: TestClient, seeded: TaskQueue) -> None:
    page = client.get("/admin/tasks/")
    assert page.status_code == 200
    assert "default" in page.text and "Queues" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert 'href="/admin/tasks/tasks?queue=default&amp;state=failed"' in page.text
    listing = client.get("/admin/tasks/tasks", params={"state": "failed"})
    assert "tests.fail" in listing.text and "tests.add" not in listing.text
    assert client.get("/admin/tasks/workers").status_code == 200
    assert client.get("/admin/tasks/tasks/nope").status_code == 400
    missing = client.get("/admin/tasks/tasks/00000000-0000-0000-0000-000000000000")
    assert missing.status_code == 404


def test_sampled_counts_are_marked(
    client: TestClient, seeded: TaskQueue, tasklib_database: TestDatabase, monkeypatch: Any
) -> None:
    """A table above the exact limit shows its finished counts as estimates."""
    import asyncio

    import asyncpg

    from tasklib_sqla import admin

    async def analyze() -> None:
        conn = await asyncpg.connect(tasklib_database.url.replace("+asyncpg", ""))
        await conn.execute("ANALYZE tasks")
        await conn.close()

    asyncio.run(analyze())
    assert "estimated from a sample" not in client.get("/admin/tasks/").text
    monkeypatch.setattr(admin, "EXACT_LIMIT", 1)  # the seeded table's 2 rows are "large"
    page = client.get("/admin/tasks/").text
    assert "estimated from a sample" in page
    assert 'state=failed">~1</a>' in page and 'state=pending">0</a>' in page


def test_paused_queues_and_limits_are_shown(client: TestClient, seeded: TaskQueue) -> None:
    async def steer() -> None:
        await pause_queue("mail")
        await set_limit(queue="payments", concurrency=5)
        await set_limit(name=XSS, rate=100, per=60)

    import asyncio

    asyncio.run(steer())
    page = client.get("/admin/tasks/").text
    assert "<h2>Paused queues</h2>" in page and "<li>mail</li>" in page
    assert "<td>payments</td><td class=n>5</td><td class=n>0</td><td>-</td>" in page
    assert "<td>100 / 60 s</td>" in page
    assert XSS not in page and "&lt;script&gt;" in page


def test_task_data_is_shown_as_text(client: TestClient, seeded: TaskQueue) -> None:
    page = client.get(f"/admin/tasks/tasks/{_failed_id(seeded)}")
    assert XSS not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=alert(2)&gt;" in page.text
    assert "<script" not in page.text.lower() and "<img" not in page.text.lower()
    assert "attempt 3" in page.text  # the attempt timeline


def _token(client: TestClient) -> str:
    client.get("/admin/tasks/")
    token = client.cookies.get(CSRF_COOKIE)
    assert token
    return token


def test_actions_need_the_csrf_token(client: TestClient, seeded: TaskQueue) -> None:
    task_id = _failed_id(seeded)
    url = f"/admin/tasks/tasks/{task_id}/retry"
    token = _token(client)
    assert client.post(url, data={}).status_code == 403
    assert client.post(url, data={"csrf": "forged"}).status_code == 403
    assert seeded.assert_submitted(t.always_fails).state == "failed"
    done = client.post(url, data={"csrf": token}, follow_redirects=False)
    assert done.status_code == 303
    assert done.headers["location"].startswith(f"/admin/tasks/tasks/{task_id}?note=retry")
    assert seeded.assert_submitted(t.always_fails).state == "pending"
    cancel = client.post(f"/admin/tasks/tasks/{task_id}/cancel", data={"csrf": token})
    assert cancel.status_code == 200 and "cancel: done" in cancel.text
    assert seeded.assert_submitted(t.always_fails).state == "cancelled"
    # Nothing to purge yet (the finished tasks are new), but the purge runs.
    purged = client.post("/admin/tasks/purge", data={"csrf": token, "older_than": "1d"})
    assert "purged 0 tasks" in purged.text
    assert client.get("/admin/tasks/purge").status_code == 404  # never by GET


def test_read_only_mode_has_no_actions(seeded: TaskQueue, tasklib_database: TestDatabase) -> None:
    for client in _client(tasklib_database.url, read_only=True):
        page = client.get(f"/admin/tasks/tasks/{_failed_id(seeded)}")
        assert "<form method=post" not in page.text and "read-only" in page.text
        token = _token(client)
        post = client.post(f"/admin/tasks/tasks/{_failed_id(seeded)}/retry", data={"csrf": token})
        assert post.status_code == 403
    assert seeded.assert_submitted(t.always_fails).state == "failed"


def test_a_password_guards_the_standalone_dashboard(
    seeded: TaskQueue, tasklib_database: TestDatabase
) -> None:
    for client in _client(tasklib_database.url, password="s3cret"):
        assert client.get("/admin/tasks/").status_code == 401
        bad = base64.b64encode(b"admin:wrong").decode()
        assert (
            client.get("/admin/tasks/", headers={"authorization": f"Basic {bad}"}).status_code
            == 401
        )
        good = base64.b64encode(b"admin:s3cret").decode()
        assert (
            client.get("/admin/tasks/", headers={"authorization": f"Basic {good}"}).status_code
            == 200
        )


# -- in a real browser -------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def served(seeded: TaskQueue, tasklib_database: TestDatabase) -> Iterator[str]:
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            Dashboard(tasklib_database.url), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def browser() -> Iterator[object]:
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("TASKLIB_REQUIRE_BROWSER"):  # set by .ci/run, which installs them
            pytest.fail("the browser tests need chromium and chromedriver (chromium-driver)")
        pytest.skip("no chromium/chromedriver on this machine (apt-get install chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_in_a_browser_filter_open_and_retry(
    served: str, browser: object, seeded: TaskQueue
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    assert isinstance(browser, WebDriver)
    shots = os.environ.get("TASKLIB_SCREENSHOTS")  # docs/img, when refreshing the docs
    browser.get(served + "/")
    assert "Overview" in browser.title
    assert browser.find_element(By.TAG_NAME, "svg")  # the per-minute chart
    if shots:
        browser.save_screenshot(f"{shots}/dashboard-overview.png")

    # Each click loads a new page: wait for it, not for the old page's elements.
    wait = WebDriverWait(browser, 15)
    browser.find_element(By.LINK_TEXT, "Tasks").click()
    wait.until(EC.title_contains("Tasks"))
    Select(browser.find_element(By.NAME, "state")).select_by_visible_text("failed")
    browser.find_element(By.XPATH, "//button[text()='Filter']").click()
    wait.until(EC.url_contains("state=failed"))
    rows = browser.find_elements(By.CSS_SELECTOR, "table tr td:nth-child(2)")
    assert [r.text for r in rows] == ["tests.fail"]
    if shots:
        browser.save_screenshot(f"{shots}/dashboard-tasks.png")

    browser.find_element(By.CSS_SELECTOR, "table tr td a").click()
    wait.until(EC.title_contains("Task tests.fail"))
    args = browser.find_elements(By.TAG_NAME, "pre")[0].text
    assert XSS in args  # the script is text on the page...
    # ...and nothing of it became part of the page.
    assert browser.execute_script("return document.scripts.length + document.images.length") == 0
    assert re.search(r"state\s+failed", browser.find_element(By.TAG_NAME, "table").text)
    if shots:
        browser.save_screenshot(f"{shots}/dashboard-task.png")

    browser.find_element(By.XPATH, "//button[text()='Retry']").click()
    wait.until(EC.url_contains("note=retry"))
    assert "retry: done" in browser.find_element(By.CLASS_NAME, "note").text
    assert re.search(r"state\s+pending", browser.find_element(By.TAG_NAME, "table").text)
    assert seeded.assert_submitted(t.always_fails).state == "pending"


@pytest.mark.slow
def test_the_dashboard_command(tasklib_database: TestDatabase, tasklib: TaskQueue) -> None:
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    port = _free_port()
    env = {
        **os.environ,
        "TASKLIB_DATABASE_URL": tasklib_database.url,
        "TASKLIB_DASHBOARD_PASSWORD": "pw",
    }
    cmd = [sys.executable, "-m", "tasklib_sqla", "dashboard", "--port", str(port), "--read-only"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
            except urllib.error.HTTPError as exc:
                assert exc.code == 401  # up, and asking for the password
                break
            except OSError:
                assert time.monotonic() < deadline, "the dashboard did not start"
                time.sleep(0.1)
        auth = base64.b64encode(b"ops:pw").decode()
        page = urllib.request.urlopen(
            urllib.request.Request(url, headers={"Authorization": f"Basic {auth}"}), timeout=5
        )
        assert page.status == 200 and "read-only" in page.read().decode()
    finally:
        proc.terminate()
        proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()
