"""Headless Chromium for tests: does a `dvc plots` page draw its plots, with no network?

The page under test is opened, unchanged, in an iframe of a small harness page. Once every plot
has been embedded, the harness counts, per plot, the coloured pixels of the canvas Vega drew
(marks are coloured; axes, grid and text are grey or black) and writes the counts into its own
DOM, which Chromium prints (--dump-dom). Name resolution and any proxy are dead ends, so nothing
can come from the network: a page that needs a CDN shows no canvas at all.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# A plot whose canvas has fewer coloured pixels than this drew its legend at most, no marks.
MIN_MARK_PIXELS = 300

HARNESS = """<!DOCTYPE html>
<html><body>
<pre id="result">pending</pre>
<iframe id="page" src="PAGE" width="1400" height="900"></iframe>
<script>
// Pixels whose channels differ (not white, grey or black): marks, not axes or text.
function coloured(canvas) {
  const d = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) {
    const spread = Math.max(d[i], d[i + 1], d[i + 2]) - Math.min(d[i], d[i + 1], d[i + 2]);
    if (d[i + 3] > 0 && spread > 40) n++;
  }
  return n;
}
function plots() {
  const doc = document.getElementById("page").contentDocument;
  return [...doc.querySelectorAll("body > div[id]")].map((div) => {
    const canvas = div.querySelector("canvas");
    return { id: div.id, canvas: !!canvas, coloured: canvas ? coloured(canvas) : 0 };
  });
}
let tries = 0;
function poll() {
  const found = plots();
  if ((found.length && found.every((p) => p.canvas)) || ++tries > 100) {
    document.getElementById("result").textContent = JSON.stringify(found);
  } else {
    setTimeout(poll, 200);
  }
}
window.addEventListener("load", poll);
</script>
</body></html>
"""


def browser() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    # Not a skip: .ci/run installs Debian's chromium; a missing browser is a broken set-up.
    pytest.fail(f"no headless browser on PATH ({', '.join(BROWSERS)}): apt-get install chromium")


def drawn_plots(page: Path, timeout_s: float = 180) -> list[dict]:
    """[{id, canvas, coloured}] for every plot div of a `dvc plots` page, as Chromium drew it."""
    harness = page.parent / "_harness.html"
    harness.write_text(HARNESS.replace("PAGE", page.name))
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            browser(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            # no network: every host name fails to resolve, every proxied request goes nowhere
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--proxy-server=http://127.0.0.1:9",
            # the harness reads the iframe's canvases: file:// pages count as one origin
            "--allow-file-access-from-files",
            # virtual time runs ahead while the page is idle, so the polling costs no wall time
            "--virtual-time-budget=60000",
            "--dump-dom",
            harness.as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    found = re.search(r'<pre id="result">(.*?)</pre>', proc.stdout, re.S)
    assert found and found.group(1) != "pending", (
        f"the harness never reported (exit {proc.returncode}): {proc.stderr[-2000:]}"
    )
    return json.loads(html.unescape(found.group(1)))


def plot_points(page: Path) -> dict[str, int]:
    """Plot id -> the most data rows one revision has in it (a line needs two to show)."""
    found = re.findall(
        r'<div id = "([^"]+)">\s*<script type = "text/javascript">\s*var spec = (.*?);\s*vegaEmbed',
        page.read_text(),
        re.S,
    )
    points = {}
    for plot_id, spec in found:
        revs = Counter(row.get("rev") for row in json.loads(spec)["data"]["values"])
        points[plot_id] = max(revs.values(), default=0)
    return points


def undrawn_plots(page: Path) -> list[dict]:
    """The plots of `page` that Chromium drew no canvas or no marks for, leaving out lines of a
    single point (a one-epoch run's validation curves), which have nothing to draw."""
    points = plot_points(page)
    # Image plots (PNG galleries) are <img> tags on the page, not Vega plots: left out here.
    drawn = [p for p in drawn_plots(page) if p["canvas"] or p["id"] in points]
    assert drawn and sorted(points) == sorted(p["id"] for p in drawn), (points, drawn)
    return [
        p
        for p in drawn
        if not p["canvas"] or (p["coloured"] < MIN_MARK_PIXELS and points[p["id"]] > 1)
    ]
