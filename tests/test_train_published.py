"""Measured beside published: summary rows of a matching dataset/model/method/prompt/shots get the published value
and Δ; a zero-shot Δ beyond 1 point is flagged in results.md, summary.md and on the terminal with what to check;
a run of an unpublished model gets no published section."""

import json

from helpers_train import GapWorld, write_gap_cache
from train_jax import published, report
from train_jax.__main__ import main

RN50 = {"model": "RN50-quickgelu", "pretrained": "openai", "weights_sha256": "f" * 64, "activation": "quick_gelu",
        "preprocess": json.dumps({"image_size": 224, "interpolation": "bicubic"})}


def _row(method, shots, mean, dataset="OxfordPets"):
    return {"dataset": dataset, "method": method, "shots": shots, "test_mean": mean, "test_std": 0.0, "seeds": [1]}


def test_annotate_delta_and_zero_shot_flag():
    rows = [_row("zeroshot", 1, 85.0), _row("zeroshot", 2, 85.0), _row("tip_adapter_f", 16, 80.0),
            _row("cmm", 16, 90.0), _row("zeroshot", 1, 42.0, "DTD")]
    published.annotate(rows, RN50, "single")
    assert rows[0]["published"]["accuracy"] == 85.77 and abs(rows[0]["published"]["delta"] + 0.77) < 1e-9
    assert not rows[0]["published"]["suspect"]  # within 1 point
    assert rows[2]["published"]["accuracy"] == 89.70 and not rows[2]["published"]["suspect"]  # few-shot: never
    assert "published" not in rows[3]  # nothing published for CMM
    assert rows[4]["published"]["accuracy"] == 42.32 and not rows[4]["published"]["suspect"]
    rows[4].pop("published")
    rows[4]["test_mean"] = 40.0
    published.annotate(rows[4:], RN50, "single")
    assert rows[4]["published"]["suspect"]  # 2.32 points below
    text = published.markdown(rows)
    assert "| OxfordPets | zeroshot | any | 85.00 | 85.77 | -0.77 |" in text  # zero-shot once per dataset
    assert text.count("| OxfordPets | zeroshot |") == 1 and "| OxfordPets | tip_adapter_f | 16 | 80.00 | 89.70 |" in text
    assert "| DTD | zeroshot | any | 40.00 | 42.32 | -2.32 ⚠ |" in text
    [line] = published.warnings(rows)
    assert line.startswith("DTD zero-shot 40.00% is -2.32 points from the published 42.32%")
    for what in ("weights file and activation", "quick_gelu", "preprocessing", "bicubic", "templates", "class names"):
        assert what in line


def test_no_match_no_section():
    rows = [_row("zeroshot", 1, 85.0)]
    published.annotate(rows, {**RN50, "pretrained": "laion2b", "weights_sha256": ""}, "single")  # other weights
    published.annotate(rows, RN50, "ensemble")  # other template choice
    assert "published" not in rows[0] and published.markdown(rows) == "" and published.warnings(rows) == []


def test_cli_flags_a_zero_shot_far_from_the_published(tmp_path, capsys):
    """A synthetic cache claiming OpenAI's RN50 on OxfordPets: its zero-shot accuracy is far from CoOp's 85.77."""
    world = GapWorld(0, classes=5, dim=16)
    cache = write_gap_cache(tmp_path / "pets.h5", world, train=3, val=2, test=6, dataset="OxfordPets", attrs=RN50)
    out = tmp_path / "run"
    assert main(["--cache", str(cache), "--out", str(out), "--shots", "1", "2", "--seeds", "1",
                 "--methods", "zeroshot", "cmm", "--grid", "epochs=2", "--prompt", "single"]) == 0
    err = capsys.readouterr().err
    assert err.count("OxfordPets zero-shot") == 1 and "likely an extraction problem" in err
    md = (out / "results.md").read_text()
    assert "## Published (RN50/openai)" in md and "| OxfordPets | zeroshot | any |" in md and "⚠" in md
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert all(r["published"]["suspect"] for r in summary if r["method"] == "zeroshot")
    combined = report.combine([out], tmp_path / "results")
    assert "⚠" in (combined / "summary.md").read_text()


def test_cli_unpublished_model_has_no_section(tmp_path):
    cache = write_gap_cache(tmp_path / "pets.h5", GapWorld(0, classes=5, dim=16), train=3, val=2, test=6,
                            dataset="OxfordPets")
    out = tmp_path / "run"
    assert main(["--cache", str(cache), "--out", str(out), "--shots", "1", "--seeds", "1", "--methods", "zeroshot",
                 "--prompt", "single"]) == 0
    assert "Published" not in (out / "results.md").read_text()
