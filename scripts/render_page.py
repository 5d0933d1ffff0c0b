"""Open one page of the built user guide in a headless browser and print what it rendered, as JSON.

The browser is Chromium inside Qt WebEngine (``pip install PyQt6-WebEngine``; the wheel carries the
engine, nothing is downloaded at run time). It runs offscreen with no network: every request the page
makes is recorded and any that is not a local file is blocked, so the report shows whether the site
renders offline. tests/test_docs.py runs it on the CLI reference page.

    .venv/bin/python scripts/render_page.py site/reference/cli.html [--search adapt] [--screenshot cli.png]

Printed: the page title and first heading, how many navigation links and code blocks rendered, whether
the theme's JavaScript ran (Material's ``document$``), the search results for ``--search``, every request
that was not a local file, and the JavaScript console's errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

# offscreen, no GPU; Chromium's sandbox cannot start as root in a container
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("QTWEBENGINE_DISABLE_SANDBOX", "1")
os.environ.setdefault(
    "QTWEBENGINE_CHROMIUM_FLAGS",
    "--disable-gpu --no-sandbox --disable-background-networking --disable-component-update",
)

from PyQt6.QtCore import QObject, QTimer, QUrl  # noqa: E402 - the environment above must be set before Qt loads
from PyQt6.QtWebEngineCore import (  # noqa: E402
    QWebEnginePage,
    QWebEngineProfile,
    QWebEngineUrlRequestInfo,
    QWebEngineUrlRequestInterceptor,
)
from PyQt6.QtWebEngineWidgets import QWebEngineView  # noqa: E402
from PyQt6.QtWidgets import QApplication  # noqa: E402

SETTLE_MS = 1500  # after loadFinished: the theme's scripts run, the search index loads
TIMEOUT_MS = 60_000

DOM_FACTS = """JSON.stringify({
  title: document.title,
  h1: (document.querySelector("h1") || {}).textContent || "",
  nav_links: document.querySelectorAll(".md-nav__link").length,
  code_blocks: document.querySelectorAll("pre code").length,
  theme_script_ran: typeof document$ !== "undefined",
})"""

SEARCH = """(() => {
  const input = document.querySelector("input.md-search__input");
  if (!input) return false;
  input.focus();
  input.value = %s;
  input.dispatchEvent(new Event("input", {bubbles: true}));
  input.dispatchEvent(new KeyboardEvent("keyup", {bubbles: true}));
  return true;
})()"""

SEARCH_RESULTS = """JSON.stringify(Array.from(document.querySelectorAll(".md-search-result__item a"))
  .map(a => a.getAttribute("href")))"""


class _Requests(QWebEngineUrlRequestInterceptor):
    """Records every request; blocks all that are not local files, so nothing reaches a network."""

    def __init__(self) -> None:
        super().__init__()
        self.outside: list[str] = []

    def interceptRequest(self, info: QWebEngineUrlRequestInfo) -> None:  # Qt's name for the method
        url = info.requestUrl()
        if url.scheme() not in ("file", "data", "blob", "qrc"):
            self.outside.append(url.toString())
            info.block(True)


class _Page(QWebEnginePage):
    """Keeps the JavaScript console's errors."""

    def __init__(self, profile: QWebEngineProfile, parent: QObject | None) -> None:
        super().__init__(profile, parent)
        self.errors: list[str] = []

    def javaScriptConsoleMessage(  # Qt's name
        self, level: QWebEnginePage.JavaScriptConsoleMessageLevel, message: str, line: int, source: str
    ) -> None:
        if level == QWebEnginePage.JavaScriptConsoleMessageLevel.ErrorMessageLevel:
            self.errors.append(f"{Path(QUrl(source).path()).name}:{line}: {message}")


def render(page_file: Path, *, search: str | None = None, screenshot: Path | None = None) -> dict[str, Any]:
    """Load ``page_file`` headless and return what it rendered (see the module docstring)."""
    app = QApplication.instance() or QApplication([sys.argv[0]])
    view = QWebEngineView()
    view.resize(1200, 900)
    requests = _Requests()
    view.page().profile().setUrlRequestInterceptor(requests)
    page = _Page(view.page().profile(), view)
    view.setPage(page)
    result: dict[str, Any] = {"loaded": False}

    def finish() -> None:
        if screenshot is not None:
            view.grab().save(str(screenshot))
        result.update(outside_requests=requests.outside, console_errors=page.errors)
        app.quit()

    def searched(hrefs: str | None) -> None:
        result["search_results"] = json.loads(hrefs) if hrefs else []
        finish()

    def facts(value: str | None) -> None:
        result.update(json.loads(value) if value else {})
        if search is None:
            finish()
            return
        page.runJavaScript(SEARCH % json.dumps(search))
        QTimer.singleShot(SETTLE_MS, lambda: page.runJavaScript(SEARCH_RESULTS, searched))

    def loaded(ok: bool) -> None:
        result["loaded"] = ok
        QTimer.singleShot(SETTLE_MS, lambda: page.runJavaScript(DOM_FACTS, facts))

    view.loadFinished.connect(loaded)
    view.show()
    view.load(QUrl.fromLocalFile(str(page_file.resolve())))
    QTimer.singleShot(TIMEOUT_MS, lambda: (result.setdefault("timed_out", True), finish()))
    app.exec()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path, help="a built HTML page, e.g. site/reference/cli.html")
    parser.add_argument("--search", help="also type this into the site search and list the results")
    parser.add_argument("--screenshot", type=Path, help="save what the page looks like as PNG")
    args = parser.parse_args()
    if not args.page.is_file():
        print(f"{args.page}: no such page (build the site first: mkdocs build)", file=sys.stderr)
        return 2
    print(json.dumps(render(args.page, search=args.search, screenshot=args.screenshot), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
