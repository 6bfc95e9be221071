"""Pictures of results: `celebscan report` opened in headless Chromium, and `celebscan show`."""

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from producer.annotate import RECOGNIZED
from producer.demo import COLLINS, HOPPER
from tests.clirun import celebscan
from tests.conftest import unavailable

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_database(tmp_path_factory) -> str:
    """The demo's scan (local recognizer, 10 sample images, one broken) in its own database."""
    workdir = tmp_path_factory.mktemp("demo")
    celebscan("demo", "--workdir", workdir)
    return f"sqlite:///{workdir / 'demo.db'}"


def run(database: str, *args: str) -> str:
    return celebscan("--database-url", database, *args).output


def chromium(*args: str, user_data: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if not binary:
        unavailable("Chromium is not installed: apt-get install chromium")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={user_data}",
    ]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=120, check=True)


class Figures(HTMLParser):
    """The figures of a rendered page: (image key, hidden?) in page order, and every src/href."""

    def __init__(self) -> None:
        super().__init__()
        self.figures, self.links, self._in_figure, self._hidden = [], [], False, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [attrs[name] for name in ("src", "href") if name in attrs]
        if tag == "figure":
            self._in_figure, self._hidden = True, "hidden" in attrs
        elif tag == "img" and self._in_figure:
            self.figures.append((attrs["alt"], self._hidden))

    def handle_endtag(self, tag):
        if tag == "figure":
            self._in_figure = False


def rendered(page: Path, fragment: str, tmp_path: Path) -> tuple[Figures, str]:
    """The page's DOM after its script ran in Chromium, opened at ``#fragment``."""
    dom = chromium("--dump-dom", f"{page.as_uri()}#{fragment}", user_data=tmp_path / "chromium").stdout
    parser = Figures()
    parser.feed(dom)
    return parser, dom


def test_the_report_in_a_real_browser(demo_database, tmp_path):
    page = tmp_path / "report.html"
    assert "wrote" in run(demo_database, "report", "--output", str(page))
    html = page.read_text()
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    references = re.findall(r"""\b(?:src|href|action)=["']([^"']*)""", html)
    assert references and all(ref.startswith(("data:", "#")) for ref in references), "the page must fetch nothing"

    everyone, dom = rendered(page, "", tmp_path)
    assert len(everyone.figures) == 9 and not any(hidden for _, hidden in everyone.figures)
    assert all(link.startswith("data:image/jpeg;base64,") for link in everyone.links)
    assert "broken.jpg" in dom and "CorruptImage" in dom  # the failure, with its reason
    assert f"{HOPPER} (" in dom and f"{COLLINS} (" in dom

    hopper, dom = rendered(page, f"person={HOPPER.replace(' ', '%20')}", tmp_path)
    visible = sorted(key for key, hidden in hopper.figures if not hidden)
    assert visible == ["hopper_and_collins.jpg", "hopper_half_size.jpg", "hopper_reencoded.png"]
    assert re.search(r'id="count">3 images<', dom)

    screenshot = tmp_path / "report.png"
    chromium(
        f"--screenshot={screenshot}",
        "--window-size=1280,1000",
        "--hide-scrollbars",
        page.as_uri(),
        user_data=tmp_path / "chromium",
    )
    pixels = np.asarray(Image.open(screenshot).convert("RGB"))
    assert pixels.shape[:2] == (1000, 1280) and pixels.std() > 30, "the screenshot shows the page"


def test_show_draws_a_box_and_name_on_each_face(demo_database, tmp_path):
    output = tmp_path / "both.png"
    text = run(demo_database, "show", "hopper_and_collins.jpg", "--output", str(output))
    assert HOPPER in text and COLLINS in text
    pixels = np.asarray(Image.open(output).convert("RGB")).astype(int)
    green = np.all(np.abs(pixels - np.array(RECOGNIZED)) < 10, axis=2)
    assert green.sum() > 500, "the recognized faces are outlined"
    halves = green[:, : pixels.shape[1] // 2].sum(), green[:, pixels.shape[1] // 2 :].sum()
    assert min(halves) > 100, "one box on each half (Hopper left, Collins right)"


def test_show_refuses_images_without_a_result(demo_database, tmp_path):
    result = celebscan("--database-url", demo_database, "show", "broken.jpg", "--output", tmp_path / "x.jpg", ok=False)
    assert result.exit_code == 1 and "CorruptImage" in result.output
    result = celebscan("--database-url", demo_database, "show", "nope.jpg", "--output", tmp_path / "x.jpg", ok=False)
    assert result.exit_code == 1 and "no image 'nope.jpg'" in result.output


def test_readmes_who_is_where_block_is_what_the_commands_print(demo_database, tmp_path):
    """README's console block of `people`, `results --person` and `report`, run as shown (in a
    shell, pipe included) on the demo's database: the same lines."""
    import os
    import sys

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("```console\n$ celebscan people\n", 1)[1].split("```", 1)[0]
    commands = ["celebscan people"] + [line[2:] for line in block.splitlines() if line.startswith("$ ")]
    expected = [chunk.strip("\n") for chunk in re.split(r"^\$ .*$", "\n" + block, flags=re.M)]
    assert len(commands) == 3 and len(expected) == 3
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "CELEBSCAN_DATABASE_URL": demo_database,
        "LANG": os.environ.get("LANG", "C.UTF-8"),
    }
    for command, lines in zip(commands, expected, strict=True):
        printed = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
        ).stdout.strip("\n")
        if command.startswith("celebscan report"):
            assert re.fullmatch(re.escape(lines).replace(r"0\.2", r"\d+\.\d"), printed), (command, printed)
        else:
            assert printed == lines, (command, printed)
