#!/usr/bin/env bash
# Makes what benchmarks/paper_gpu.sh carries to the GPU machine (Python 3.12, no registry there):
# .whlA/ (polars' runtime, one call's worth) and .whl/ (Prefect, MLflow and the rest of rsir's
# runtime that the machine lacks), both from requirements.lock, and .paperdata/ (the four benchmark
# files, gzipped). All three are git-ignored through .git/info/exclude.
set -eu
cd "$(dirname "$0")/.."
for d in /.whl/ /.whlA/ /.paperdata/; do grep -qx "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
rm -rf .whl .whlA .paperdata; mkdir -p .whl .whlA .paperdata
tmp=$(mktemp -d)
# The runtime rsir imports, the lock's versions; torch and CUDA's packages are the machine's own.
python3 - > "$tmp/req.txt" <<'PY'
import re, tomllib
wanted = {"polars", "pydantic", "typer", "tqdm", "fsspec", "psutil", "prefect", "fastapi", "mlflow", "sqlalchemy",
          "optuna"}  # optuna: the tune suite
for dep in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    if re.match(r"[A-Za-z0-9_.-]+", dep)[0].lower() in wanted:
        print(dep)
PY
grep -v '^#' requirements.lock | grep -iv '^torch\|^nvidia\|^triton' > "$tmp/constraints.txt"
plat=(); for n in 2014 1; do plat+=(--platform manylinux${n}_x86_64); done
for n in 17 24 27 28 31 34 35; do plat+=(--platform manylinux_2_${n}_x86_64); done
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -c "$tmp/constraints.txt" -r "$tmp/req.txt" -d "$tmp/w"
# Compiled packages the machine has (built against its numpy; a second copy would shadow it) and
# MLflow's split distributions, whose code the full `mlflow` wheel holds too.
for p in pyarrow scipy numpy pandas matplotlib scikit_learn pillow fonttools kiwisolver contourpy \
         mlflow_skinny mlflow_tracing; do rm -f "$tmp/w/$p"-[0-9]*.whl; done
# MLflow's UI (7 MiB of JavaScript) is not needed to track runs; without it .whl/ fits one call.
python3 - "$tmp"/w/mlflow-[0-9]*.whl <<'PY'
import sys, zipfile, os
src = sys.argv[1]; dst = src + ".tmp"
with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zo:
    for info in zi.infolist():
        if not info.filename.startswith("mlflow/server/js/"):
            zo.writestr(info, zi.read(info.filename))
os.replace(dst, src)
PY
mv "$tmp"/w/polars_runtime*.whl .whlA/; mv "$tmp"/w/*.whl .whl/
for f in "${DATA:-../shared/data}"/*.txt; do gzip -9c "$f" > ".paperdata/$(basename "$f").gz"; done
rm -rf "$tmp"; du -sh .whl .whlA .paperdata
