"""Offline `dvc plots`: pinned, verified npm tarballs -> one template; `make plots-offline` output.

    pytest tests/test_offline_plots.py      # ~15 s; needs node/npm and, once, the npm registry

The page DVC writes with the template must load no remote script, and the plots in it must render
from the inlined libraries alone: node runs them in a bare context (no fetch, no DOM) and renders
every plot's spec to SVG.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest

from pcam import offline_plots
from pcam.errors import PcamError
from tests.e2e import dvc, make_cmd, run

# Runs each inline <script> of the page in order, the three libraries first; the plot scripts'
# vegaEmbed(id, spec) calls are captured, and each spec is rendered headless to SVG with Vega.
RENDER_JS = r"""
const fs = require("fs");
const vm = require("vm");
const html = fs.readFileSync(process.argv[2], "utf8");
const scripts = [...html.matchAll(/<script\b[^>]*>([\s\S]*?)<\/script>/gi)].map((m) => m[1]);
// A bare context: no fetch, no XMLHttpRequest, no DOM, so nothing can come from the network.
const ctx = vm.createContext({ console });
const plots = [];
let embedCaptured = false;
let versions = null;
for (const code of scripts) {
  if (/^\s*var spec = /.test(code) && !embedCaptured) {
    const kinds = vm.runInContext("[typeof vega, typeof vegaLite, typeof vegaEmbed]", ctx);
    if (kinds.join() !== "object,object,function") throw new Error("libraries missing: " + kinds);
    versions = vm.runInContext("[vega.version, vegaLite.version, vegaEmbed.version]", ctx);
    ctx.vegaEmbed = (id, spec) => plots.push({ id, spec });
    embedCaptured = true;
  }
  vm.runInContext(code, ctx);
}
(async () => {
  const out = [];
  for (const { id, spec } of plots) {
    const lite = String(spec.$schema || "").includes("vega-lite");
    const vgSpec = lite ? ctx.vegaLite.compile(spec).spec : spec;
    const view = new ctx.vega.View(ctx.vega.parse(vgSpec), { renderer: "none" });
    const svg = await view.toSVG();
    const values = (spec.data && spec.data.values) || [];
    out.push({ id, svg, revs: [...new Set(values.map((v) => v.rev))].sort() });
  }
  console.log(JSON.stringify({ versions, plots: out }));
})().catch((e) => {
  console.error((e && e.stack) || e);
  process.exit(1);
});
"""

REMOTE_REF = re.compile(
    r"<(script|link|img|iframe)\b[^>]*\b(src|href)\s*=\s*[\"']?\s*(https?:)?//", re.I
)


def _tarball(path: Path, member: str, code: str) -> Path:
    data = code.encode()
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def test_inlined_script_cannot_end_the_script_element(tmp_path):
    code = 'var s = "</script><b>";\nvar r = /<\\/SCRIPT>/;\n//# sourceMappingURL=x.min.js.map\n'
    tgz = _tarball(tmp_path / "lib-1.0.0.tgz", "package/build/lib.min.js", code)
    lib = offline_plots.Library("lib", "1.0.0", "package/build/lib.min.js", "")
    out = offline_plots.read_script(tgz, lib)
    assert "</script" not in out.lower()
    assert '"<\\/script><b>"' in out  # same string in JavaScript
    assert "sourceMappingURL" not in out


def test_tarball_with_another_hash_is_refused_and_deleted(tmp_path):
    tgz = _tarball(tmp_path / "vega-5.20.2.tgz", "package/build/vega.min.js", "var vega = {};")
    with pytest.raises(PcamError, match="not the pinned"):
        offline_plots.fetch(offline_plots.LIBRARIES[0], tmp_path)
    assert not tgz.exists()


def test_placeholder_inside_a_library_is_refused(tmp_path):
    tgz = _tarball(tmp_path / "lib-1.0.0.tgz", "package/build/lib.min.js", 'x = "{plot_divs}";')
    lib = offline_plots.Library("lib", "1.0.0", "package/build/lib.min.js", "")
    with pytest.raises(PcamError, match="placeholder"):
        offline_plots.read_script(tgz, lib)


def _require(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        # Not a skip: CI and this machine have node/npm, so a missing one is a broken set-up.
        pytest.fail(f"{tool} not found on PATH: the offline plots route needs Node.js and npm")
    return found


def _plots_repo(root: Path) -> Path:
    """A small DVC repo with the project's kinds of plots: a ROC CSV and a dvclive-style TSV."""
    repo = root / "plots-repo"
    repo.mkdir()
    run(["git", "init", "-q", "-b", "main"], repo)
    dvc(["init", "-q"], repo)
    (repo / "dvc.yaml").write_text(
        "plots:\n  - roc.csv:\n      x: fpr\n      y: tpr\n  - loss.tsv:\n      x: step\n"
    )
    (repo / "roc.csv").write_text("fpr,tpr\n0.0,0.0\n0.1,0.6\n0.4,0.9\n1.0,1.0\n")
    (repo / "loss.tsv").write_text("step\tloss\n0\t0.69\n1\t0.52\n2\t0.40\n")
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "plots"], repo)
    (repo / "roc.csv").write_text("fpr,tpr\n0.0,0.0\n0.1,0.7\n0.4,0.95\n1.0,1.0\n")
    return repo


@pytest.mark.e2e
def test_make_plots_offline_page_renders_without_network(tmp_path):
    _require("npm")
    node = _require("node")
    repo = _plots_repo(tmp_path)
    reports = tmp_path / "reports"
    run(
        [*make_cmd(repo), "plots-offline"]
        + [f"OFFLINE_PLOTS={tmp_path / 'vendor'}", f"REPORTS={reports}"],
        repo,
    )

    page = reports / "plots-offline" / "index.html"
    html = page.read_text()
    assert "cdn.jsdelivr.net" not in html
    assert not re.findall(r"<script\b[^>]*\bsrc\s*=", html, re.I), "a script loads from a URL"
    assert not REMOTE_REF.search(html), REMOTE_REF.search(html)

    script = tmp_path / "render.js"
    script.write_text(RENDER_JS)
    rendered = run([node, str(script), str(page)], tmp_path)
    result = json.loads(rendered.stdout)
    assert result["versions"] == [lib.version for lib in offline_plots.LIBRARIES]
    plots = {p["id"]: p for p in result["plots"]}
    assert len(plots) == 2, list(plots)
    for plot in plots.values():
        assert plot["svg"].startswith("<svg") and "<path" in plot["svg"], plot["id"]
    # the ROC plot compares HEAD with the workspace, as `dvc plots diff` should
    assert ["HEAD", "workspace"] in [p["revs"] for p in plots.values()]
