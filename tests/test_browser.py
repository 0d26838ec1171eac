"""The comparison page in a real headless Chromium (Debian's chromium + chromium-driver, which `make test`
installs): a user opens their personal link, makes 10 comparisons by clicking, and the page then reports their
own model active (fitted live by the server); with onboarding pairs, the page asks those first."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from prlhf.data.store import ComparisonStore
from prlhf.runs.directory import load_run
from prlhf.serve.app import Limits, PersonalizedServer
from serve_helpers import running, train_tiny_runs

pytestmark = pytest.mark.slow
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and DRIVER) and not os.environ.get("PRLHF_REQUIRE_BROWSER"):
    pytest.skip("chromium and chromedriver are not installed (`make test` installs them)", allow_module_level=True)


@pytest.fixture()
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start. The rest keep it off the network
    # (this machine's is closed: it would try Google's hosts at every start) and out of any earlier profile.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_ten_comparisons_by_clicking_activate_the_users_own_model(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    run_dir = train_tiny_runs(tmp_path, names=("policy",))["policy"]
    store = ComparisonStore(f"sqlite:///{tmp_path}/feedback.db")
    token = store.invite("dana")
    server = PersonalizedServer(load_run(run_dir), "tiny", Limits(max_prompt_tokens=64, max_tokens=24),
                                reload_interval=None, store=store, api_keys=["sk-admin"], onboard_after=10)
    wait = WebDriverWait(browser, 60)
    with running(server) as url:
        browser.get(f"{url}/ui?token={token}")
        wait.until(lambda b: b.find_element(By.ID, "who").get_attribute("data-model") == "generic")
        for i in range(10):
            prompt = browser.find_element(By.ID, "prompt")
            prompt.clear()
            prompt.send_keys(f"Write a short note about item {i}.")
            browser.find_element(By.ID, "ask").click()
            wait.until(lambda b: b.find_element(By.ID, "choose-left").is_displayed())
            assert browser.find_element(By.ID, "left").text != "" or browser.find_element(By.ID, "right").text
            browser.find_element(By.ID, "choose-left" if i % 2 else "choose-right").click()
            wait.until(lambda b, n=i + 1: b.find_element(By.ID, "who").get_attribute("data-comparisons") == str(n))
        started = time.monotonic()
        wait.until(lambda b: b.find_element(By.ID, "who").get_attribute("data-model") == "active")
        shown = browser.find_element(By.ID, "who").text
    store.close()
    assert "Your own model is active" in shown and "10 comparison(s)" in shown
    assert "dana" in load_run(run_dir).registry and time.monotonic() - started < 60
    assert server.onboarding.fitted["dana"]["pairs"] == 10


def test_onboarding_pairs_come_first_then_the_users_own_prompts(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from prlhf.train.onboard_pairs import OnboardPair

    run_dir = train_tiny_runs(tmp_path, names=("policy",))["policy"]
    store = ComparisonStore(f"sqlite:///{tmp_path}/feedback.db")
    token = store.invite("erin")
    pairs = [OnboardPair(f"Write a note about topic {i}.", f"Dear all, topic {i}.", f"hey, {i}", 0.5)
             for i in range(3)]
    server = PersonalizedServer(load_run(run_dir), "tiny", Limits(max_prompt_tokens=64, max_tokens=24),
                                reload_interval=None, store=store, onboard_after=3, onboard_pairs=pairs)
    wait = WebDriverWait(browser, 60)
    with running(server) as url:
        browser.get(f"{url}/ui?token={token}")
        for i in range(3):
            wait.until(lambda b, n=i + 1: b.find_element(By.ID, "status").get_attribute("data-onboarding") == str(n))
            assert f"Question {i + 1} of 3" in browser.find_element(By.ID, "status").text
            assert not browser.find_element(By.ID, "ask").is_displayed()  # the server's pairs first
            assert browser.find_element(By.ID, "prompt").get_attribute("value") == pairs[i].prompt
            shown = {browser.find_element(By.ID, side).text for side in ("left", "right")}
            assert shown == {pairs[i].response_a, pairs[i].response_b}
            browser.find_element(By.ID, "choose-left").click()
        wait.until(lambda b: b.find_element(By.ID, "who").get_attribute("data-model") == "active")
        wait.until(lambda b: b.find_element(By.ID, "ask").is_displayed())  # now their own prompts
    store.close()
    assert server.onboarding.fitted["erin"]["pairs"] == 3
    store = ComparisonStore(f"sqlite:///{tmp_path}/feedback.db")
    assert {c.prompt for c in store.of_user("erin")} == {p.prompt for p in pairs}
    store.close()
