"""python -m data: thin CLI over the registry (offline commands only)."""
import subprocess
import sys
from pathlib import Path

from data.__main__ import main

REPO = Path(__file__).resolve().parents[1]


def test_list(capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 16 and lines[0].startswith("ImageNet ") and "{} texture." in lines[8]
    assert main(["list", "--group", "shift"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == [
        "ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR"]


def test_info(capsys):
    assert main(["info", "eurosat"]) == 0
    out = capsys.readouterr().out
    assert "DATA/eurosat/2750" in out and "split_zhou_EuroSAT.json" in out and "a centered satellite" in out
    assert "drive.google.com" in out and "torchvision.datasets.EuroSAT" in out


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["check", "DTD", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'dtd'}: not found") and err.count("\n") == 1
    assert main(["info", "cifar10"]) == 2
    assert "unknown dataset 'cifar10'" in capsys.readouterr().err
    assert main(["download", "ImageNetA", "--root", str(tmp_path)]) == 2
    assert "cannot be downloaded automatically" in capsys.readouterr().err


def test_module_entry_point():
    run = subprocess.run([sys.executable, "-m", "data", "info", "NOPE"], capture_output=True, text=True,
                         cwd=REPO)
    assert run.returncode == 2 and run.stderr.startswith("error: unknown dataset 'NOPE'")
    assert "Traceback" not in run.stderr
