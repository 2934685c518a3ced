"""MkDocs hooks (``mkdocs.yml``: ``hooks``): pages generated from the code, so they cannot drift from it.

- ``<!-- tokensparse:cli -->``: the ``--help`` of ``tokensparse`` and of every command, from the argparse
  parsers ``tokensparse.cli.build_parser`` builds;
- ``<!-- tokensparse:options NAME -->``: a table of method NAME's options, defaults and help, and the
  model families it supports, from the method registry;
- in every page's HTML, the Sphinx roles of the docstrings (``:func:``, ``:class:``, ...) are dropped,
  their code spans kept, so the API reference shows no raw markup.
"""
from __future__ import annotations

import argparse
import os
import re

MARK_CLI = "<!-- tokensparse:cli -->"
MARK_OPTIONS = re.compile(r"<!-- tokensparse:options (\w+) -->")


def cli_reference() -> str:
    """Markdown: the help text of ``tokensparse`` and of each command."""
    os.environ["COLUMNS"] = "100"  # argparse wraps help to the terminal width: one width for the site
    from tokensparse.cli import build_parser

    parser = build_parser()
    parts = ["### tokensparse", "", "```text", parser.format_help().rstrip(), "```", ""]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        parts += [f"### tokensparse {name}", "", "```text", command.format_help().rstrip(), "```", ""]
    return "\n".join(parts)


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def options_table(name: str) -> str:
    """Markdown: method ``name``'s options (default, help) and the families it supports."""
    from tokensparse.methods import get_method, method_info

    info = method_info(get_method(name))
    rows = ["| option | default | what it does |", "|---|---|---|"]
    rows += [f"| `{o.name}` | `{_cell(o.default)}` | {_cell(o.help)} |" for o in info.options]
    families = ", ".join(f"`{f}`" for f in info.families) or "none"
    return "\n".join(rows) + f"\n\nModel families: {families}." + (
        " Its learned parts must be trained first." if info.needs_training else "")


def on_page_markdown(markdown: str, page: object, config: object, files: object) -> str:
    if MARK_CLI in markdown:
        markdown = markdown.replace(MARK_CLI, cli_reference())
    return MARK_OPTIONS.sub(lambda m: options_table(m.group(1)), markdown)


ROLE = re.compile(r":(?:func|class|data|mod|meth|attr|exc|obj):(?=<code)")


def on_page_content(html: str, page: object, config: object, files: object) -> str:
    """Docstrings use Sphinx roles (``:func:`patch```): keep the code span, drop the role and a leading ``~``."""
    return ROLE.sub("", html).replace("<code>~", "<code>")
