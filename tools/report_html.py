"""The report's HTML: escaping, tables, figures of text, the page.

The page needs no network access and no script: the styles are inline and
every plot (tools/report_plots.py) is a PNG embedded as a data URI.
"""

from __future__ import annotations

import html
from typing import Optional, Sequence

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;
margin:2em auto;max-width:60em;padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;
margin-top:2em}table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;
vertical-align:top}th{background:#f3f3f3}table.wide td{overflow-wrap:break-word}
table.wide td:last-child{overflow-wrap:anywhere}
figure.plot{margin:1em 0}figure.plot img{max-width:100%;height:auto;
border:1px solid #eee}figcaption{font-size:.85em;color:#555}
.note{color:#555;font-size:.9em}.warning{background:#fff3cd;padding:.5em}
code{background:#f3f3f3;padding:0 .2em}
"""


def e(text) -> str:
  """``text`` (any value, as ``str``) escaped for HTML text and attributes."""
  return html.escape(str(text), quote=True)


def table(header: Optional[Sequence[str]], rows: Sequence[Sequence],
          cls: str = "") -> str:
  """A ``<table>`` of ``rows`` under ``header`` (None: no header row),
  every cell escaped."""
  head = "".join(f"<th>{e(h)}</th>" for h in header or ())
  body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>"
                 for row in rows)
  thead = f"<thead><tr>{head}</tr></thead>" if head else ""
  return f'<table class="{cls}">{thead}<tbody>{body}</tbody></table>'


def fmt(value, digits: int = 3) -> str:
  """``-`` for None, a float to ``digits`` decimals, anything else as str."""
  if value is None:
    return "-"
  if isinstance(value, float):
    return f"{value:.{digits}f}"
  return str(value)


def page(title: str, body: Sequence[str]) -> str:
  """The whole document: ``<!DOCTYPE html>``, the title, STYLE, ``body``."""
  return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
          f"<title>{e(title)}</title>"
          "<meta name='viewport' content='width=device-width, "
          "initial-scale=1'>"
          f"<style>{STYLE}</style></head><body>{''.join(body)}"
          "</body></html>\n")
