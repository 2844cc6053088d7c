"""data.splits: CoOp split files and class-folder scans."""
import json

import pytest

from data.errors import DataError
from data.splits import read_split_json, scan_class_folders


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_read_split_json_matches_plain_loop(tmp_path):
    raw = {"train": [["b/1.jpg", 1, "dog"], ["a/1.jpg", 0, "cat"], ["c/1.jpg", 2, "hot_dog"]],
           "val": [["a/2.jpg", 0, "cat"]],
           "test": [["c/2.jpg", 2, "hot_dog"], ["b/2.jpg", 1, "dog"]]}
    classnames, splits = read_split_json(write_json(tmp_path / "split_zhou_X.json", raw))
    names = {}
    for entries in raw.values():
        for _, label, name in entries:
            names[label] = name
    assert classnames == [names[i] for i in range(3)] == ["cat", "dog", "hot_dog"]
    assert splits == {s: [(p, lab) for p, lab, _ in entries] for s, entries in raw.items()}


def test_read_split_json_missing_split_is_left_out(tmp_path):
    _, splits = read_split_json(write_json(tmp_path / "s.json", {"test": [["x.jpg", 0, "a"]]}))
    assert list(splits) == ["test"]


@pytest.mark.parametrize("content, needle", [
    ("{not json", "not a readable JSON"),
    ("[]", "expected a JSON object"),
    ('{"other": []}', "expected a JSON object"),
    ('{"train": {}}', "must be a list"),
    ('{"train": [["a.jpg", 0]]}', "is not [relpath, label, classname]"),
    ('{"train": [["a.jpg", -1, "a"]]}', "label -1"),
    ('{"train": [["a.jpg", "0", "a"]]}', "label '0'"),
    ('{"train": [["a.jpg", true, "a"]]}', "label True"),
    ('{"train": [["", 0, "a"]]}', "image path"),
    ('{"train": [["a.jpg", 0, ""]]}', "class name"),
    ('{"train": [["a.jpg", 0, "a"], ["b.jpg", 0, "b"]]}', "named both 'a' and 'b'"),
    ('{"train": [["a.jpg", 0, "a"], ["b.jpg", 2, "c"]]}', "labels [1] never occur"),
    ('{"train": []}', "no entries"),
])
def test_read_split_json_malformed(tmp_path, content, needle):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        read_split_json(path)
    message = str(err.value)
    assert needle in message and str(path) in message and "\n" not in message


def test_read_split_json_missing_file(tmp_path):
    with pytest.raises(DataError, match="split file not found"):
        read_split_json(tmp_path / "nope.json")


def test_scan_class_folders(tmp_path):
    files = ["cat/b.JPG", "cat/a.png", "cat/sub/c.jpeg", "cat/notes.txt", "dog/x.WebP", "dog/y.tif", "dog/z.gif",
             "bird/q.bmp"]
    for rel in files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    rows = scan_class_folders(tmp_path, {"dog": 0, "cat": 1})
    assert rows == [("dog/x.WebP", 0), ("dog/y.tif", 0), ("dog/z.gif", 0),
                    ("cat/a.png", 1), ("cat/b.JPG", 1), ("cat/sub/c.jpeg", 1)]
    assert scan_class_folders(tmp_path, {"bird": 5}) == [("bird/q.bmp", 5)]


def test_scan_class_folders_errors(tmp_path):
    with pytest.raises(DataError, match="image folder not found"):
        scan_class_folders(tmp_path / "missing", {"a": 0})
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"a: class folder holds no image"):
        scan_class_folders(tmp_path, {"a": 0})
    with pytest.raises(DataError, match=r"b: class folder not found"):
        scan_class_folders(tmp_path, {"b": 0})
