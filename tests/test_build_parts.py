"""sharding.build --part i/N and --merge: byte-identical to a one-process build for any N, resumable, checked."""

from pathlib import Path

import pytest

from sharding import build, parts, writer
from sharding.mock import main as mock_main


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    out = tmp_path_factory.mktemp("parts_raw") / "hst"
    assert mock_main(["--survey", "hst", "--num-galaxies", "45", "--out", str(out), "--seed", "8",
                      "--corrupt-fraction", "0.12", "--no-progress"]) == 0
    return out


def _build(raw: Path, out: Path, *extra: str) -> int:
    return build.main(["--survey", "hst", "--catalog", str(raw / "gz_hubble_main.fits"), "--images",
                       str(raw / "images"), "--out", str(out), "--image-size", "48", "--samples-per-shard", "4",
                       "--keep-float", "--no-progress", *extra])


def _same_files(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for path in a.iterdir():
        assert path.read_bytes() == (b / path.name).read_bytes(), path.name


@pytest.mark.parametrize("count", [1, 2, 5, 60])
def test_parts_in_any_order_merge_to_the_one_process_build(raw, tmp_path, count):
    assert _build(raw, tmp_path / "one") == 0
    order = list(range(count, 0, -1))  # the last part finishes first; the one that completes the set merges
    for index in order:
        assert _build(raw, tmp_path / "parts", "--part", f"{index}/{count}") == 0
    _same_files(tmp_path / "one" / "hst", tmp_path / "parts" / "hst")
    assert not (tmp_path / "parts" / "hst" / parts.PARTS_DIR).exists()


def test_a_killed_part_resumes_and_an_early_merge_is_refused(raw, tmp_path, monkeypatch, capsys):
    assert _build(raw, tmp_path / "one") == 0
    assert _build(raw, tmp_path / "parts", "--part", "1/2") == 0
    assert _build(raw, tmp_path / "parts", "--merge") == 2
    assert "part(s) [2] of 2 have not finished" in capsys.readouterr().err
    original, added = writer.ShardPacker.add, []

    def killed_after_five(self, key, members):
        if len(added) == 5:
            raise KeyboardInterrupt
        added.append(key)
        return original(self, key, members)

    monkeypatch.setattr(writer.ShardPacker, "add", killed_after_five)
    with pytest.raises(KeyboardInterrupt):
        _build(raw, tmp_path / "parts", "--part", "2/2")
    monkeypatch.setattr(writer.ShardPacker, "add", original)
    assert _build(raw, tmp_path / "parts", "--part", "2/2") == 0  # resumes, then merges (the last part)
    _same_files(tmp_path / "one" / "hst", tmp_path / "parts" / "hst")
    assert _build(raw, tmp_path / "parts", "--merge") == 0  # a merge job after the auto-merge: nothing to do
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("text", ["0/3", "4/3", "two/3", ""])
def test_bad_part_specs_are_refused(text):
    with pytest.raises(ValueError, match="expected i/N"):
        parts.parse_part(text)
