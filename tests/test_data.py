from pathlib import Path

import numpy as np
import pytest

from leakkit.vision.data import SOURCES, draw, read_image, resize
from leakkit.errors import InputError


def test_embedded_source_is_real_and_offline():
    pool = SOURCES.get("embedded")("")
    assert len(pool) == 259
    names = {s.name.split("/")[1] for s in pool}
    assert {"astronaut", "china", "lfw_subset"} <= names
    for s in pool[:60:7]:
        assert s.image.dtype == np.float32 and 0 <= s.image.min() and s.image.max() <= 1
        assert s.image.std() > 0.01  # a real picture, not a blank


def test_draw_is_seeded_and_distinct():
    a = [s.name for s in draw("embedded", "", 50, seed=0)]
    assert a == [s.name for s in draw("embedded", "", 50, seed=0)]
    assert len(set(a)) == 50
    assert a != [s.name for s in draw("embedded", "", 50, seed=1)]


def test_digits_have_labels():
    pool = SOURCES.get("digits")("")
    assert len(pool) == 1797 and {s.label for s in pool} == set(range(10))


def test_resize_and_channels():
    rgb = np.random.default_rng(0).random((40, 60, 3), dtype=np.float32)
    assert resize(rgb, 32, 3).shape == (3, 32, 32)
    assert resize(rgb, 16, 1).shape == (1, 16, 16)
    grey = rgb[..., :1]
    out = resize(grey, 8, 3)
    assert out.shape == (3, 8, 8) and np.allclose(out[0], out[2])


def test_files_source(photo_png: Path, photo_folder: Path):
    assert len(SOURCES.get("files")(str(photo_png))) == 1
    folder = SOURCES.get("files")(str(photo_folder))
    assert [Path(s.name).name for s in folder] == ["camera.png", "cat.jpg"]


def test_bad_files_are_one_clear_error(tmp_path: Path):
    with pytest.raises(InputError, match="input not found"):
        SOURCES.get("files")(str(tmp_path / "missing.png"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG this is not really a png")
    with pytest.raises(InputError, match="cannot read image"):
        read_image(broken)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no images"):
        SOURCES.get("files")(str(empty))


def test_hf_imagefolder(tmp_path: Path):
    pytest.importorskip("datasets")
    from PIL import Image
    from skimage import data

    for label, im in (("cats", data.chelsea()), ("rockets", data.rocket())):
        (tmp_path / label).mkdir()
        Image.fromarray(im).resize((20, 20)).save(tmp_path / label / f"{label}.png")
    pool = SOURCES.get("hf-imagefolder")(str(tmp_path))
    assert len(pool) == 2 and sorted(s.label for s in pool) == [0, 1]
    assert pool[0].image.shape == (20, 20, 3)


def test_csv_and_tsv_are_read_by_their_header(tmp_path):
    from leakkit.errors import InputError
    from leakkit.text.data import read_input

    csv_file = tmp_path / "s.csv"
    csv_file.write_text('sentence,label\n"the cat, it sat",1\nhello there,0\n', encoding="utf-8")
    got = read_input(str(csv_file))
    assert [(s.text, s.label) for s in got] == [("the cat, it sat", 1), ("hello there", 0)]
    tsv_file = tmp_path / "s.tsv"
    tsv_file.write_text('label\ttext\n1\tshe said "yes" twice\n', encoding="utf-8")
    assert [(s.text, s.label) for s in read_input(str(tsv_file))] == [('she said "yes" twice', 1)]
    headerless = tmp_path / "h.tsv"
    headerless.write_text("0\tno header here\n", encoding="utf-8")
    assert [(s.text, s.label) for s in read_input(str(headerless))] == [("no header here", 0)]
    wrong = tmp_path / "w.csv"
    wrong.write_text("words,label\nthe cat,1\n", encoding="utf-8")
    with pytest.raises(InputError, match="no sentence column; name it sentence or text"):
        read_input(str(wrong))


def test_class_folders_beyond_num_classes_are_an_error_not_wrapped(tmp_path: Path):
    pytest.importorskip("datasets")
    from PIL import Image
    from skimage import data

    from conftest import FAST, assert_one_line_error, run_cli

    for label, im in (("cats", data.chelsea()), ("rockets", data.rocket()), ("stars", data.astronaut())):
        (tmp_path / label).mkdir()
        Image.fromarray(im).resize((20, 20)).save(tmp_path / label / f"{label}.png")
    proc = run_cli("run", "idlg", *FAST, "data.source=hf-imagefolder", f"data.path={tmp_path}", "task.num_classes=2",
                   "--samples", "3", "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, "3 class(es) with labels 0..2, but task.num_classes=2")


def test_files_that_are_not_images_are_skipped_with_a_count(tmp_path: Path):
    from PIL import Image
    from skimage import data

    Image.fromarray(data.chelsea()).resize((20, 20)).save(tmp_path / "cat.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "fake.png").write_bytes(b"not a png either")
    with pytest.warns(UserWarning, match="skipped 2 file"):
        pool = SOURCES.get("files")(str(tmp_path))
    assert [Path(s.name).name for s in pool] == ["cat.png"]
