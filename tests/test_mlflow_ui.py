"""The MLflow UI shows a search: the session's smoke search (conftest.py), ``mlflow server`` on
loopback, headless Chromium.

Opens the experiment page (the search's parent run expanded to its trial runs, with a param and
metric column added through the UI's column picker), the compare view of the trial runs and the
parent run's report artifact, and checks that the trial runs show their params and metrics.
Screenshots go to the test's tmp dir; with LPT_UPDATE_DOCS_SCREENSHOT=1 the experiment page is
copied to docs/img/ for docs/reports.md.
Needs Debian's chromium and chromium-driver (scripts/system-deps.sh installs them) and selenium;
nothing is downloaded (Selenium is pointed at /usr/bin/chromedriver, so Selenium Manager never runs).
"""

import json
import math
import os
import shutil
import sys
import time
import urllib.parse
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from cluster_fixtures import Proc, free_port, wait_http
from smoke_search import TRIALS as SMOKE_TRIALS
from smoke_search import runs_of, search_env

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
DOCS_SHOT = ROOT / "docs" / "img" / "mlflow-trial-runs.png"
pytestmark = pytest.mark.slow


def need_browser():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.skip(
            f"{' and '.join(missing)} missing: install Debian's chromium and chromium-driver "
            f"(scripts/system-deps.sh does it when run as root)"
        )
    pytest.importorskip("selenium", reason="selenium is not installed (it is in the project's test extra)")


@pytest.fixture
def smoke(request):
    """The session's shared smoke search (conftest.py); read only."""
    need_browser()  # before the minutes of training
    search = request.getfixturevalue("smoke_search")
    assert search.returncode == 0, search.stderr[-3000:]
    return search


@pytest.fixture
def mlflow_server(smoke, tmp_path):
    port = free_port()
    server = Proc(
        "mlflow server",
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            smoke.tracking_uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        search_env(),
        tmp_path / "mlflow-server.log",
        cwd=tmp_path,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/health", 180, server)
        yield base
    finally:
        server.stop(grace_s=30)  # the server's own session: uvicorn and its worker


@pytest.fixture
def browser(tmp_path):
    need_browser()
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    def start(attempt: int):
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for arg in (
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1700,1000",
            f"--user-data-dir={tmp_path / f'chromium-profile-{attempt}'}",
        ):  # a fresh profile
            options.add_argument(arg)
        return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)

    try:
        driver = start(0)
    except WebDriverException:  # a slow start on a loaded machine: once more
        time.sleep(5)
        driver = start(1)
    driver.set_page_load_timeout(120)
    driver.shot_dir = tmp_path
    try:
        yield driver
    finally:
        driver.quit()


def page_text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def wait_for(driver, ready, what: str, timeout: float = 120):
    """Poll until ``ready(driver)`` is truthy (the SPA renders after its API calls)."""
    deadline = time.time() + timeout
    while True:
        try:
            value = ready(driver)
        except Exception:  # an element re-rendered under us: try again
            value = None
        if value:
            return value
        if time.time() > deadline:
            if getattr(driver, "shot_dir", None):
                driver.save_screenshot(str(driver.shot_dir / "timeout.png"))
            raise AssertionError(
                f"the MLflow UI did not show {what} in {timeout:.0f} s; page text:\n{page_text(driver)[:12000]}"
            )
        time.sleep(0.5)


def click_text(driver, text: str, tag: str = "*"):
    from selenium.webdriver.common.by import By

    el = wait_for(
        driver,
        lambda d: next(
            (e for e in d.find_elements(By.XPATH, f"//{tag}[normalize-space(.)='{text}']") if e.is_displayed()), None
        ),
        f"'{text}'",
        30,
    )
    el.click()
    return el


def close_assistant(driver):
    """The UI's assistant side panel takes a third of the window; close it when it is there."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label=Close]"):
        if button.is_displayed():
            button.click()


def table_rows(driver) -> dict[str, dict[str, str]]:
    """Experiment page: {run name: {column id: cell text}} over the grid's pinned and scrolled parts."""
    from selenium.webdriver.common.by import By

    rows: dict[str, dict[str, str]] = {}
    for row in driver.find_elements(By.CSS_SELECTOR, "div.ag-row"):
        cells = rows.setdefault(row.get_attribute("row-index"), {})
        for cell in row.find_elements(By.CSS_SELECTOR, "[role=gridcell]"):
            cells[cell.get_attribute("col-id") or ""] = cell.text.strip()
    named = {}
    for cells in rows.values():
        name = next((line for t in cells.values() for line in t.splitlines() if line.startswith("trial-")), None)
        if name:
            named[name] = cells
    return named


