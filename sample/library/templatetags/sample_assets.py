"""``{% powercrud_bundle %}``: load powercrud's packaged front-end bundle without a build step.

powercrud ships a pre-built Vite bundle (HTMX, Tom Select, Tippy, its runtime and the DaisyUI
styles its templates use) in ``powercrud/assets`` with a Vite ``manifest.json``; the settings
add that folder to ``STATICFILES_DIRS``. This tag reads the manifest and writes the tags that
``django-vite`` would write in production mode, so the sample needs no Node and no extra
package.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

from django import template
from django.templatetags.static import static
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

register = template.Library()

ENTRY = "config/static/js/main.js"


@lru_cache(maxsize=1)
def _manifest() -> dict:
    path = resources.files("powercrud").joinpath("assets", "manifest.json")
    return json.loads(path.read_text(encoding="utf-8"))


def _chunks(manifest: dict, name: str, seen: set[str]) -> list[dict]:
    """The chunk ``name`` after everything it imports (depth first, each once)."""
    if name in seen or name not in manifest:
        return []
    seen.add(name)
    out: list[dict] = []
    for dependency in manifest[name].get("imports", []):
        out.extend(_chunks(manifest, dependency, seen))
    out.append(manifest[name])
    return out


@register.simple_tag
def powercrud_bundle(entry: str = ENTRY) -> str:
    manifest = _manifest()
    if entry not in manifest:
        raise template.TemplateSyntaxError(f"{entry!r} is not in powercrud's asset manifest")
    chunks = _chunks(manifest, entry, set())
    styles: list[str] = []
    for chunk in chunks:
        for css in chunk.get("css", []):
            if css not in styles:
                styles.append(css)
    preloads = [chunk["file"] for chunk in chunks[:-1]]
    parts = [
        format_html_join("\n", '<link rel="stylesheet" href="{}">', ((static(c),) for c in styles)),
        format_html_join(
            "\n", '<link rel="modulepreload" href="{}">', ((static(f),) for f in preloads)
        ),
        format_html('<script type="module" src="{}"></script>', static(chunks[-1]["file"])),
    ]
    return mark_safe("\n".join(str(p) for p in parts if p))
