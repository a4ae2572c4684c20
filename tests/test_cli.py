"""The command line, `python -m hematovision classify PATH... [--csv OUT]`, with the tiny real Keras model."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hematovision import cli
from hematovision.classifier import load_classifier
from hematovision.imaging import prepare_field

ROOT = Path(__file__).resolve().parents[1]
FIELDS = Path(__file__).resolve().parent / "data" / "fields"
LABELS = ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]
HEADER = ["file", "cell", "xmin", "ymin", "xmax", "ymax", "label", "probability", "uncertain", "reason", *LABELS,
          "error"]


@pytest.fixture
def images(tmp_path) -> Path:
    """A lab's folder: the two committed fields, a blank picture in a subfolder, a damaged file, and a note that
    is not an image (skipped: not an image suffix)."""
    folder = tmp_path / "smears"
    (folder / "day2").mkdir(parents=True)
    for path in FIELDS.glob("*.jpg"):
        shutil.copy(path, folder / path.name)
    Image.new("RGB", (320, 240), "white").save(folder / "day2" / "blank.png")
    (folder / "day2" / "broken.jpg").write_bytes((FIELDS / "bccd_00001_one_wbc.jpg").read_bytes()[:2000])
    (folder / "notes.txt").write_text("not an image")
    return folder


def run(args: list[str], capsys) -> tuple[int, str, str]:
    status = cli.main(args)
    out, err = capsys.readouterr()
    return status, out, err


def test_a_folder_run_writes_a_row_per_cell_and_prints_the_count(images, tmp_path, tiny_model_path, capsys):
    target = tmp_path / "results.csv"
    status, out, err = run(["classify", str(images), "--csv", str(target), "--model", str(tiny_model_path)], capsys)
    assert status == 0
    rows = list(csv.reader(io.StringIO(target.read_text(encoding="utf-8"))))
    assert rows[0] == HEADER
    by_file: dict[str, list[list[str]]] = {}
    for row in rows[1:]:
        by_file.setdefault(Path(row[0]).name, []).append(row)
    assert set(by_file) == {"bccd_00001_one_wbc.jpg", "bccd_00010_two_wbc.jpg", "blank.png", "broken.jpg"}

    classifier = load_classifier(tiny_model_path)
    for name in ("bccd_00001_one_wbc.jpg", "bccd_00010_two_wbc.jpg"):
        prepared = prepare_field((FIELDS / name).read_bytes())
        probabilities = dict(zip((c.box for c in prepared.cells), classifier.predict(prepared.crops), strict=True))
        assert [row[1] for row in by_file[name]] == [str(i + 1) for i in range(len(prepared.cells))]
        for row in by_file[name]:
            expected = probabilities[tuple(int(v) for v in row[2:6])]  # the box is one the detector found
            assert row[6] == LABELS[int(np.argmax(expected))]
            assert np.allclose([float(v) for v in row[10:14]], expected, atol=1e-4)
            assert row[8] in ("yes", "no") and row[-1] == ""
    assert by_file["blank.png"] == [[str(images / "day2" / "blank.png"), "", "", "", "", "", "", "", "yes",
                                     "no white cell found", "", "", "", "", ""]]
    assert "damaged or incomplete" in by_file["broken.jpg"][0][-1]

    assert f"skipped {images / 'day2' / 'broken.jpg'}: " in err  # listed while the run goes on
    assert "Traceback" not in err
    assert "3 of 4 files read: 3 white cells found, 1 image without one." in out
    counted = {label: int(n) for label, n in (line.split()[:2] for line in out.splitlines()
                                              if line.strip().split(" ")[0] in LABELS)}
    cells = [row for row in rows[1:] if row[1]]
    assert counted == {label: sum(row[6] == label and row[8] == "no" for row in cells) for label in LABELS}
    assert f"One row per white cell written to {target}" in out
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".part"] == []


def test_without_csv_each_cell_is_printed(tiny_model_path, capsys):
    status, out, _ = run(["classify", str(FIELDS / "bccd_00010_two_wbc.jpg"), "--model", str(tiny_model_path)], capsys)
    assert status == 0
    lines = [line for line in out.splitlines() if "bccd_00010_two_wbc.jpg: cell" in line]
    assert [line.split(": cell ")[1][:1] for line in lines] == ["1", "2"]
    assert "Differential count over the" in out


def refusal(args: list[str], capsys) -> str:
    status, out, err = run(args, capsys)
    assert status == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hematovision: error: ")
    return lines[0]


def test_a_missing_path_is_refused_in_one_line(tmp_path, tiny_model_path, capsys):
    line = refusal(["classify", str(FIELDS), str(tmp_path / "nowhere"), "--model", str(tiny_model_path)], capsys)
    assert f"no such file or folder: {tmp_path / 'nowhere'}" in line


def test_a_folder_without_images_is_refused(tmp_path, tiny_model_path, capsys):
    (tmp_path / "notes.txt").write_text("nothing to see")
    assert "no images found in" in refusal(["classify", str(tmp_path), "--model", str(tiny_model_path)], capsys)


def test_an_existing_csv_is_kept_unless_forced(tmp_path, tiny_model_path, capsys):
    target = tmp_path / "results.csv"
    target.write_text("keep me")
    args = ["classify", str(FIELDS), "--csv", str(target), "--model", str(tiny_model_path)]
    assert "exists; add --force to overwrite it" in refusal(args, capsys)
    assert target.read_text() == "keep me"
    status, _, _ = run([*args, "--force"], capsys)
    assert status == 0 and target.read_text(encoding="utf-8").startswith("file,cell,xmin")


def test_a_missing_model_is_refused(tmp_path, capsys):
    line = refusal(["classify", str(FIELDS), "--model", str(tmp_path / "none.h5")], capsys)
    assert "Model file not found" in line


def test_a_run_that_fails_leaves_no_half_written_csv(tmp_path, tiny_model_path, capsys, monkeypatch):
    target = tmp_path / "results.csv"
    target.write_text("the previous results")
    calls = []

    def fails_on_the_second(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a person pressing Ctrl-C
        return real(*args, **kwargs)

    real = cli.classify_file
    monkeypatch.setattr(cli, "classify_file", fails_on_the_second)
    status, _, err = run(["classify", str(FIELDS), "--csv", str(target), "--force", "--model", str(tiny_model_path)],
                         capsys)
    assert status == 130 and "interrupted; no CSV was written" in err
    assert target.read_text() == "the previous results"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]  # no temporary file left behind


def test_python_dash_m_runs_it_and_a_mistake_gives_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "hematovision", "classify", str(tmp_path / "nowhere")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip() == f"hematovision: error: no such file or folder: {tmp_path / 'nowhere'}"