COMPARE_METRIC_JS = """
const name = arguments[0];
const own = el => [...el.childNodes].filter(n => n.nodeType === 3).map(n => n.textContent).join('').trim();
const label = [...document.querySelectorAll('.ReactVirtualized__Grid a, .ReactVirtualized__Grid div')].find(el => own(el) === name);
if (!label) return null;
const cell = label.closest('.ReactVirtualized__Grid__innerScrollContainer > *');
const section = cell.closest('.du-bois-light-collapse-content') || document;
return [...section.querySelectorAll('.ReactVirtualized__Grid__innerScrollContainer > *')]
  .filter(c => c.style.top === cell.style.top && c !== cell).map(c => c.textContent.trim());
"""
# The compare view's metric table is virtualized: only the rows in view exist. A trial run holds
# MLflow's system/* metrics too, which sort before val_*, so a row may be out of view: scroll on.
# The names and the values are separate grids of one section: they scroll together, to one offset
# (scrolled each by its own height, they drift apart and a name's row never meets its values).
SCROLL_GRIDS_JS = """
const sections = [...document.querySelectorAll('.du-bois-light-collapse-content')];
(sections.length ? sections : [document.body]).forEach(section => {
  const grids = [...section.querySelectorAll('.ReactVirtualized__Grid')];
  if (!grids.length) return;
  const end = Math.max(...grids.map(g => g.scrollHeight - g.clientHeight));
  const step = Math.max(1, Math.min(...grids.map(g => g.clientHeight)) / 2);
  const top = grids[0].scrollTop + step > end ? 0 : grids[0].scrollTop + step;
  grids.forEach(g => { g.scrollTop = top; });
});
"""


def compare_metric(driver, name: str):
    """The compare view's values of metric ``name``, or None while its row is not in view (then
    the metric grids scroll a step, so that polling finds it)."""
    found = driver.execute_script(COMPARE_METRIC_JS, name)
    if found is None:
        driver.execute_script(SCROLL_GRIDS_JS)
    return found


COMPARE_TABLE_JS = (
    "return [...document.querySelectorAll('tr')].map(tr => [...tr.children].map(td => td.textContent.trim()))"
)


def close(text: str, value: float) -> bool:
    try:
        shown = float(text)
    except ValueError:
        return False
    return math.isclose(shown, value, rel_tol=1e-3, abs_tol=0.006)


