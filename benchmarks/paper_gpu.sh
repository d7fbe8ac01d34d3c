#!/usr/bin/env bash
# The paper suite (issue 22) on a lent GPU machine, inside one bounded call of the device tool.
#
#   bash benchmarks/paper_gpu.sh install              # first call: .whlA/ (polars' runtime, 52 MB)
#   bash benchmarks/paper_gpu.sh SECONDS SHARDS DATASET...   # next call, on the same warm machine
#
# That machine has Python 3.12 with torch, numpy, pyarrow, pandas and the like, but not Prefect,
# MLflow, polars or pydantic, and reaches no registry: their wheels travel in .whlA/ and .whl/
# (git-ignored; one call carries at most 64 MiB, hence two calls). The four data files travel in
# .paperdata/ (a copy of ../shared/data). Every shard is the suite's own `--shard I/N` process with
# its own Prefect home, all sharing one workspace and one MLflow database; the archive
# (docs/results/paper/runs, restored first, so finished arms are skipped) receives every arm as it
# finishes. A shard still running at the deadline gets SIGINT (its arm is lost, the others kept).
# $OUT/result.tgz brings back the archive folder and the logs.
set -u
PY=${PY:-python3}; DEVICE=${DEVICE:-cuda}  # a CPU rehearsal here: PY=<a 3.12 venv> DEVICE=cpu EXTRA=--smoke
export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/logs
pipi() { $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$@"; }
if [ -d .whlA ] && [ ! -d /tmp/siteA/polars ]; then pipi /tmp/siteA .whlA/*.whl || exit 3; fi
if [ "${1:-}" = install ]; then nvidia-smi -L; $PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"; exit 0; fi
[ -d /tmp/site/prefect ] || pipi /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:/tmp/siteA:$PWD RSIR_HOME=/tmp/ws RSIR_DATA_MIRROR=$PWD/.paperdata
budget=$1; shards=$2; shift 2
deadline=$(( $(date +%s) + budget - 40 ))  # 40 s to pack the results
ds=(); for d in "$@"; do ds+=(--dataset "$d"); done
$PY -c "import torch, polars, prefect, mlflow; assert '$DEVICE' == 'cpu' or torch.cuda.is_available(); print('torch', torch.__version__, 'polars', polars.__version__, 'prefect', prefect.__version__, 'mlflow', mlflow.__version__)" || exit 4
for d in "$@"; do $PY -m rsir.cli data fetch "$d" || exit 5; done
mkdir -p /tmp/arch && cp docs/results/paper/runs/* /tmp/arch/
{ nvidia-smi dmon -s u -d 5 || sleep infinity; } > /tmp/logs/dmon.txt 2>&1 & dmon=$!
shard() {  # I: rerun the suite while a stage waits for another shard, until the deadline
  while [ "$(date +%s)" -lt "$deadline" ]; do
    PREFECT_HOME=/tmp/prefect-$1 timeout -s INT $(( deadline - $(date +%s) )) $PY -m rsir.cli experiment paper ${EXTRA:-} \
      "${ds[@]}" --shard "$1/$shards" --device $DEVICE --threads 2 --tracking-uri sqlite:////tmp/ws/mlflow.db \
      --archive /tmp/arch >> /tmp/logs/shard$1.log 2>&1
    echo "=== rc $? $(date -u +%T)" >> /tmp/logs/shard$1.log
    tail -40 /tmp/logs/shard$1.log | grep -q "has not finished" || break
    sleep 10
  done
}
shard 0 & pids=($!)
# One restore into the shared database: the others start once shard 0 has restored the archive.
for _ in $(seq 60); do grep -q "restored" /tmp/logs/shard0.log 2>/dev/null && break; sleep 2; done
for i in $(seq 1 $(( shards - 1 ))); do shard "$i" & pids+=($!); sleep 3; done
wait "${pids[@]}"; kill $dmon
ls /tmp/arch | wc -l; tail -3 /tmp/logs/shard*.log
tar czf "$OUT/result.tgz" -C /tmp arch logs
