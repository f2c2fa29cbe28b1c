"""An HTML template for `dvc plots show/diff` with Vega, Vega-Lite and vega-embed inlined.

DVC's default plots page loads those libraries from cdn.jsdelivr.net, so it renders blank on an
air-gapped cluster node. Build this template once where the npm registry is reachable (it is one
self-contained file: copy it anywhere), then pass it to DVC:

    python -m pcam.offline_plots [--dir .cache/offline-plots]   # writes DIR/template.html
    dvc plots diff --html-template .cache/offline-plots/template.html -o reports/plots-offline
    make plots-offline                                           # both steps
    dvc config --local plots.html_template "$PWD/.cache/offline-plots/template.html"  # always

`npm pack` fetches the exact versions DVC's own page uses (dvc-render's VegaRenderer), and every
tarball's sha512 must equal the value pinned below before anything is read from it. Tarballs are
kept in DIR (git-ignored), so a second build needs no network.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from pcam.errors import PcamError, exit_on_user_error
from pcam.fileio import write_text


@dataclass(frozen=True)
class Library:
    name: str
    version: str
    member: str  # the browser build inside the npm tarball
    integrity: str  # npm's Subresource Integrity string of the tarball

    @property
    def tarball(self) -> str:
        return f"{self.name}-{self.version}.tgz"  # what `npm pack` names it


# Load order matters: vega-embed expects the globals `vega` and `vegaLite`.
LIBRARIES = (
    Library(
        "vega",
        "5.20.2",
        "package/build/vega.min.js",
        "sha512-qmH7aD9GGPpssVdxL1xgcdxTbQzyRUeRR16Os385ymvQhiwCYQNA6+eXUPAZDTVLfk0RXu6Jzj6kUE5jQ80EVw==",
    ),
    Library(
        "vega-lite",
        "5.2.0",
        "package/build/vega-lite.min.js",
        "sha512-Yxcg8MvYfxHcG6BbkaKT0oVCIMIcE19UvqIsEwBmyd/7h2nzW7oRnID81T8UrY7hpDrIr6wa2JADOT2dhGNErw==",
    ),
    Library(
        "vega-embed",
        "6.18.2",
        "package/build/vega-embed.min.js",
        "sha512-wcDyQPE4J5aiCDc3/suH5RQDvrKkjuLkhzUcbOLwEkNF8/+pp17tS0JghzEvAPNRg+5aG1/N2ydixq8Lk3dOlg==",
    ),
)

DEFAULT_DIR = Path(".cache/offline-plots")
TEMPLATE_NAME = "template.html"
# dvc-render fills these by plain text replacement, anywhere in the page: an inlined library that
# contained one would be corrupted (and {scripts} would bring the CDN tags back).
DVC_PLACEHOLDERS = ("{scripts}", "{plot_divs}", "{refresh_tag}")

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- {versions}: inlined by pcam.offline_plots, so this page needs no network -->
{scripts_inline}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def sri_sha512(path: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def fetch(lib: Library, dest: Path) -> Path:
    """The verified tarball of `lib` in `dest`, downloaded with `npm pack` unless already there."""
    tarball = dest / lib.tarball
    if not tarball.is_file():
        npm = shutil.which("npm")
        if npm is None:
            raise PcamError(
                "npm not found: install Node.js/npm to build the offline plots template, "
                "or copy a template.html built on another machine"
            )
        dest.mkdir(parents=True, exist_ok=True)
        # --prefer-offline: use npm's cache when it has the tarball; --ignore-scripts: fetch only.
        cmd = [npm, "pack", f"{lib.name}@{lib.version}", "--pack-destination", str(dest)]
        cmd += ["--prefer-offline", "--ignore-scripts", "--silent"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not tarball.is_file():
            why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise PcamError(f"`npm pack {lib.name}@{lib.version}` failed: {why}")
    actual = sri_sha512(tarball)
    if actual != lib.integrity:
        tarball.unlink()  # never reuse a bad download
        raise PcamError(
            f"{tarball}: sha512 {actual} is not the pinned {lib.integrity}; deleted it, "
            "check the npm registry configured for this machine"
        )
    return tarball


def read_script(tarball: Path, lib: Library) -> str:
    with tarfile.open(tarball, "r:gz") as tar:
        member = tar.extractfile(lib.member)
        if member is None:
            raise PcamError(f"{tarball}: no file {lib.member}")
        code = member.read().decode("utf-8")
    for placeholder in DVC_PLACEHOLDERS:
        if placeholder in code:
            raise PcamError(f"{tarball}:{lib.member} contains DVC's placeholder {placeholder}")
    # The .map file is not inlined; a browser would only try to fetch it with devtools open.
    code = re.sub(r"^//# sourceMappingURL=.*$", "", code, flags=re.MULTILINE)
    # "</script" inside the code would end the <script> element early. In JS it can only occur
    # in a string, regex or comment, where "<\/" means the same.
    return re.sub(r"</(script)", r"<\\/\1", code, flags=re.IGNORECASE)


def build_template(dest: Path) -> str:
    scripts = []
    for lib in LIBRARIES:
        code = read_script(fetch(lib, dest), lib)
        scripts.append(f"    <script>/* {lib.name} {lib.version} */\n{code}\n    </script>")
    versions = ", ".join(f"{lib.name} {lib.version}" for lib in LIBRARIES)
    # str.format would trip over the braces in the JavaScript: insert the scripts last.
    page = PAGE.format(
        refresh_tag="{refresh_tag}",
        plot_divs="{plot_divs}",
        versions=versions,
        scripts_inline="@@SCRIPTS@@",
    )
    return page.replace("@@SCRIPTS@@", "\n".join(scripts))


def write_template(dest: Path) -> Path:
    out = dest / TEMPLATE_NAME
    html = build_template(dest)
    write_text(out, html)
    return out


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pcam.offline_plots",
        description="Build an HTML template for `dvc plots` that works without network.",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=DEFAULT_DIR,
        help=f"where the npm tarballs and {TEMPLATE_NAME} go (default: {DEFAULT_DIR})",
    )
    args = parser.parse_args(argv)
    print(write_template(args.dir))


if __name__ == "__main__":
    main()
