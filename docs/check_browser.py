"""Opens the built site in headless Chromium and checks that pages really render.

Usage::

    apt-get install -y chromium chromium-driver     # Debian's browser and its WebDriver
    pip install -e ".[docs,browser]"
    python -m sphinx -W --keep-going -b html docs docs/_build/html
    python docs/check_browser.py                    # or: python docs/check_browser.py SITE_DIR

It serves the site on 127.0.0.1 (a free port, nothing else is contacted), opens

* the index page — it has the page title and the navigation sidebar;
* the API page of ``jaxbn.batch_norm`` — MathJax typeset its ``.. math::`` formula (there are
  ``mjx-container`` elements and no raw ``\\frac`` left in the text);
* every notebook page — it opens with its title (no code cell above it) and its display
  math does not scroll sideways;
* the getting-started page — its install block does not scroll sideways;
* a notebook page — its math is typeset and every ``<img>`` loaded (``naturalWidth > 0``);
* the search page with ``?q=batch_norm`` — the search index loaded and found results;

and saves a screenshot of each to ``docs/_build/screenshots/<name>.png`` (``index``,
``api_batch_norm``, ``notebook_01`` ... (one per notebook), ``getting_started``,
``notebook``, ``notebook_plot``: the first plot, ``search``). Exit status 1 with
one line per failed check.
"""

from __future__ import annotations

import functools
import glob
import http.server
import os
import sys
import threading
import time
from typing import Callable, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))


class _Server(http.server.ThreadingHTTPServer):

  def handle_error(self, request, client_address):
    # The browser cancels requests it no longer needs (a page left before all its assets
    # arrived): a broken pipe is expected, not an error of the site.
    if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
      super().handle_error(request, client_address)


