"""Plots that draw offline: the committed page template, and what plain `dvc plots` make with it.

    pytest tests/test_offline_plots.py      # ~40 s; needs npm (and, once, its registry) and chromium

The template (vendor/dvc-plots-offline.html) must be exactly what the pinned, sha512-checked npm
tarballs build; .dvc/config must name it; and the pages plain `dvc plots diff` / `dvc plots show`
write must draw every plot in a real browser with no network (tests/chromium.py), where DVC's own
CDN page draws none.
"""

from __future__ import annotations

import io
import re
import shutil
import tarfile
from pathlib import Path

import pytest

from pcam import offline_plots
from pcam.errors import PcamError
from tests.chromium import MIN_MARK_PIXELS, drawn_plots
from tests.conftest import REPO
from tests.e2e import copy_repo, dvc

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


def test_committed_template_is_the_pinned_build(tmp_path):
    _require("npm")
    built = offline_plots.build_template(tmp_path / "tarballs")
    assert (REPO / offline_plots.TEMPLATE).read_text() == built, "run make plots-template"
    assert not re.findall(r"<script\b[^>]*\bsrc\s*=", built, re.I), "a script loads from a URL"
    assert not REMOTE_REF.search(built), REMOTE_REF.search(built)
    # the licence travels with the code
    assert built.count("Redistribution and use in source and binary forms") == 3


def test_dvc_config_makes_it_the_default_page():
    shown = dvc(["config", "plots.html_template"], REPO).stdout.strip()
    # DVC reads a relative html_template from the .dvc/ directory
    assert (REPO / ".dvc" / shown).resolve() == (REPO / offline_plots.TEMPLATE).resolve()


def _plot_ids(page: Path) -> list[str]:
    body = page.read_text().split("<body>", 1)[1]
    return re.findall(r"vegaEmbed\('#([^']+)'", body)


@pytest.mark.e2e
def test_plain_dvc_plots_pages_draw_every_plot_without_network(tmp_path):
    # The repo's plots and dvclive/ files are committed (cache: false): no pipeline run needed.
    repo = copy_repo(tmp_path / "repo")
    roc = repo / "plots" / "eval" / "roc_test.csv"
    lines = roc.read_text().splitlines()
    roc.write_text("\n".join(lines[:1] + lines[1::2]) + "\n")  # a workspace change to diff
    dvc(["plots", "diff", "-o", str(tmp_path / "diff")], repo)
    page = tmp_path / "diff" / "index.html"
    html = page.read_text()
    assert "cdn.jsdelivr.net" not in html
    ids = _plot_ids(page)
    assert len(ids) >= 10, ids  # the project's ROC, PR, calibration, confusion, training curves
    drawn = drawn_plots(page)
    # Every Vega plot drawn; image plots (the validate-data galleries) are on the page too.
    assert [p["id"] for p in drawn if p["id"] in ids] == ids
    blank = [p for p in drawn if p["id"] in ids and p["coloured"] < MIN_MARK_PIXELS]
    assert not blank, blank
    assert '"rev": "HEAD"' in html and '"rev": "workspace"' in html

    # The control: DVC's own page, which loads Vega from a CDN, draws nothing here.
    dvc(["config", "--unset", "plots.html_template"], repo)
    dvc(["plots", "show", "-o", str(tmp_path / "cdn")], repo)
    control = drawn_plots(tmp_path / "cdn" / "index.html")
    control = [p for p in control if p["id"] in ids]
    assert len(control) == len(ids) and not any(p["canvas"] for p in control), control
