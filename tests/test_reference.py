"""The generated reference (docs/cli.md, docs/settings.md) is what the code renders now."""

from producer import reference


def test_the_generated_reference_is_current():
    stale = reference.stale()
    assert not stale, f"stale: {', '.join(f'docs/{name}' for name in stale)}; run `{reference.COMMAND}` and commit"


def test_a_stale_reference_is_caught(tmp_path):
    for name, text in reference.render().items():
        (tmp_path / name).write_text(text)
    assert reference.stale(tmp_path) == []
    (tmp_path / "settings.md").write_text(reference.render()["settings.md"].replace("`16`", "`17`"))
    (tmp_path / "cli.md").unlink()
    assert sorted(reference.stale(tmp_path)) == ["cli.md", "settings.md"]


def test_the_reference_is_rendered_at_a_fixed_width(monkeypatch):
    rendered = reference.render()
    monkeypatch.setenv("COLUMNS", "40")
    assert reference.render() == rendered


def test_the_check_names_the_stale_files_and_the_command_that_regenerates_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(reference, "DOCS", tmp_path)
    assert reference.main([]) == 0
    assert reference.main(["--check"]) == 0
    (tmp_path / "cli.md").write_text("# Command reference\n")
    assert reference.main(["--check"]) == 1
    assert "docs/cli.md is stale: run `python -m producer.reference`" in capsys.readouterr().err
