"""The one Jinja2 environment factory: seeds, iPXE, dnsmasq, Packer templates, autoinstall.

StrictUndefined everywhere, and a template error names the template's file and line.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2

from .node.seed import Role

ROOT = Path(__file__).resolve().parent.parent


class TemplateError(Exception):
    """A bug in a template: names the template file and line."""


def yaml_block(text: str, indent: int) -> str:
    """A YAML literal block scalar of text, indented for a value at column `indent`.

    Readable where tojson would give one long line; clip chomping keeps one final newline.
    """
    if not text.endswith("\n") or text.endswith("\n\n") or text[:1].isspace():
        raise ValueError("yaml_block takes text with exactly one final newline and no leading space")
    pad = " " * indent
    return "|\n" + "".join(pad + line if line.strip() else "\n"
                            for line in text.splitlines(True)).rstrip("\n")


def environment(dirs: Sequence[Path]) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([str(d) for d in dirs]),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters["b64encode"] = lambda data: base64.b64encode(data).decode()
    # JSON strings are YAML strings: quoting any value this way is always safe.
    env.filters["tojson"] = lambda value: json.dumps(value, ensure_ascii=False)
    env.filters["block"] = yaml_block
    env.globals["Role"] = Role
    return env


def render(env: jinja2.Environment, name: str, **context: Any) -> str:
    try:
        return env.get_template(name).render(**context)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{exc.filename}:{exc.lineno}: {exc.message}") from None
    except jinja2.TemplateError as exc:
        raise TemplateError(f"{_template_location(exc, name)}: {exc}") from None


def _template_location(exc: BaseException, name: str) -> str:
    # Jinja rewrites tracebacks so that template frames carry the template's file and line.
    tb = exc.__traceback__
    where = name
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename.endswith(".j2"):
            where = f"{filename}:{tb.tb_lineno}"
        tb = tb.tb_next
    return where
