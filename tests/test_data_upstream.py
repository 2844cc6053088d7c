"""The benchmarks as their sources ship them (fabricated: generated images, CoOp's split-file format, the registry's
real class lists) and dataset names as users type them: download, archive layouts, name resolution, a full check."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from importlib.metadata import version
from pathlib import Path

import pytest

import data.download as download
import helpers_upstream as upstream
from data.__main__ import main
from data.errors import DataError
from data.registry import get_dataset, load_benchmark, resolve_names

ROOT = Path(__file__).resolve().parents[1]
UNREACHABLE = "http://127.0.0.1:9/uc?id={id}"  # the discard port: refused at once, as an offline machine is


def _one_line_error(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# 1. download: gdown is installed, the split file comes first, and no network fails in one line


def test_gdown_is_pinned_and_installed() -> None:
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert version("gdown") == pins["gdown"]


def test_download_without_network_fails_on_the_split_file_before_any_archive(tmp_path: Path, monkeypatch,
                                                                            capsys) -> None:
    archives = []
    monkeypatch.setattr(download, "GDRIVE_URL", UNREACHABLE)
    monkeypatch.setattr(download, "_torchvision_fetch", lambda info, root: archives.append(info.name))
    assert main(["download", "dtd", "--root", str(tmp_path)]) == 2
    err = _one_line_error(capsys)
    assert "split_zhou_DescribableTextures.json: Google Drive download failed (ConnectionError" in err
    assert "drive.google.com/file/d/1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x/view" in err
    assert archives == []  # the image archive (DTD ~600 MB) was never started
    assert not any(p.is_file() for p in tmp_path.rglob("*"))  # no split file, no .part


def test_download_fetches_the_split_file_then_the_images(tmp_path: Path, monkeypatch, capsys) -> None:
    calls = []

    def fake_gdown(url: str, output: str, **kwargs) -> str:
        calls.append(("split", url))
        Path(output).write_text(json.dumps(raw))
        return output

    def fake_torchvision(info, data_root) -> None:  # the archive, linked in as torchvision's is
        calls.append(("images", info.name))
        (dataset_dir / "2750").symlink_to(fresh / "eurosat" / "2750")

    fresh = tmp_path / "elsewhere"
    raw = upstream.coop_split("EuroSAT", fresh)
    import gdown

    monkeypatch.setattr(gdown, "download", fake_gdown)
    monkeypatch.setattr(download, "_torchvision_fetch", fake_torchvision)
    dataset_dir = tmp_path / "data" / "eurosat"
    assert main(["download", "EuroSAT", "--root", str(tmp_path / "data")]) == 0
    assert [c[0] for c in calls] == ["split", "images"] and calls[0][1].endswith("1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o")
    assert "EuroSAT: ready" in capsys.readouterr().out


def test_download_refuses_a_page_instead_of_a_split_file_and_says_when_gdown_is_missing(tmp_path: Path, monkeypatch,
                                                                                     capsys) -> None:
    import gdown

    monkeypatch.setattr(gdown, "download", lambda url, output, **kw: Path(output).write_text("<html>quota</html>"))
    monkeypatch.setattr(download, "_torchvision_fetch", lambda info, root: pytest.fail("archive fetched"))
    assert main(["download", "DTD", "--root", str(tmp_path)]) == 2
    assert "not a readable JSON split file" in _one_line_error(capsys)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))
    monkeypatch.setitem(sys.modules, "gdown", None)  # as if not installed
    assert main(["download", "UCF101", "--root", str(tmp_path)]) == 2
    assert "gdown is not installed; `pip install -r requirements.txt`" in _one_line_error(capsys)


# 2. ImageNet-Sketch and ImageNet-V2 as their archives unpack


def test_imagenet_sketch_as_its_zip_unpacks(tmp_path: Path, capsys) -> None:
    (tmp_path / "imagenet-sketch").mkdir()
    assert main(["check", "ImageNetSketch", "--root", str(tmp_path)]) == 2
    err = _one_line_error(capsys)
    assert "imagenet-sketch/images: not found (nor sketch/, the folder its archive unpacks to)" in err
    folder = upstream.shift_set("ImageNetSketch", tmp_path)
    assert folder == tmp_path / "imagenet-sketch" / "sketch"
    assert main(["check", "imagenet-sketch", "--root", str(tmp_path)]) == 0
    assert f"images under {folder}" in capsys.readouterr().out
    image_root, _, splits = load_benchmark("ImageNetSketch", tmp_path)
    assert splits["test"][0] == ("n01440764/sketch_0.JPEG", 0)  # the same paths as under CoOp's images/
    assert main(["info", "ImageNetSketch"]) == 0
    assert "unzip ImageNet-Sketch.zip -> DATA/imagenet-sketch/sketch/" in capsys.readouterr().out


def test_imagenetv2_from_the_hub_file_with_the_documented_command(tmp_path: Path, capsys) -> None:
    assert main(["info", "ImageNetV2"]) == 0
    steps = capsys.readouterr().out
    assert "https://huggingface.co/datasets/vaishaal/ImageNetV2" in steps and "s3-us-west-2.amazonaws.com" in steps
    command = re.search(r"cd DATA/imagenetv2 && (tar -xf \S+)", steps).group(1).split()
    staging = upstream.shift_set("ImageNetV2", tmp_path / "staging")
    archive = tmp_path / "data" / "imagenetv2" / "imagenetv2-matched-frequency.tar.gz"
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w") as tar:  # the hub's file: a plain tar despite its name
        tar.add(staging, arcname=staging.name)
    subprocess.run(command, cwd=archive.parent, check=True)
    assert main(["check", "ImageNetV2", "--root", str(tmp_path / "data")]) == 0
    assert "test      1000 images, 1000 classes" in capsys.readouterr().out


# 3. names as typed, resolved in one place


@pytest.mark.parametrize("typed, expected", [
    (["imagenet ImageNetV2"], ["ImageNet", "ImageNetV2 ImageNet"]),
    (["dtd,EUROSAT", "oxford_pets", "DescribableTextures"], ["DTD", "EuroSAT", "OxfordPets"]),
    (["ImageNet-Sketch", "imagenet_a", "imagenet"], ["ImageNetSketch ImageNet", "ImageNetA ImageNet", "ImageNet"]),
    (["benchmarks"], ["ImageNet", "Caltech101", "OxfordPets", "StanfordCars", "Flowers102", "Food101",
                      "FGVCAircraft", "SUN397", "DTD", "EuroSAT", "UCF101"]),
    (["OxfordFlowers"], ["Flowers102"]),
])
def test_resolve_names_as_typed(typed: list[str], expected: list[str], capsys) -> None:
    assert main(["resolve", *typed]) == 0
    assert capsys.readouterr().out.splitlines() == expected


def test_resolve_refuses_a_shift_set_without_its_source_and_unknown_names(capsys) -> None:
    assert main(["resolve", "ImageNetV2"]) == 2
    assert 'name ImageNet too, e.g. --datasets "ImageNet ImageNetV2"' in _one_line_error(capsys)
    assert main(["resolve", "dtd", "cifar10"]) == 2
    assert "unknown dataset 'cifar10'" in _one_line_error(capsys)
    assert [i.name for i in resolve_names(["all"])][-4:] == ["ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR"]
    with pytest.raises(DataError, match="no dataset named"):
        resolve_names([" , "])


def _run_all(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(["bash", str(ROOT / "run_all.sh"), *args], capture_output=True, text=True, env=env,
                          timeout=900)


def test_run_all_refuses_a_shift_set_alone_in_one_line(tmp_path: Path) -> None:
    run = _run_all("--datasets", "ImageNetV2", "--data-root", str(tmp_path), "--pretrained", "random")
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and run.stdout == ""
    assert 'name ImageNet too, e.g. --datasets "ImageNet ImageNetV2"' in run.stderr


def test_run_all_with_names_as_typed_on_imagenet_and_shift_sets_as_shipped(tmp_path: Path) -> None:
    """Lower-case and hyphenated names, ImageNet-Sketch from its zip's sketch/, ImageNet-A over its 200 classes; the
    log (a pipe) holds no carriage-return frames; the tables say the weights were random."""
    data = tmp_path / "data"
    upstream.imagenet(data, train_per_class=2)
    for name in ("ImageNetSketch", "ImageNetA"):
        upstream.shift_set(name, data)
    out = tmp_path / "out"
    run = _run_all("--datasets", "imagenet imagenet-sketch,imagenet_a", "--data-root", str(data), "--model",
                   "cmm-tiny-vit", "--pretrained", "random", "--shots", "1", "--seeds", "1", "--out", str(out),
                   "--train-args", "--methods zeroshot --grid lr=1e-2")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "\r" not in run.stdout + run.stderr
    assert re.search(r"ImageNetSketch\.h5 test: 1,000 img in [0-9.]+ s", run.stderr)
    summary = (out / "results" / "summary.md").read_text()
    shift = summary[summary.index("## Distribution shift"):]
    assert "| Source test | ImageNetSketch | ImageNetA |" in shift and "| ImageNet | zeroshot | 1 |" in shift
    assert "**Random weights**" in summary and "**Random weights**" in (out / "runs" / "ImageNet" / "results.md").read_text()
    ranks = json.loads((out / "runs" / "ImageNet" / "results.json").read_text())["summary"][0]["shift"]
    assert set(ranks) == {"ImageNetSketch", "ImageNetA"}


# 4. data check stats every listed file


def test_check_counts_every_missing_image(tmp_path: Path, capsys) -> None:
    raw = upstream.coop_split("DTD", tmp_path)
    assert main(["check", "dtd", "--root", str(tmp_path)]) == 0
    images = tmp_path / "dtd" / "images"
    gone = [raw["train"][5][0], raw["train"][40][0], raw["test"][7][0]]  # none is a split's first image
    for rel in gone:
        (images / rel).unlink()
    capsys.readouterr()
    assert main(["check", "DTD", "--root", str(tmp_path)]) == 2
    err = _one_line_error(capsys)
    listed = sum(map(len, raw.values()))
    assert f"{images}: 3 of the {listed} listed images are missing (train 2, test 1), e.g. {', '.join(gone)}" in err
    assert "`python -m data info DTD`" in err


def test_check_counts_missing_fgvc_images(tmp_path: Path, capsys) -> None:
    upstream.fgvc_aircraft(tmp_path)
    assert main(["check", "fgvc-aircraft", "--root", str(tmp_path)]) == 0
    next((tmp_path / "fgvc_aircraft" / "images").glob("*.jpg")).unlink()
    assert main(["check", "FGVCAircraft", "--root", str(tmp_path)]) == 2
    assert "1 of the 300 listed images are missing" in _one_line_error(capsys)


# 5. messages that name the dataset and the fix; one dataset order; random weights said (see the run_all test)


def test_unsorted_imagenet_val_says_to_sort_it(tmp_path: Path, capsys) -> None:
    upstream.imagenet(tmp_path, train_per_class=1, sorted_val=False)
    assert main(["check", "imagenet", "--root", str(tmp_path)]) == 2
    err = _one_line_error(capsys)
    assert "images/val: 1000 images lie loose in the folder" in err
    assert "sort them into the 1,000 wnid class folders" in err and "`python -m data info ImageNet`" in err
    assert "NAME" not in err


def test_errors_name_the_dataset_never_a_placeholder(tmp_path: Path, capsys) -> None:
    info = get_dataset("OxfordPets")
    (tmp_path / info.folder / info.image_dir).mkdir(parents=True)
    (tmp_path / info.folder / info.split_file).mkdir()  # exists, but not a file
    assert main(["check", "OxfordPets", "--root", str(tmp_path)]) == 2
    assert "NAME" not in _one_line_error(capsys)
    upstream.shift_set("ImageNetR", tmp_path)
    wnid = get_dataset("ImageNetR").class_folders[3]
    for image in (tmp_path / "imagenet-rendition" / "imagenet-r" / wnid).iterdir():
        image.unlink()
    (tmp_path / "imagenet-rendition" / "imagenet-r" / wnid).rmdir()
    assert main(["check", "ImageNetR", "--root", str(tmp_path)]) == 2
    err = _one_line_error(capsys)
    assert f"{wnid}: class folder not found" in err and "`python -m data info ImageNetR`" in err


def test_tables_and_plots_order_datasets_alike(tmp_path: Path, monkeypatch) -> None:
    from matplotlib.figure import Figure

    from train_jax import report

    names = ["my_folder", "EuroSAT", "DTD", "ImageNet"]  # run folders given in no particular order
    summary = [{"dataset": d, "method": "zeroshot", "shots": 1, "test_mean": 50.0, "test_std": 0.0, "shift": {},
                "failed_runs": 0, "seeds": [1], "tie_breaks": [None], "select": "seed", "loss_mean": [1.0, 0.5],
                "loss_std": [0.0, 0.0], "loss_still_falling": False} for d in names]
    titles = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: titles.append([ax.get_title() for ax in fig.axes
                                                                               if ax.get_title()]))
    report.plot(tmp_path / "a.png", summary)
    report.plot_curves(tmp_path / "b.png", summary)
    table = report.combined_markdown(summary).split("## 1-shot")[1]
    header = next(line for line in table.splitlines() if line.startswith("| Method |"))
    expected = ["ImageNet", "DTD", "EuroSAT", "my_folder"]
    assert header.split(" | ")[1:5] == expected
    assert titles[0][:4] == expected and titles[1] == [f"{d} 1-shot" for d in expected]


def test_weights_line_only_for_random_weights() -> None:
    from train_jax.report import weights_line

    assert weights_line({"DTD": {"weights_sha256": "ab12"}}) == ""
    assert weights_line({"DTD": None}) == ""  # a run that recorded no identity says nothing
    assert weights_line({"DTD": {"weights_sha256": ""}}).startswith("**Random weights**: ")
    mixed = weights_line({"EuroSAT": {"weights_sha256": ""}, "DTD": {"weights_sha256": "ab12"}})
    assert mixed.startswith("**Random weights** (EuroSAT): ")