def shrink_png(src: Path, dst: Path, limit: int = 300_000) -> None:
    """Copy a screenshot, palette-quantised if it is over ``limit`` bytes."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    if dst.stat().st_size > limit:
        from PIL import Image

        Image.open(src).convert("RGB").quantize(colors=128).save(dst, optimize=True)
    assert dst.stat().st_size < limit


def test_mlflow_ui_shows_the_trial_runs_with_params_and_metrics(smoke, mlflow_server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    client = smoke.client()
    exp = client.get_experiment_by_name("prompt_pool").experiment_id
    parents = runs_of(client, "study")
    assert len(parents) == 1
    parent = parents[0]
    trials = {r.data.tags["lpt.trial_id"]: r for r in runs_of(client, "trial")}
    table = pq.read_table(Path(parent.data.tags["lpt.storage"]) / "trials.parquet").to_pylist()
    assert len(trials) == SMOKE_TRIALS == len(table)

    # 1. the experiment page, filtered to the search's trial runs (their parent is shown above them)
    search = urllib.parse.quote("tags.`lpt.role` = 'trial'")
    browser.get(f"{mlflow_server}/#/experiments/{exp}/runs?searchFilter={search}")
    wait_for(browser, lambda d: parent.info.run_name[:18] in page_text(d), "the search's parent run")
    close_assistant(browser)
    expand = wait_for(
        browser,
        lambda d: d.find_element(By.CSS_SELECTOR, "div.ag-row button[data-component-id*=runnamecellrenderer]"),
        "the parent's expander",
    )
    expand.click()
    wait_for(browser, lambda d: all(f"trial-{t}" in page_text(d) for t in trials), "the search's trial runs")
    click_text(browser, "Columns", "button")  # the column picker: hide three empty attributes, add params and metrics
    for column in (
        "Dataset",
        "Source",
        "Models",
        "pool_size",
        "top_k",
        "group_start",
        "val_acc",
        "val_many_acc",
        "val_medium_acc",
        "val_few_acc",
        "prompt_usage_entropy",
    ):
        click_text(browser, column, "span[contains(@class, 'tree-title')]")
    ActionChains(browser).send_keys(Keys.ESCAPE).perform()
    ActionChains(browser).move_to_element(browser.find_element(By.TAG_NAME, "body")).perform()  # no tooltip
    rows = wait_for(
        browser,
        lambda d: (
            lambda r: (
                r
                if len(r) == len(trials)
                and all(
                    any("val_acc" in k for k in cells) and any("pool_size" in k for k in cells) for cells in r.values()
                )
                else None
            )
        )(table_rows(d)),
        "the pool_size and val_acc columns",
    )
    for tid, run in trials.items():
        cells = rows[f"trial-{tid}"]
        pool = next(v for k, v in cells.items() if "pool_size" in k)
        acc = next(v for k, v in cells.items() if "val_acc" in k and "few" not in k)
        assert pool == run.data.params["pool_size"], (tid, cells)
        assert close(acc, run.data.metrics["val_acc"]), (tid, cells, run.data.metrics["val_acc"])
    time.sleep(1)  # let the last column settle before the picture
    browser.save_screenshot(str(tmp_path / "experiment-page.png"))
    # docs/reports.md's screenshot: refreshed only on request, so a test run leaves the tree clean
    shrink_png(
        tmp_path / "experiment-page.png",
        DOCS_SHOT if os.environ.get("LPT_UPDATE_DOCS_SCREENSHOT") == "1" else tmp_path / "docs-copy.png",
    )

    # 2. the compare view of the trial runs
    ids = [r.info.run_id for r in trials.values()]
    browser.get(
        f"{mlflow_server}/#/compare-runs?runs={urllib.parse.quote(json.dumps(ids))}"
        f"&experiments={urllib.parse.quote(json.dumps([exp]))}"
    )
    wait_for(
        browser,
        lambda d: "pool_size" in page_text(d) and compare_metric(d, "val_acc"),
        "the compare view's params and metrics",
    )
    tables = browser.execute_script(COMPARE_TABLE_JS)
    order = next(r[1:] for r in tables if r and r[0].startswith("Run ID"))
    assert sorted(order) == sorted(ids)
    accs = browser.execute_script(COMPARE_METRIC_JS, "val_acc")
    by_id = {r.info.run_id: r for r in trials.values()}
    for param in ("pool_size", "top_k", "group_start"):  # every searched parameter
        shown = next(r[1:] for r in tables if r and r[0] == param)
        assert shown == [by_id[run_id].data.params[param] for run_id in order], (param, shown)
    for run_id, acc in zip(order, accs):
        assert close(acc, by_id[run_id].data.metrics["val_acc"]), (run_id, acc)
    for constant in ("phase", "epoch"):  # not metrics: the compare plots would open on them
        assert all(constant not in r.data.metrics for r in trials.values()), constant
    assert all(f"trial-{t}" in page_text(browser) for t in trials)
    wait_for(
        browser,
        lambda d: d.execute_script("return document.querySelectorAll('.js-plotly-plot svg').length"),
        "the parallel coordinates plot",
        60,
    )
    browser.save_screenshot(str(tmp_path / "compare-runs.png"))

    # 3. the search report among the parent run's artifacts
    browser.get(f"{mlflow_server}/#/experiments/{exp}/runs/{parent.info.run_id}/artifactPath/report/summary.html")
    wait_for(
        browser,
        lambda d: "summary.html" in page_text(d) and "trials.csv" in page_text(d),
        "the parent's report artifacts",
    )
    frame = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "iframe"), "the summary's frame")
    browser.switch_to.frame(frame)
    best = parent.data.tags["lpt.best_trial_id"]
    wait_for(browser, lambda d: f"Best trial {best}" in page_text(d), "the rendered summary.html", 60)
    browser.switch_to.default_content()
    close_assistant(browser)
    browser.save_screenshot(str(tmp_path / "parent-report.png"))
    for name in ("experiment-page.png", "compare-runs.png", "parent-report.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
