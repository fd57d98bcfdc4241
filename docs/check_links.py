"""Internal link check of the built site: every local ``href``/``src`` resolves.

Usage: ``python docs/check_links.py [docs/_build/html]``. Exit status 1 lists each broken link
(page, target): a file that does not exist, or an ``#anchor`` with no element of that ``id``
in the target page. External links (``http(s)://``, ``mailto:``) are not followed — the site
must work offline, so the check also fails on any ``<script src>`` or stylesheet loaded from
another host.
"""

from __future__ import annotations

import html.parser
import os
import sys
import urllib.parse
from typing import Dict, List, Set, Tuple


class _Page(html.parser.HTMLParser):

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.links: List[Tuple[str, str]] = []   # (tag, url)
    self.ids: Set[str] = set()

  def handle_starttag(self, tag, attrs):
    a = dict(attrs)
    for key in ("id", "name"):
      if a.get(key):
        self.ids.add(a[key])
    if tag == "a" and a.get("href"):
      self.links.append((tag, a["href"]))
    elif tag in ("img", "script") and a.get("src"):
      self.links.append((tag, a["src"]))
    elif tag == "link" and a.get("href") and "stylesheet" in (a.get("rel") or ""):
      self.links.append((tag, a["href"]))


def check(site: str) -> List[str]:
  """Returns one message per broken internal link (or external asset) in ``site``."""
  pages: Dict[str, _Page] = {}
  for d, _, files in os.walk(site):
    for f in files:
      if f.endswith(".html"):
        p = _Page()
        with open(os.path.join(d, f), encoding="utf-8") as fh:
          p.feed(fh.read())
        pages[os.path.normpath(os.path.join(d, f))] = p
  if not pages:
    return [f"no HTML pages under {site}: build the docs first"]
  errors = []
  for path, page in sorted(pages.items()):
    rel = os.path.relpath(path, site)
    for tag, url in page.links:
      parts = urllib.parse.urlsplit(url)
      if parts.scheme in ("mailto", "javascript", "data"):
        continue
      if parts.scheme or parts.netloc:
        if tag != "a":   # an asset from another host: the site would not work offline
          errors.append(f"{rel}: <{tag}> loads {url} from another host")
        continue
      target = path if not parts.path else os.path.normpath(
          os.path.join(os.path.dirname(path), urllib.parse.unquote(parts.path)))
      if os.path.isdir(target):
        target = os.path.join(target, "index.html")
      if not os.path.exists(target):
        errors.append(f"{rel}: {url} -> missing file {os.path.relpath(target, site)}")
        continue
      frag = urllib.parse.unquote(parts.fragment)
      if frag and target in pages and frag not in pages[target].ids:
        errors.append(f"{rel}: {url} -> no id {frag!r} in {os.path.relpath(target, site)}")
  return errors


def main(argv: List[str]) -> int:
  site = argv[1] if len(argv) > 1 else os.path.join(os.path.dirname(__file__), "_build", "html")
  errors = check(site)
  for e in errors:
    print(e)
  n = sum(f.endswith(".html") for _, _, files in os.walk(site) for f in files)
  print(f"check_links: {len(errors)} broken internal link(s) in {n} pages of {site}")
  return 1 if errors else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
