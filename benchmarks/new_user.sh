#!/bin/bash
# A new user's path, timed step by step (README "Quickstart"): a fresh clone
# of this repository, a fresh venv, empty model caches.  Usage:
#   bash benchmarks/new_user.sh [WORK_FOLDER]   (default /tmp/natvision-new-user)
# Needs git, python3, bc and chromium; prints the table of times at the end.
set -u
SRC=$(cd "$(dirname "$0")/.." && pwd)
R=${1:-/tmp/natvision-new-user}; rm -rf $R; mkdir -p $R/tmp; cd $R
export TMPDIR=$R/tmp NATVISION_MODEL_CACHE=$R/model-cache  # nothing cached from earlier runs
LOG=$R/times.txt; : > $LOG
t() { local name=$1; shift; local s=$(date +%s.%N); "$@" > $R/$name.out 2>&1; local rc=$?; local e=$(date +%s.%N); printf "%-28s rc=%s %6.1f s\n" "$name" $rc $(echo "$e - $s" | bc) >> $LOG; }
git clone -q "$SRC" $R/natvision
cd $R/natvision
t venv python3 -m venv .venv
. .venv/bin/activate
t pip_upgrade pip install -q --upgrade pip
t install_tools pip install -q '.[tools]'
echo "venv size: $(du -sh .venv | cut -f1)" >> $LOG
echo "load: $(cat /proc/loadavg)" >> $LOG
t install_duckdb_polars pip install -q duckdb polars
mkdir -p $R/work && cd $R/work
t demo_first natvision-embed --demo
t demo_second_new_folder natvision-embed --demo --output_dir demo2
cat > q.py <<'PY'
import duckdb, pandas, polars, sys
t = "natvision_demo/predictions/fungi_mobile_v1"
which = sys.argv[1]
if which == "duckdb": print(duckdb.sql(f"select uri, label, score from '{t}/*.parquet'").fetchall()[:2])
if which == "pandas": print(pandas.read_parquet(t).shape)
if which == "polars": print(polars.read_parquet(f"{t}/*.parquet").shape)
PY
t query_duckdb python q.py duckdb
t query_pandas python q.py pandas
t query_polars python q.py polars
PHOTO=$(python -c "import natvision.pipelines, os; d=os.path.join(natvision.pipelines.__path__[0],'sample_photos'); print(os.path.join(d,'chelsea_cat.jpg'))")
mkdir -p $R/elsewhere && cd $R/elsewhere
t index natvision-index --output_dir $R/work/natvision_demo --model inaturalist_v2
t search_from_elsewhere natvision-search --output_dir $R/work/natvision_demo --model inaturalist_v2 --photo $PHOTO
t report natvision-report --output_dir $R/work/natvision_demo
t report_opened chromium --headless --no-sandbox --disable-gpu --screenshot=$R/report.png --window-size=1200,2000 file://$R/work/natvision_demo/report.html
ls -la $R/report.png >> $LOG 2>&1
cat $LOG
