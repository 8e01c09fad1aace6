"""Run reports: written by the jobs, rebuilt by natvision-report, shown in
a real browser.

The embed job over labelled crops (tests/conftest.py ``labelled_job``)
writes OUT/report.html itself; natvision-evaluate and natvision-report then
rebuild it with the evaluation.  The report is opened in headless Chromium
(Debian's chromium and chromium-driver, driven by Selenium on loopback):
it must load from disk without any network request or console error, and
every plot must have a size.  An ingestion run writes one report per
partition.
"""

import collections
import json
import os
import re
import shutil

import pytest

from natvision.pipelines import embed_images
from natvision.tools import evaluate
from natvision.tools import report
from tests import report_helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="headless Chromium is not installed (Debian packages chromium and "
    "chromium-driver; .ci/run installs them)")


@pytest.fixture(scope="module")
def out(labelled_job, tmp_path_factory):
  """A copy of the job's output (this module writes evaluation.json)."""
  copy = str(tmp_path_factory.mktemp("report") / "out")
  shutil.copytree(labelled_job["out"], copy)
  return copy


@pytest.fixture(scope="module")
def rebuilt(out):
  """natvision-evaluate, then natvision-report coloured by species."""
  assert evaluate.main(["--output_dir", out, "--label_column",
                        "species"]) == 0
  assert report.main(["--output_dir", out, "--color_column", "species"]) == 0
  with open(os.path.join(out, "report.html"), encoding="utf-8") as f:
    page = f.read()
  with open(os.path.join(out, "evaluation.json")) as f:
    return page, json.load(f)


def _plots(page):
  return re.findall(r'<figure class="plot" id="plot-([^"]+)">', page)


def _section(page, name):
  match = re.search(rf"<section[^>]*id='{name}'.*?</section>", page, re.S)
  assert match, name
  return match.group(0)


def test_the_commands_hand_the_jobs_this_writer(tiny_models, photo_dir,
                                                 tmp_path):
  # pipelines/ never import tools/ (tests/test_imports.py): the commands
  # start here and hand the job this module's writer; a job run without
  # one (embed_images.run, python -m pipelines.embed_images) writes none.
  flags = ["--input", os.path.join(photo_dir, "*.jpg"), "--models",
           "inaturalist_v2", "--model_root", tiny_models, "--runtime", "tf"]
  bare, command = str(tmp_path / "bare"), str(tmp_path / "command")
  embed_images.run(flags + ["--output_dir", bare])
  assert os.path.exists(os.path.join(bare, "run.json"))
  assert not os.path.exists(os.path.join(bare, "report.html"))
  assert report.embed_main(flags + ["--output_dir", command]) == 0
  assert os.path.exists(os.path.join(command, "report.html"))
  with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
    setup = f.read()
  assert '"natvision-embed=natvision.tools.report:embed_main"' in setup
  assert '"natvision-ingest=natvision.tools.report:ingest_main"' in setup


def test_the_job_writes_the_report(labelled_job):
  path = os.path.join(labelled_job["out"], "report.html")
  with open(path, encoding="utf-8") as f:
    page = f.read()
  assert page.startswith("<!DOCTYPE html>")
  # No plot over time (the tables do not say when a photo was done), no
  # bars for a single stage of errors, top labels only when their counts
  # differ.
  import collections  # pylint: disable=import-outside-toplevel
  import pyarrow.dataset as ds  # pylint: disable=import-outside-toplevel
  top = collections.Counter(ds.dataset(os.path.join(
      labelled_job["out"], "predictions", "fungi_mobile_v1")).to_table(
          columns=["label"]).column("label").to_pylist()).most_common(15)
  differ = len({c for _, c in top}) > 1
  assert _plots(page) == [
      "timings", "sizes"] + (["fungi_mobile_v1-top-labels"] if differ
                             else []) + [
      "fungi_mobile_v1-scores", "inaturalist_v2-projection",
      "inception_resnet_v2-projection"]
  # The one rate of the page is the summary's.
  rates = re.findall(r"<td>photos per second</td><td>([^<]*)</td>", page)
  assert rates == [f"{labelled_job['report']['images_per_second']:.2f}"]
  assert "rows per second" not in page
  # The run's figures, as text: the photo whose file is missing is the one
  # error, at stage read, with its URI as the example.
  errors = _section(page, "errors")
  assert "1 error row(s) for 1 photo(s)" in errors
  assert "deleted.jpg" in errors and "<td>read</td>" in errors
  run = labelled_job["report"]
  assert f"<td>{run['inputs']}</td>" in _section(page, "run")
  for name in ("inaturalist_v2", "fungi_mobile_v1", "inception_resnet_v2"):
    assert re.search(rf"<td>{name}</td><td>(embedder|classifier)</td>"
                     r"<td>tf</td>", page), name
  assert "No evaluation.json" in page
  # Sizes come from the tables' columns (crops were at most 480 px).
  sizes = _section(page, "sizes")
  assert "source_width and source_height columns" in sizes
  assert re.search(r"<td>width \(px\)</td><td>\d+</td><td>\d+</td>"
                   r"<td>480</td>", sizes)