def _serve(site: str) -> Tuple[http.server.ThreadingHTTPServer, str]:
  handler = functools.partial(_QuietHandler, directory=site)
  server = _Server(("127.0.0.1", 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server, f"http://127.0.0.1:{server.server_address[1]}"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):

  def log_message(self, *args):  # keep the check's output readable
    pass


def _driver():
  try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
  except ImportError:
    raise SystemExit('check_browser: selenium is missing; pip install -e ".[browser]"')
  opts = webdriver.ChromeOptions()
  for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1280,1000", "--hide-scrollbars"):
    opts.add_argument(arg)
  for binary in ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"):
    if os.path.exists(binary):
      opts.binary_location = binary
      break
  driver_path = next((p for p in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
                      if os.path.exists(p)), None)
  if driver_path is None:
    raise SystemExit("check_browser: no chromedriver found; apt-get install -y chromium-driver")
  return webdriver.Chrome(service=Service(driver_path), options=opts)


def _wait(driver, predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
  end = time.time() + timeout
  while time.time() < end:
    try:
      if predicate():
        return True
    except Exception:  # the page is still loading
      pass
    time.sleep(0.2)
  return False


# Elements of the page body that scroll sideways (wider content than their box).
SIDEWAYS = """return Array.from(document.querySelectorAll(arguments[0]))
  .filter(e => e.clientWidth > 0 && e.scrollWidth > e.clientWidth + 1)
  .map(e => (e.innerText || '').trim().split('\\n')[0].slice(0, 40))"""
DISPLAY_MATH = "article mjx-container[display='true'], article div.math, article .math-wrapper"
# Code cells or code blocks placed above the page title.
ABOVE_TITLE = """const h1 = document.querySelector('article h1');
  if (!h1) return -1;
  return Array.from(document.querySelectorAll('article div.cell'))
    .filter(c => h1.compareDocumentPosition(c) & Node.DOCUMENT_POSITION_PRECEDING).length"""

MATH_DONE = ("return !!(window.MathJax && MathJax.startup && MathJax.startup.promise && "
             "document.querySelectorAll('mjx-container').length > 0)")


def _page_checks(driver, base: str, site: str,
                 shot: Callable[[str], object]) -> List[Tuple[str, str, List[str]]]:
  """Visits each page, screenshots it after its checks; returns (name, url, failures)."""
  results = []

  def visit(name: str, path: str) -> List[str]:
    driver.get(f"{base}/{path}")
    _wait(driver, lambda: driver.execute_script("return document.readyState") == "complete")
    return []

  # 1. Index.
  fails = visit("index", "index.html")
  if "jaxbn" not in driver.title:
    fails.append(f"title is {driver.title!r}, expected it to contain 'jaxbn'")
  if not driver.execute_script("return document.querySelectorAll('.sidebar-tree a').length"):
    fails.append("no navigation links in the sidebar")
  shot("index")
  results.append(("index", "index.html", fails))

  # 2. An API page with math.
  api = "_generated/api/generated/jaxbn.batch_norm.html"
  fails = visit("api_batch_norm", api)
  if not driver.execute_script("return document.querySelectorAll('dl.py.function').length"):
    fails.append("no function signature rendered (autodoc)")
  if not _wait(driver, lambda: driver.execute_script(MATH_DONE)):
    fails.append("MathJax typeset no formula (no mjx-container)")
  elif "\\frac" in driver.execute_script("return document.body.innerText") or "\\sqrt" in \
      driver.execute_script("return document.body.innerText"):
    fails.append("raw LaTeX left in the page text")
  shot("api_batch_norm")
  results.append(("api_batch_norm", api, fails))

  # 3. The notebook pages: each opens with its title (no code above it), and its display
  # math fits the page; the first is checked in full below.
  nbs = sorted(glob.glob(os.path.join(site, "_generated", "notebooks", "*.html")))
  for page in nbs:
    nb = os.path.relpath(page, site)
    name = "notebook_" + os.path.basename(page)[:2]
    fails = visit(name, nb)
    above = driver.execute_script(ABOVE_TITLE)
    if above:
      fails.append("no title" if above < 0 else f"{above} code cell(s) above the title")
    if _wait(driver, lambda: driver.execute_script(MATH_DONE), timeout=5):
      wide = driver.execute_script(SIDEWAYS, DISPLAY_MATH)
      if wide:
        fails.append(f"display math scrolls sideways: {wide}")
    shot(name)
    results.append((name, nb, fails))

  # 4. Getting started: the install block fits the page (no sideways scroll).
  fails = visit("getting_started", "getting_started.html")
  wide = driver.execute_script(SIDEWAYS, "article section#install pre")
  if wide:
    fails.append(f"the install block scrolls sideways: {wide}")
  shot("getting_started")
  results.append(("getting_started", "getting_started.html", fails))

  # 5. A notebook page with plots and math.
  if not nbs:
    results.append(("notebook", "_generated/notebooks/", ["no notebook page was built"]))
  else:
    nb = os.path.relpath(nbs[0], site)
    fails = visit("notebook", nb)
    n_img = driver.execute_script("return document.images.length")
    if not n_img:
      fails.append("no images on the notebook page")
    ok = _wait(driver, lambda: driver.execute_script(
        "return Array.from(document.images).every(i => i.complete)"))
    broken = driver.execute_script(
        "return Array.from(document.images).filter(i => !(i.naturalWidth > 0))"
        ".map(i => i.getAttribute('src'))")
    if not ok or broken:
      fails.append(f"images not loaded: {broken}")
    if not _wait(driver, lambda: driver.execute_script(MATH_DONE)):
      fails.append("MathJax typeset no formula on the notebook page")
    shot("notebook")
    if n_img:  # and its first plot, scrolled into view
      driver.execute_script("document.images[0].scrollIntoView({block: 'center'})")
      time.sleep(0.3)
      shot("notebook_plot")
    results.append(("notebook", nb, fails))

  # 6. Search.
  fails = visit("search", "search.html?q=batch_norm")
  if not _wait(driver, lambda: driver.execute_script(
      "return document.querySelectorAll('#search-results li, ul.search li').length > 0")):
    fails.append("the search for 'batch_norm' showed no result (search index missing?)")
  shot("search")
  results.append(("search", "search.html?q=batch_norm", fails))
  return results


def main(argv: List[str]) -> int:
  site = os.path.abspath(argv[1] if len(argv) > 1 else os.path.join(HERE, "_build", "html"))
  if not os.path.exists(os.path.join(site, "index.html")):
    print(f"check_browser: no site at {site}; build it first (see this file's docstring)")
    return 1
  shots = os.path.join(HERE, "_build", "screenshots")
  os.makedirs(shots, exist_ok=True)
  server, base = _serve(site)
  driver = _driver()
  failures = 0
  try:
    shot = lambda name: driver.save_screenshot(os.path.join(shots, f"{name}.png"))
    for name, url, fails in _page_checks(driver, base, site, shot):
      status = "ok" if not fails else "FAILED: " + "; ".join(fails)
      print(f"{name:16s} {url}: {status}")
      failures += len(fails)
  finally:
    driver.quit()
    server.shutdown()
  print(f"check_browser: {failures} failed check(s); screenshots in {shots}")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
