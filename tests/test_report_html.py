"""The report's HTML helpers (tools/report_html.py)."""

from natvision.tools import report_html


def test_cells_are_escaped_and_the_page_has_no_script():
  table = report_html.table(("a", "<b>"), [("<script>x</script>", 1)], "wide")
  assert "<script>" not in table and "&lt;script&gt;" in table
  assert "<th>&lt;b&gt;</th>" in table and 'class="wide"' in table
  page = report_html.page("t & u", [table])
  assert page.startswith("<!DOCTYPE html>")
  assert "<title>t &amp; u</title>" in page
  assert "<script" not in page and "http" not in page


def test_fmt():
  assert report_html.fmt(None) == "-"
  assert report_html.fmt(0.12345) == "0.123"
  assert report_html.fmt(3) == "3"
