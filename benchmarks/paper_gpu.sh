#!/usr/bin/env bash
# Suites (the paper suite of issue 22, the tune suite of issue 26) on a lent GPU machine, inside one
# bounded call of the device tool.
#
#   bash benchmarks/paper_gpu.sh install                   # first call: .whlA/ (polars' runtime, 51 MiB)
#   bash benchmarks/paper_gpu.sh SECONDS 'JOB' 'JOB' ...   # next call, on the same warm machine
#
# A JOB is one `rsir experiment` process's arguments, the suite first, e.g.
# 'paper --dataset amazon-beauty --seed 0 --arm control/*' (the shell does not expand them: each word
# is passed as is). A suite's archive is docs/results/SUITE/runs.
# That machine has Python 3.12 with torch, numpy, pyarrow, pandas and the like, but not Prefect,
# MLflow, polars or pydantic, and reaches no registry: their wheels travel in .whlA/ and .whl/
# (git-ignored; one call carries at most 64 MiB, hence two calls; benchmarks/paper_gpu_wheels.sh
# makes them). The four data files travel gzipped in .paperdata/. Every job is its own process with
# its own Prefect home, all sharing one workspace and one MLflow database; the archive
# (docs/results/paper/runs, restored first, so finished arms are skipped) receives every arm as it
# finishes. A job whose stage waits on another job's arms is rerun until the deadline; one still
# running at the deadline gets SIGINT (its arm is lost, the others kept; a tune study keeps its
# ended trials: they are archived when its worker stops, and the next sitting resumes the study).
# Few jobs at once: beside seven others (session 15), Table 2's K = 3 fidelity arm on Sports had
# trained θ_0, θ_1 and θ_2 after 8 minutes (θ_1 2.1 min, θ_2 2.7 min, each generation ~1 min) and
# was cut in θ_3's training, twice.
# $OUT/result.tgz brings back the archive folder and the logs.
set -u
PY=${PY:-python3}; DEVICE=${DEVICE:-cuda}  # a CPU rehearsal here: PY=<a 3.12 venv> DEVICE=cpu
THREADS=${THREADS:-2}
export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/logs /tmp/paperdata
pipi() { $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$@"; }
if [ -d .whlA ] && [ ! -d /tmp/siteA/polars ]; then pipi /tmp/siteA .whlA/*.whl || exit 3; fi
if [ "${1:-}" = install ]; then nvidia-smi -L; $PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"; exit 0; fi
[ -d /tmp/site/prefect ] || pipi /tmp/site .whl/*.whl || exit 3
for f in .paperdata/*; do case $f in *.gz) gunzip -c "$f" > /tmp/paperdata/"$(basename "$f" .gz)";; *) cp "$f" /tmp/paperdata/;; esac; done
export PYTHONPATH=/tmp/site:/tmp/siteA:$PWD RSIR_HOME=/tmp/ws RSIR_DATA_MIRROR=/tmp/paperdata
budget=$1; shift
deadline=$(( $(date +%s) + budget - 40 ))  # 40 s to pack the results
$PY -c "import torch, polars, prefect, mlflow; assert '$DEVICE' == 'cpu' or torch.cuda.is_available(); print('torch', torch.__version__, 'polars', polars.__version__, 'prefect', prefect.__version__, 'mlflow', mlflow.__version__)" || exit 4
for d in $(printf '%s\n' "$@" | grep -o -- '--dataset [^ ]*' | cut -d' ' -f2 | sort -u); do $PY -m rsir.cli data fetch "$d" || exit 5; done
for suite in $(printf '%s\n' "$@" | cut -d' ' -f1 | sort -u); do
  mkdir -p /tmp/arch/$suite && cp docs/results/$suite/runs/* /tmp/arch/$suite/ 2>/dev/null
done
{ nvidia-smi dmon -s u -d 5 || sleep infinity; } > /tmp/logs/dmon.txt 2>&1 & dmon=$!
job() {  # I ARGS: rerun while a stage waits for another job's arms, until the deadline
  local i=$1; shift
  local suite=${1%% *}
  set -f  # the job's words (arm patterns) reach rsir unexpanded
  while [ "$(date +%s)" -lt "$deadline" ]; do
    echo "=== job $i: $* ($(date -u +%T))" >> /tmp/logs/job$i.log
    PREFECT_HOME=/tmp/prefect-$i timeout -s INT $(( deadline - $(date +%s) )) $PY -m rsir.cli experiment $* \
      --device $DEVICE --threads $THREADS --tracking-uri sqlite:////tmp/ws/mlflow.db \
      --archive /tmp/arch/$suite >> /tmp/logs/job$i.log 2>&1
    rc=$?; echo "=== rc $rc $(date -u +%T)" >> /tmp/logs/job$i.log
    # Only a run that ran nothing because its stage waits (StageNotReady) is worth repeating.
    [ $rc -ne 0 ] && tail -40 /tmp/logs/job$i.log | grep -q "has not finished" || break
    sleep 10
  done
}
# One restore of each suite's archive into the shared database: a suite's first job starts alone,
# the next jobs once it has restored.
i=0; pids=(); restored=" "
for spec in "$@"; do
  job "$i" "$spec" & pids+=($!)
  suite=${spec%% *}
  if [ "${restored#* $suite }" = "$restored" ]; then
    for _ in $(seq 60); do grep -q "restored" /tmp/logs/job$i.log 2>/dev/null && break; sleep 2; done
    restored="$restored$suite "
  else sleep 3; fi
  i=$((i + 1))
done
wait "${pids[@]}"; kill $dmon
ls /tmp/arch/* | wc -l; for f in /tmp/logs/job*.log; do tail -n 3 "$f"; done
tar czf "$OUT/result.tgz" -C /tmp arch logs
