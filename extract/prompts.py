"""Prompt templates stored in a cache: the dataset's own first, then the ImageNet ensemble, then the user's."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from data.registry import ensemble_templates
from extract.errors import ExtractError, unreadable


def check_template(template: str, source: str) -> str:
    """Return `template` if it has a `{}` for the class name and formats cleanly, else raise ExtractError."""
    try:
        ok = "{}" in template and template.format("x") is not None
    except (IndexError, KeyError, ValueError):
        ok = False
    if not ok:
        raise ExtractError(f"{source}: template {template!r} needs exactly the placeholder '{{}}' where the class "
                           "name goes (and no other braces), e.g. 'a photo of a {}.'")
    return template


def read_templates_file(path: str | Path) -> list[str]:
    """One template per line; blank lines and lines starting with '#' are ignored."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ExtractError(f"{path}: cannot read the templates file ({unreadable(e)}); check --templates-file") \
            from None
    templates = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not templates:
        raise ExtractError(f"{path}: no templates in the file; write one template such as 'a photo of a {{}}.' a line")
    return [check_template(t, str(path)) for t in templates]


def cache_templates(dataset_templates: Iterable[str], user_templates: Iterable[str] = ()) -> list[str]:
    """The templates of a cache, deduplicated in order: dataset's own (templates[0] is its main one), the
    7-template ensemble, the user's."""
    dataset_templates = list(dataset_templates)
    if not dataset_templates:
        raise ExtractError("the dataset defines no prompt template; pass --template 'a photo of a {}.'")
    out: list[str] = []
    for template in [dataset_templates[0], *ensemble_templates(), *dataset_templates[1:], *user_templates]:
        if check_template(template, "prompt templates") not in out:
            out.append(template)
    return out