def test_classifier_section_counts_top1_labels(labelled_job):
  import pyarrow.dataset as ds  # pylint: disable=import-outside-toplevel
  with open(os.path.join(labelled_job["out"], "report.html"),
            encoding="utf-8") as f:
    section = _section(f.read(), "classifier-fungi_mobile_v1")
  labels = ds.dataset(os.path.join(labelled_job["out"], "predictions",
                                   "fungi_mobile_v1")).to_table(
                                       columns=["label"]).column(
                                           "label").to_pylist()
  top = max(set(labels), key=lambda l: (labels.count(l), l))
  assert f"<td>{top}</td><td>{labels.count(top)}</td>" in section
  assert f"{len(labels)} photo(s)" in section


def test_rebuilt_report_has_the_evaluation_as_text_and_plot(rebuilt):
  page, evaluation = rebuilt
  section = _section(page, "evaluation")
  assert "evaluation" in _plots(page)
  for name, m in evaluation["models"].items():
    row = re.search(rf"<tr><td>{name}</td><td>{m['kind']}</td><td>label</td>"
                    r"(.*?)</tr>", section).group(1)
    cells = re.findall(r"<td>([^<]*)</td>", row)
    assert cells[0] == str(m["photos"]) and cells[1] == str(m["skipped"])
    assert cells[2] == f"{m['recall_at_k']['1']:.3f}"
    assert cells[4] == f"{m['macro_recall_at_k']['1']:.3f}"
  # The projection is coloured by the column asked for.
  assert "coloured by <code>species</code>" in _section(
      page, "embedder-inaturalist_v2")


def test_report_without_matplotlib_keeps_the_text(out, monkeypatch):
  monkeypatch.setattr(report.Plots, "__init__", _no_matplotlib)
  page = report.build_report(out)
  assert not _plots(page)
  assert "matplotlib is not installed" in page
  assert "1 error row(s) for 1 photo(s)" in page


def _no_matplotlib(self):
  self.available, self._figure, self.count = False, None, 0


def test_a_failing_report_is_logged_and_never_raises(tmp_path, caplog):
  (tmp_path / "run.json").write_text("{not json")
  with caplog.at_level("ERROR", logger="natvision.report"):
    assert report.write_report(str(tmp_path)) is None
  assert "COULD NOT BE WRITTEN" in caplog.text
  assert "natvision-report --output_dir" in caplog.text
  with pytest.raises(json.JSONDecodeError):
    report.write_report(str(tmp_path), raise_errors=True)


@needs_chromium
def test_report_renders_in_chromium_offline(rebuilt, out, tmp_path):
  from selenium import webdriver  # pylint: disable=import-outside-toplevel
  from selenium.webdriver.chrome.options import Options  # pylint: disable=import-outside-toplevel
  from selenium.webdriver.chrome.service import Service  # pylint: disable=import-outside-toplevel
  os.environ["SE_OFFLINE"] = "true"  # Selenium Manager never downloads
  options = Options()
  options.binary_location = CHROMIUM
  for flag in ("--headless", "--no-sandbox", "--disable-gpu",
               "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}",
               "--window-size=1200,900"):
    options.add_argument(flag)
  options.set_capability("goog:loggingPrefs",
                         {"browser": "ALL", "performance": "ALL"})
  driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER),
                            options=options)
  try:
    url = "file://" + os.path.join(out, "report.html")
    driver.get(url)
    assert driver.title.startswith("natvision run report")
    plots = driver.execute_script("""
      return Array.from(document.querySelectorAll('figure.plot')).map(f => {
        const r = f.getBoundingClientRect();
        const img = f.querySelector('img');
        return {id: f.id, width: r.width, height: r.height,
                natural: img ? img.naturalWidth * img.naturalHeight : 0,
                complete: img ? img.complete : false};
      });""")
    console = driver.get_log("browser")
    requests = [json.loads(e["message"])["message"]
                for e in driver.get_log("performance")]
    text = driver.find_element("id", "evaluation").text
  finally:
    driver.quit()
  page, evaluation = rebuilt
  assert [p["id"] for p in plots] == ["plot-" + n for n in _plots(page)]
  assert len(plots) >= 6
  for plot in plots:
    assert plot["complete"] and plot["natural"] > 0, plot
    assert plot["width"] > 100 and plot["height"] > 50, plot
  assert [e for e in console if e["level"] == "SEVERE"] == []
  urls = [m["params"]["request"]["url"] for m in requests
          if m["method"] == "Network.requestWillBeSent"]
  # Only the file itself and its data: URIs (the browser's own chrome://
  # pages aside); nothing over the network.
  page_urls = [u for u in urls if not u.startswith("chrome")]
  assert url in page_urls
  assert all(u.startswith(("file:", "data:")) for u in page_urls), page_urls
  recall = evaluation["models"]["inaturalist_v2"]["recall_at_k"]["1"]
  assert f"{recall:.3f}" in text


