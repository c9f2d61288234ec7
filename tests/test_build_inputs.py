"""sharding.build on bad inputs: nothing found, unreadable everything, paths that leave --images, names, determinism."""

import shutil
from pathlib import Path

import pandas as pd
import pytest

from sharding import build
from sharding.mock import main as mock_main
from sharding.registry import SURVEY_DIR, load_survey


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    out = tmp_path_factory.mktemp("inputs_raw") / "sdss"
    assert mock_main(["--survey", "sdss", "--num-galaxies", "24", "--out", str(out), "--seed", "2",
                      "--no-progress"]) == 0
    return out


def _build(catalog: Path, images: Path, out: Path, *extra: str) -> int:
    return build.main(["--survey", "sdss", "--catalog", str(catalog), "--images", str(images), "--out", str(out),
                       "--image-size", "32", "--no-progress", *extra])


def test_a_folder_named_by_id_alone_gets_the_pattern_that_would_match(raw, tmp_path, capsys):
    gz2 = tmp_path / "gz2_images"
    gz2.mkdir()
    for path in (raw / "images").iterdir():  # a GZ2 download: {id}.fits, not the default sdss_{id}.fits
        shutil.copy(path, gz2 / path.name.removeprefix("sdss_"))
    assert _build(raw / "gz2_hart16.csv", gz2, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "--image-pattern '{id}.fits' finds" in err and "sdss_{id}.fits" in err
    assert not (tmp_path / "out" / "sdss").exists()  # failed before writing anything
    assert _build(raw / "gz2_hart16.csv", gz2, tmp_path / "out", "--image-pattern", "{id}.fits") == 0


def test_nothing_sharded_is_a_failure(raw, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in (raw / "images").iterdir():
        (broken / path.name).write_bytes(b"not an image at all")
    assert _build(raw / "gz2_hart16.csv", broken, tmp_path / "out") == 1
    assert "nothing was sharded" in capsys.readouterr().err


def test_rejects_are_byte_identical_between_builds(raw, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(raw / "images", images)
    victim = sorted(images.iterdir())[3]
    victim.write_bytes(b"\x00garbage that no reader identifies" * 10)  # PIL names the BytesIO holding it
    for out in ("a", "b"):
        assert _build(raw / "gz2_hart16.csv", images, tmp_path / out) == 0
    files = sorted(p.name for p in (tmp_path / "a" / "sdss").iterdir())
    for name in files:
        assert (tmp_path / "a" / "sdss" / name).read_bytes() == (tmp_path / "b" / "sdss" / name).read_bytes(), name
    detail = pd.read_parquet(tmp_path / "a" / "sdss" / "rejects.parquet")["detail"].tolist()
    assert any(victim.name in d for d in detail) and not any("0x" in d for d in detail)


def test_catalog_paths_may_not_leave_the_images_folder(raw, tmp_path, capsys):
    catalog = pd.read_csv(raw / "gz2_hart16.csv")
    names = [f"sdss_{i}.fits" for i in catalog["dr7objid"]]
    catalog["file_loc"] = names
    catalog.loc[0, "file_loc"] = f"../{names[0]}"  # outside --images: rejected
    catalog.loc[1, "file_loc"] = str((raw / "images" / names[1]).resolve())  # absolute: the catalog's choice
    catalog.to_csv(tmp_path / "cat.csv", index=False)
    inside = tmp_path / "images"
    shutil.copytree(raw / "images", inside)
    shutil.copy(raw / "images" / names[0], tmp_path / names[0])  # the escaping path would find a real file
    assert _build(tmp_path / "cat.csv", inside, tmp_path / "out") == 0
    rejects = pd.read_parquet(tmp_path / "out" / "sdss" / "rejects.parquet").set_index("row")
    assert rejects.loc[0, "reason"] == "bad-path" and "leaves the images folder" in rejects.loc[0, "detail"]
    labels = pd.read_parquet(tmp_path / "out" / "sdss" / "labels.parquet")
    assert str(catalog.loc[1, "dr7objid"]) in set(labels["object_id"])
    assert _build(raw / "gz2_hart16.csv", raw / "images", tmp_path / "o2", "--image-pattern", "../{id}.fits") == 2
    assert "leaves the images folder" in capsys.readouterr().err


def test_survey_names_must_be_plain_identifiers(tmp_path):
    yaml_text = (SURVEY_DIR / "sdss.yaml").read_text().replace("name: sdss", 'name: "sd ss/.."', 1)
    (tmp_path / "odd.yaml").write_text(yaml_text)
    with pytest.raises(ValueError, match="plain identifier"):
        load_survey(tmp_path / "odd.yaml")
