"""`celebscan demo`, the README's main-job command, run in-process as a user would."""

import pytest
from click.testing import CliRunner

from producer.cli import cli
from producer.demo import COLLINS, HOPPER, build_demo_set

pytestmark = pytest.mark.slow


def test_demo_names_each_person_where_they_are_and_nobody_elsewhere(tmp_path):
    own_database = tmp_path / "own.db"
    result = CliRunner().invoke(
        cli,
        ["--database-url", f"sqlite:///{own_database}", "demo", "--workdir", str(tmp_path / "demo")],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    table = dict(
        line.split(maxsplit=1)
        for line in result.output.split("who is in it\n", 1)[1].splitlines()
        if line.strip() and not line.startswith("see ")
    )
    assert table["hopper_and_collins.jpg"].startswith(f"{COLLINS} (") and HOPPER in table["hopper_and_collins.jpg"]
    for image in ("hopper_half_size.jpg", "hopper_reencoded.png"):
        assert table[image].startswith(HOPPER) and COLLINS not in table[image]
    for image in ("collins_exif_rotated.jpg", "collins_low_quality.jpg", "collins_alpha.png"):
        assert table[image].startswith(COLLINS) and HOPPER not in table[image]
    for image in ("coffee.jpg", "cat.jpg", "gradient.png"):
        assert table[image] == "nobody"
    assert table["broken.jpg"].startswith("failed: CorruptImage")
    assert "UNEXPECTED" not in result.output
    assert not own_database.exists(), "the demo must not write into the user's database"


def test_sample_set_is_made_from_packaged_images_only(tmp_path):
    sample = build_demo_set(tmp_path)
    made = sorted(p.name for p in sample.images.iterdir())
    assert len(made) == 10 and set(sample.expected) < set(made)
    assert {p.name for p in sample.gallery.iterdir()} == {HOPPER, COLLINS}
