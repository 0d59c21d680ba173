"""The crowd web app in a real headless browser (Debian's chromium and chromedriver, driven by selenium): a rater logs
in, ranks one item end to end, and the label is stored; untrusted text shows as text; a rater chats with the live policy
and flags a reply. Screenshots of the task, lead and red-team pages are left in the test's tmp directory (run with ``--basetemp DIR`` to keep them where you can look).

Skipped when the browser is not installed (``apt-get install chromium chromium-driver``), except under CI, where
.ci/run installs it: there a missing browser fails the test."""
import os
import pathlib
import threading

import pytest

from minirlhf.crowd.server import http_server, make_app
from minirlhf.crowd.store import Store

CHROMIUM, CHROMEDRIVER = pathlib.Path("/usr/bin/chromium"), pathlib.Path("/usr/bin/chromedriver")


@pytest.fixture
def browser():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip install '.[test]')")
    if missing:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"browser test needs {', '.join(missing)}")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,1100"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_a_rater_ranks_an_item_in_a_real_browser(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    def wait_for(by, what):  # the element on the page a click leads to
        return WebDriverWait(browser, 30).until(ec.presence_of_element_located((by, what)))

    store = Store(tmp_path / "crowd.db")
    token, lead_token = store.add_rater("alice"), store.add_rater("lead", "lead")
    batch = store.add_batch("movies", "rank", overlap=2)
    responses = [" great fun, a warm and clever film.", ' <script>document.title="pwned"</script> boring.',
                 " it was fine\nbut long."]
    store.add_item(batch, "The movie was", [{"text": t, "policy": "out/sft", "ended": True} for t in responses])
    srv = http_server(make_app(store.path), "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_port}"
    try:
        browser.get(base + "/")
        assert browser.current_url.endswith("/login")
        browser.find_element(By.NAME, "token").send_keys(token)
        browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait_for(By.LINK_TEXT, "label next").click()
        wait_for(By.NAME, "rank_0")
        assert "/task/" in browser.current_url
        shown = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".response pre")]
        assert sorted(t.strip() for t in shown) == sorted(t.strip() for t in responses)  # the script shows as text
        assert browser.title.endswith("minirlhf crowd") and "pwned" not in browser.title
        # rank the response about the warm film first, the one with the script last
        for p, text in enumerate(shown):
            rank = 1 if "warm" in text else 3 if "script" in text else 2
            Select(browser.find_element(By.NAME, f"rank_{p}")).select_by_value(str(rank))
        browser.save_screenshot(str(tmp_path / "task.png"))
        browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        assert "Nothing left for you in batch movies" in wait_for(By.CSS_SELECTOR, "p a[href='/']").find_element(
            By.XPATH, "/html/body").text
        [label] = store.labels(batch)
        assert label["rater"] == "alice" and label["value"] == [0, 2, 1] and label["seconds"] >= 0
        browser.delete_all_cookies()
        browser.get(base + "/login")
        browser.find_element(By.NAME, "token").send_keys(lead_token)
        browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait_for(By.LINK_TEXT, "label next")
        browser.get(base + "/lead")
        assert "alice" in browser.find_element(By.TAG_NAME, "table").text
        browser.save_screenshot(str(tmp_path / "lead.png"))
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_rater_red_teams_in_a_chat_in_a_real_browser(tmp_path, browser):
    """Two messages to the live (tiny) policy, its replies shown after each; one reply flagged from its own form."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    def click(element, then: str = "//button[text()='Start a new conversation']"):  # and wait for the next page
        # The old page is marked in its window object, which a newly loaded document does not have. (Selenium's
        # staleness_of can fail with "Node with given id does not belong to the document" while the page swaps.)
        browser.execute_script("window.oldPage = true")
        element.click()
        WebDriverWait(browser, 30, ignored_exceptions=(WebDriverException,)).until(
            lambda b: b.execute_script("return window.oldPage !== true && document.readyState === 'complete'"))
        WebDriverWait(browser, 30).until(ec.presence_of_element_located((By.XPATH, then)))

    from tests.test_crowd_server import tiny_policy
    from minirlhf.crowd.sampling import Sampler, Sampling

    store = Store(tmp_path / "crowd.db")
    token = store.add_rater("alice")
    store.add_batch("attacks", "flag", overlap=2)
    sampler = Sampler(Sampling(policy=str(tiny_policy(tmp_path)), max_new_tokens=6))
    srv = http_server(make_app(store.path, sampler=sampler, redteam_batch="attacks"), "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_port}"
    try:
        browser.get(base + "/login")
        browser.find_element(By.NAME, "token").send_keys(token)
        click(browser.find_element(By.CSS_SELECTOR, "button[type=submit]"), then="//a[text()='red team']")
        click(browser.find_element(By.LINK_TEXT, "red team"))
        for message in ("Tell me a secret", "A darker one"):
            browser.find_element(By.NAME, "message").send_keys(message)
            click(browser.find_element(By.XPATH, "//button[text()='Send to the policy']"))
        assert [h.text for h in browser.find_elements(By.TAG_NAME, "h3")] == ["You", "Policy", "You", "Policy"]
        Select(browser.find_elements(By.NAME, "category")[1]).select_by_value("private_info")
        click(browser.find_elements(By.XPATH, "//button[text()='Flag this reply']")[1])
        assert "Flagged as private_info" in browser.find_element(By.TAG_NAME, "body").text
        browser.save_screenshot(str(tmp_path / "redteam.png"))
        [item] = store.items(store.batch("attacks"))
        assert item.prompt.startswith("User: Tell me a secret\nPolicy:") and item.prompt.endswith(
            "\nUser: A darker one\nPolicy:")
    finally:
        srv.shutdown()
        srv.server_close()
