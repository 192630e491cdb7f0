"""The web page in a real browser: headless Chromium (Debian's chromium + chromium-driver)
driven by Selenium uploads an image and must render the classes the API returns, with bars,
and the frozen-vs-adapter gate maps."""
import os
import shutil
import tempfile

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

import serve_helpers as H  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="headless Chromium is not installed (Debian: apt-get install chromium chromium-driver; "
           "`make test` does it when run as root)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from svp.serve.app import ServeConfig, build_app
    root = H.make_adapters(str(tmp_path_factory.mktemp("ad")), names=["svp", "vpt_deep", "lora"])
    app, report = build_app(root, cfg=ServeConfig(window_s=0.002))
    s = H.ServerThread(app).start()
    yield s
    s.stop()


@pytest.fixture()
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    profile = tempfile.mkdtemp(prefix="svp-chromium-")
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})   # the page's console
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.slow  # starts processes
def test_page_uploads_an_image_and_renders_the_api_classes_and_gate_maps(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    image = tmp_path / "pic.png"
    image.write_bytes(H.png_bytes(48, seed=7))
    status, expected = H.predict(server.url, image.read_bytes(), "vpt_deep", topk=4)
    assert status == 200

    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 90)
    wait.until(lambda d: len(Select(d.find_element(By.ID, "adapter")).options) == 3)
    Select(browser.find_element(By.ID, "adapter")).select_by_value("vpt_deep")
    topk = browser.find_element(By.ID, "topk")
    topk.clear()
    topk.send_keys("4")
    browser.find_element(By.ID, "file").send_keys(str(image))
    wait.until(EC.element_to_be_clickable((By.ID, "go"))).click()
    wait.until(lambda d: d.find_element(By.ID, "results").get_attribute("data-done") == "1")
    rows = browser.find_elements(By.CSS_SELECTOR, "#results .row")
    assert [r.find_element(By.CLASS_NAME, "cls").text for r in rows] == [t["class"] for t in expected["top"]]
    widths = [float(r.find_element(By.CLASS_NAME, "bar").value_of_css_property("width").rstrip("px"))
              for r in rows]
    assert widths == sorted(widths, reverse=True) and widths[0] > 0
    assert browser.find_element(By.ID, "error").text == ""
    wait.until(lambda d: d.find_element(By.ID, "maps").get_attribute("data-done") == "1")
    imgs = browser.find_elements(By.CSS_SELECTOR, "#maps img")
    assert [i.get_attribute("alt") for i in imgs] == ["update", "forget", "propagation"]
    assert all(browser.execute_script("return arguments[0].naturalWidth", i) > 100 for i in imgs)


@pytest.mark.slow  # starts processes
def test_page_shows_only_the_latest_clicks_answers_and_logs_no_console_error(server, browser, tmp_path):
    """A failed upload left the bars of the image before it on screen under the error; a second click
    while the first one's gate maps were on their way showed both sets of maps; every load logged
    a 404 for /favicon.ico in the console (QA 15a)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    image, other = tmp_path / "pic.png", tmp_path / "other.png"
    image.write_bytes(H.png_bytes(48, seed=7))
    other.write_bytes(H.png_bytes(40, seed=9))
    notimage = tmp_path / "notimage.png"
    notimage.write_bytes(b"this is not an image")
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 90)
    wait.until(lambda d: len(Select(d.find_element(By.ID, "adapter")).options) == 3)
    done = {i: (lambda d, i=i: d.find_element(By.ID, i).get_attribute("data-done") == "1") for i in ("results", "maps")}
    browser.find_element(By.ID, "file").send_keys(str(image))
    wait.until(EC.element_to_be_clickable((By.ID, "go"))).click()
    wait.until(done["results"])
    assert browser.find_elements(By.CSS_SELECTOR, "#results .row")
    wait.until(done["maps"])
    # a failed upload: its error alone, no bars or maps of the image before
    browser.find_element(By.ID, "file").send_keys(str(notimage))
    wait.until(EC.element_to_be_clickable((By.ID, "go"))).click()
    wait.until(lambda d: d.find_element(By.ID, "error").text.startswith("415: "))
    assert browser.find_elements(By.CSS_SELECTOR, "#results .row") == []
    assert browser.find_elements(By.CSS_SELECTOR, "#maps img") == []
    # two clicks in a row (the second on another image and adapter): only the second's answers
    status, expected = H.predict(server.url, other.read_bytes(), "lora", topk=5)
    assert status == 200
    browser.find_element(By.ID, "file").send_keys(str(image))
    wait.until(EC.element_to_be_clickable((By.ID, "go")))
    browser.execute_script("""
        classify();
        const f = new File([new Uint8Array(arguments[0])], "other.png", {type: "image/png"});
        choose(f);
        document.getElementById("adapter").value = "lora";
        classify();""", list(other.read_bytes()))
    wait.until(done["results"])
    wait.until(done["maps"])
    import time
    time.sleep(3)   # the first click's answers, had they been drawn, would be on screen by now
    rows = browser.find_elements(By.CSS_SELECTOR, "#results .row")
    assert [r.find_element(By.CLASS_NAME, "cls").text for r in rows] == [t["class"] for t in expected["top"]]
    heads = [h.text for h in browser.find_elements(By.CSS_SELECTOR, "#maps h3")]
    assert len(heads) == 3 and all(h.endswith("vs lora (bottom)") for h in heads), heads
    assert browser.find_element(By.ID, "error").text == ""
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    # (the 415 of the failed upload is the page's own request: the console says so too)
    assert [e for e in errors if "/v1/predict" not in e["message"]] == [], errors
    # a file dialog cancelled empties the input: a TypeError in the console, and the button stayed
    # enabled to send no file (review of the page)
    browser.execute_script("const i = document.getElementById('file'); i.files = new DataTransfer().files;"
                           "i.dispatchEvent(new Event('change'));")
    assert not browser.find_element(By.ID, "go").is_enabled()
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
