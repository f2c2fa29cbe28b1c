"""The HTML template `dvc plots show/diff` use, with Vega, Vega-Lite and vega-embed inlined.

DVC's default page loads them from cdn.jsdelivr.net, so it renders blank on an air-gapped node;
.dvc/config names this self-contained TEMPLATE instead (`plots.html_template`). Rebuild it only to
change the library versions (needs the npm registry once; tarballs are kept in --cache-dir):

    python -m pcam.offline_plots            # = make plots-template; rewrites TEMPLATE
    python -m pcam.offline_plots --check    # exit 1 if TEMPLATE differs from a fresh build

`npm pack` fetches the versions DVC's own page uses (dvc-render's VegaRenderer); each tarball's
sha512 must equal the pinned one before anything is read from it. All three are BSD-3-Clause: the
page carries their copyright notices and licence.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import NamedTuple

from pcam.errors import PcamError, exit_on_user_error
from pcam.fileio import write_text


class Library(NamedTuple):
    name: str
    version: str
    member: str  # the browser build inside the npm tarball
    integrity: str  # npm's Subresource Integrity string of the tarball


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

TEMPLATE = Path("vendor/dvc-plots-offline.html")  # .dvc/config: ../vendor/dvc-plots-offline.html
CACHE_DIR = Path(".cache/offline-plots")
# dvc-render fills these by plain text replacement, anywhere in the page: an inlined library that
# contained one would be corrupted (and {scripts} would bring the CDN tags back).
DVC_PLACEHOLDERS = ("{scripts}", "{plot_divs}", "{refresh_tag}")

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- {versions}: inlined by pcam.offline_plots, so this page needs no network.
{licences}
    -->
{scripts_inline}
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def fetch(lib: Library, dest: Path) -> Path:
    """The verified tarball of `lib` in `dest`, downloaded with `npm pack` unless already there."""
    tarball = dest / f"{lib.name}-{lib.version}.tgz"  # what `npm pack` names it
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
    actual = "sha512-" + base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
    if actual != lib.integrity:
        tarball.unlink()  # never reuse a bad download
        raise PcamError(
            f"{tarball}: sha512 {actual} is not the pinned {lib.integrity}; deleted it, "
            "check the npm registry configured for this machine"
        )
    return tarball


def _member_text(tarball: Path, name: str) -> str:
    with tarfile.open(tarball, "r:gz") as tar:
        member = tar.extractfile(name) if name in tar.getnames() else None
        if member is None:
            raise PcamError(f"{tarball}: no file {name}")
        return member.read().decode("utf-8")


def read_licence(tarball: Path, lib: Library) -> str:
    """The package's LICENSE, to ship with its code (BSD-3-Clause asks for the notice)."""
    text = _member_text(tarball, "package/LICENSE").strip()
    if "BSD" not in text and "Redistribution and use" not in text:
        raise PcamError(f"{tarball}: package/LICENSE is not the BSD licence this page relies on")
    # Inside an HTML comment: "--" would end it early.
    return f"{lib.name} {lib.version}:\n\n" + text.replace("--", "- -")


def read_script(tarball: Path, lib: Library) -> str:
    code = _member_text(tarball, lib.member)
    for placeholder in DVC_PLACEHOLDERS:
        if placeholder in code:
            raise PcamError(f"{tarball}:{lib.member} contains DVC's placeholder {placeholder}")
    # The .map file is not inlined; a browser would only try to fetch it with devtools open.
    code = re.sub(r"^//# sourceMappingURL=.*$", "", code, flags=re.MULTILINE)
    # "</script" inside the code would end the <script> element early. In JS it can only occur
    # in a string, regex or comment, where "<\/" means the same.
    return re.sub(r"</(script)", r"<\\/\1", code, flags=re.IGNORECASE)


# The minified builds bundle their own dependencies (d3 modules: ISC; others: MIT, ISC, BSD-3),
# whose notices are in each package's dependency list on npm; the builds carry no other notice.
LICENCE_NOTE = (
    "Each build below bundles its npm dependencies (permissive licences: BSD-3-Clause, ISC, MIT)."
)


def build_template(cache_dir: Path) -> str:
    scripts, licences = [], [LICENCE_NOTE]
    for lib in LIBRARIES:
        tarball = fetch(lib, cache_dir)
        code = read_script(tarball, lib)
        licences.append(read_licence(tarball, lib))
        scripts.append(f"    <script>/* {lib.name} {lib.version} */\n{code}\n    </script>")
    versions = ", ".join(f"{lib.name} {lib.version}" for lib in LIBRARIES)
    # The scripts last, so that no text inside them is taken for a placeholder.
    page = PAGE.replace("{versions}", versions).replace("{licences}", "\n\n".join(licences))
    return page.replace("{scripts_inline}", "\n".join(scripts))


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pcam.offline_plots",
        description="Build the HTML template for `dvc plots` that works without network.",
    )
    parser.add_argument("--out", type=Path, default=TEMPLATE, help=f"default: {TEMPLATE}")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=CACHE_DIR,
        help=f"where the npm tarballs are kept (default: {CACHE_DIR})",
    )
    parser.add_argument("--check", action="store_true", help="compare with --out, write nothing")
    args = parser.parse_args(argv)
    html = build_template(args.cache_dir)
    if args.check:
        if not args.out.is_file() or args.out.read_text() != html:
            raise PcamError(f"{args.out} differs from a fresh build: run make plots-template")
        print(f"{args.out}: same as a fresh build")
        return
    write_text(args.out, html)
    print(args.out)


if __name__ == "__main__":
    main()