def test_ingestion_writes_a_report_per_partition(tiny_models, tmp_path):
  """Two snapshots, two partitions, two reports; evaluate reads both."""
  from natvision.pipelines import ingest_observations  # pylint: disable=import-outside-toplevel
  from tests.snapshot_gen import SPECIES, SyntheticINat  # pylint: disable=import-outside-toplevel
  world = SyntheticINat(str(tmp_path / "world"), seed=11)
  out = str(tmp_path / "out")
  dates = ("2024-03-03", "2024-03-10")
  for date, species in zip(dates, (("raven", "daisy", "raven"),
                                   ("daisy", "bolete", "raven"))):
    for name in species:
      world.observe(SPECIES[name])
    snapshot = world.write_snapshot(date, fmt="csv")
    ingest_observations.run([
        "--snapshot_dir", snapshot, "--photo_uri_template", world.template,
        "--snapshot_date", date, "--output_dir", out, "--models",
        "inaturalist_v2", "--model_root", tiny_models, "--runtime", "tf",
        "--batch_size", "4"], report_writer=report.write_after_run)
  for date in dates:
    with open(os.path.join(out, "runs", f"{date}.html"),
              encoding="utf-8") as f:
      page = f.read()
    assert f"snapshot_date={date}" in page
    # One model row, read from either job's summary the same way: rows
    # committed, and (ingestion only) photos new to the model.
    assert re.search(r"<td>inaturalist_v2</td><td>embedder</td><td>tf</td>"
                     r"<td>\w+</td><td>64</td><td>3</td><td>3</td>",
                     _section(page, "run")), _section(page, "run")
    assert "inaturalist_v2-projection" in _plots(page)
  # natvision-report rebuilds the latest partition's report by default.
  os.remove(os.path.join(out, "runs", f"{dates[1]}.html"))
  assert report.main(["--output_dir", out]) == 0
  assert os.path.exists(os.path.join(out, "runs", f"{dates[1]}.html"))
  # natvision-evaluate reads both partitions with the observation columns.
  got = evaluate.evaluate(evaluate.EvaluateConfig(
      output_dir=out, label_column="taxon_id", write=False))
  m = got["models"]["inaturalist_v2"]
  assert m["photos"] + m["skipped"] == 6
  assert m["skipped_labels"] == {str(SPECIES["bolete"]): 1}


@pytest.mark.parametrize("version", [1, 2])
def test_an_earlier_partitions_summary_is_read_whatever_its_version(
    tmp_path, version):
  # A report of an earlier partition reads the summary that run wrote,
  # before version 2 too (models a dict of counts, model_details a list).
  runs = tmp_path / "runs"
  runs.mkdir()
  raw = (report_helpers.ingest_summary_v1() if version == 1
         else report_helpers.ingest_summary())
  (runs / "2024-03-03.json").write_text(json.dumps(raw))
  page = report.build_report(str(tmp_path), "2024-03-03")
  run = _section(page, "run")
  assert "<td>partition</td><td>snapshot_date=2024-03-03</td>" in run
  assert ("<td>inaturalist_v2</td><td>embedder</td><td>tf</td>"
          "<td>center_crop</td><td>64</td><td>8</td>"
          "<td>9</td><td>3</td><td>1</td>") in run
