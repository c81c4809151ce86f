#!/usr/bin/python3
"""Drives the imago console in headless Chromium during a real rolling update.

Run by tests/console.rs, which owns the deployment: this script loads the page, says `ready`
on stdout, waits for `applied` on stdin (the test has applied release 2 by then), and checks
what an operator would see: the rollout advancing and completing without a reload, then the
rollback button (through its confirmation dialog) making a release that completes too. It
also checks that the browser logged no error and that no page overflows sideways at a desktop
and at a phone size. Screenshots go to the directory given. Any failed check raises, which
exits non-zero with the reason on stderr.

usage: console_browser.py URL TOKEN SCREENSHOT_DIR
"""

import os
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

URL, TOKEN, SHOTS = sys.argv[1], sys.argv[2], sys.argv[3]
DESKTOP = (1280, 720)
PHONE = (390, 844)


def say(line):
    print(line, flush=True)


def log(line):
    print(line, file=sys.stderr, flush=True)


def wait_for(what, check, timeout=60.0):
    """Polls `check` every 50 ms until it returns something true; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except Exception as e:  # an element replaced while it was read: look again
            value = None
            last = e
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; page:\n{text('main')}")
        time.sleep(0.05)


def overview_row(name):
    """The overview's cells of service `name`, by column label, or None. Read in one script,
    because the live page replaces its rows at any moment."""
    return driver.execute_script("""
        for (const row of document.querySelectorAll("#overview tbody tr")) {
          const cells = {};
          for (const td of row.querySelectorAll("td")) cells[td.dataset.label] = td.innerText.trim();
          if ((cells.Service || "").split(" ")[0] === arguments[0]) return cells;
        }
        return null;""", name)


def text(selector):
    """The rendered text of the first element `selector` matches, or "" (read atomically)."""
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.innerText.trim() : ''", selector)


def click(by, selector):
    """Clicks what `selector` finds, looking again if the live page replaced it meanwhile."""
    wait_for(f"{selector} to be clicked", lambda: driver.find_element(by, selector).click() or True)


def no_horizontal_overflow(where):
    for width, height in (DESKTOP, PHONE):
        driver.set_window_size(width, height)
        time.sleep(0.2)
        inner, scroll = driver.execute_script(
            "return [window.innerWidth, document.documentElement.scrollWidth]")
        driver.save_screenshot(os.path.join(SHOTS, f"{where}-{width}x{height}.png"))
        if scroll > inner:
            wide = driver.execute_script("""
                return [...document.querySelectorAll("body *")]
                  .filter(e => e.getBoundingClientRect().right > window.innerWidth)
                  .slice(-5).map(e => e.tagName + "." + e.className + ": " + e.textContent.slice(0, 40));""")
            raise AssertionError(f"{where} at {width}x{height}: {scroll} px wide in a {inner} px window; {wide}")
    driver.set_window_size(*DESKTOP)


def browser_errors():
    # Every instance launched on this host adds a veth interface, which Chromium takes for a
    # network change: it aborts the requests in flight (net::ERR_NETWORK_CHANGED) and the page
    # asks again at its next update. That is the host, not the page.
    entries = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    changed = [e for e in entries if "net::ERR_NETWORK_CHANGED" in e["message"]]
    if changed:
        log(f"{len(changed)} requests aborted by host network changes (instance veths)")
    return [e for e in entries if e not in changed]


options = webdriver.ChromeOptions()
options.binary_location = "/usr/bin/chromium"
for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--window-size={DESKTOP[0]},{DESKTOP[1]}", "--hide-scrollbars"):
    options.add_argument(arg)
options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
try:
    driver.set_window_size(*DESKTOP)
    driver.get(URL + "/#/")
    wait_for("release 1 complete on the overview",
             lambda: (r := overview_row("web")) and r["State"].startswith("complete") and "#1" in r["Release"])
    # The token, typed in as an operator would: the page keeps it for this tab only.
    driver.find_element(By.ID, "token").send_keys(TOKEN)
    click(By.CSS_SELECTOR, "#token-form button")
    wait_for("the live stream", lambda: text("#live") == "live")
    # Anything that reloads the page drops this.
    driver.execute_script("window.imagoTestMarker = 'not reloaded'")
    no_horizontal_overflow("overview")

    say("ready")
    assert sys.stdin.readline().strip() == "applied", "the test did not apply release 2"

    # The rollout, as the overview shows it live: release 2 rolling out, its ready count rising.
    wait_for("release 2 rolling out",
             lambda: (r := overview_row("web")) and "#2" in r["Release"] and r["State"].startswith("rolling out"))
    driver.save_screenshot(os.path.join(SHOTS, "overview-rollout.png"))
    readies = []
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline, f"the overview's ready count went {readies}, never 1 / 3"
        row = overview_row("web")
        if row and row["Ready"] and (not readies or readies[-1] != row["Ready"].split("\n")[0]):
            readies.append(row["Ready"].split("\n")[0])
            log(f"overview: ready {readies[-1]}, {row['State']}")
            if readies[-1] == "1 / 3":
                break
        time.sleep(0.05)
    # The service page, reached by its link, during the same rollout.
    click(By.LINK_TEXT, "web")
    wait_for("the service page", lambda: text("h1").startswith("Service web"))
    wait_for("instances of release 2 on the service page",
             lambda: "#2" in text("main table"))
    # The rollout drawn over time: old lanes, at least one new one, and its first wave.
    wait_for("the rollout drawing with a new instance", lambda: driver.execute_script(
        "return document.querySelectorAll('#rollout .lane-new').length >= 1"
        " && document.querySelectorAll('#rollout .lane-old').length === 3"))
    assert "wave 1" in driver.execute_script(
        "return document.querySelector('#rollout svg').textContent"), "no wave on the drawing"
    driver.save_screenshot(os.path.join(SHOTS, "service-rollout.png"))
    # A left-out part of the page must not show as the word "null" (it once did).
    assert "null" not in text("main"), text("main")
    no_horizontal_overflow("service-rollout")
    seen = set()
    def service_complete():
        heading = text("h1")
        summary = text("#summary")
        seen.add(summary)
        return heading.endswith("complete") and summary.startswith("Ready 3 of 3") and \
            "#2" in text("#releases tr.current")
    wait_for("release 2 complete on the service page", service_complete)
    # Drawn whole: three new instances ready, three old ones retired and stopped, each lane
    # reachable with the keyboard and saying what happened to it.
    def drawn_whole():
        lanes = driver.execute_script("""
            return [...document.querySelectorAll('#rollout .lane')].map(g =>
              [g.classList.contains('lane-new'), g.getAttribute('tabindex'), g.getAttribute('aria-label')]);""")
        new = [l for l in lanes if l[0]]
        old = [l for l in lanes if not l[0]]
        return len(new) == 3 and len(old) == 3 and all("stopped at" in l[2] for l in old) \
            and all("ready at" in l[2] for l in new) and all(l[1] == "0" for l in lanes)
    wait_for("the whole rollout drawn", drawn_whole)
    driver.find_element(By.CSS_SELECTOR, "#rollout .lane").send_keys("")  # focusable
    assert driver.execute_script(
        "return document.activeElement.classList.contains('lane')"), "a lane does not take focus"
    log(f"service page summaries seen: {sorted(seen)}")
    assert any(s.startswith("Ready 1 of 3") or s.startswith("Ready 2 of 3") for s in seen), \
        f"the rollout never showed as partly done: {seen}"

    # Rollback through the page: the button, its confirmation dialog, then a new release.
    click(By.XPATH, "//button[normalize-space()='Roll back']")
    wait_for("the confirmation dialog", lambda: driver.execute_script(
        "return document.getElementById('confirm').open"))
    assert "Roll web back" in text("#confirm"), text("#confirm")
    click(By.ID, "confirm-ok")
    notice = wait_for("the rollback's answer", lambda: text("#action-result"))
    assert "Release #3 restores #1" in notice, notice
    wait_for("release 3 complete on the service page",
             lambda: text("h1").endswith("complete")
             and "#3" in text("#releases tr.current")
             and text("#summary").startswith("Ready 3 of 3"))
    driver.save_screenshot(os.path.join(SHOTS, "service-rolled-back.png"))

    # Pause and resume, each through its confirmation; the page shows the pause live.
    click(By.XPATH, "//button[normalize-space()='Pause rollouts']")
    wait_for("the pause dialog", lambda: driver.execute_script("return document.getElementById('confirm').open"))
    click(By.ID, "confirm-ok")
    wait_for("the paused pill", lambda: text("#paused") == "paused" and "Rollouts paused." in text("#action-result"))
    click(By.XPATH, "//button[normalize-space()='Resume rollouts']")
    wait_for("the resume dialog", lambda: driver.execute_script("return document.getElementById('confirm').open"))
    click(By.ID, "confirm-ok")
    wait_for("the pause to end", lambda: text("#paused") == "" and "Rollouts resumed." in text("#action-result"))
    # Restart: a new release of the same image and configuration, rolled out to completion.
    click(By.XPATH, "//button[normalize-space()='Restart']")
    wait_for("the restart dialog", lambda: driver.execute_script("return document.getElementById('confirm').open"))
    assert "Restart web?" in text("#confirm"), text("#confirm")
    click(By.ID, "confirm-ok")
    wait_for("the restart's answer", lambda: "Release #4 restarts every instance" in text("#action-result"))
    wait_for("release 4 complete on the service page",
             lambda: text("h1").endswith("complete")
             and "#4" in text("#releases tr.current")
             and text("#summary").startswith("Ready 3 of 3"))

    click(By.LINK_TEXT, "Events")
    wait_for("the event log", lambda: "rollback to release 1" in text("main"))
    no_horizontal_overflow("events")
    click(By.LINK_TEXT, "Services")
    wait_for("the overview at release 4",
             lambda: (r := overview_row("web")) and "#4" in r["Release"] and r["State"].startswith("complete"))

    marker = driver.execute_script("return window.imagoTestMarker")
    assert marker == "not reloaded", "the page was reloaded"
    errors = browser_errors()
    assert not errors, f"the browser logged errors: {errors}"
    say("ok")
finally:
    driver.quit()
