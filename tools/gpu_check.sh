#!/usr/bin/env bash
# The prepared GPU check; tools/gpu_check.py does the work. docs/GPU.md says how to use it.
#   ./gpu_check.sh --prepare          (here, online) fill gpu_assets/: the default model in two
#                                     parts, the gguf and pytest wheels, MT-Bench, a ShareGPT excerpt
#   ./gpu_check.sh OUT [--device cpu] (on the GPU, offline) join and sha256-check the model, then
#                                     run gpu_check.py with whatever gpu_assets/ holds
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root: gpu_assets/ and the scripts live there
A=gpu_assets
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  # SmolLM2-135M-Instruct.Q4_1.gguf

if [ "${1:-}" = "--prepare" ]; then
  mkdir -p $A
  split -b 60M "$(python -c 'from weights import default_model_path as p; print(p())')" $A/model.gguf.part-
  pip download --no-deps --quiet gguf==0.19.0 pytest pluggy iniconfig packaging pygments -d $A/wheels
  cp "$(python -c 'from data import mtbench_path as p; print(p())')" $A/question.jsonl
  python -c "import itertools, json, sys; from data import iter_records, sharegpt_path
json.dump(list(itertools.islice(iter_records(sharegpt_path()), 1500)), open(sys.argv[1], 'w'))" $A/sharegpt.json
  ls -l $A
  exit 0
fi

extra=()
if [ ! -f $A/model.gguf ] && ls $A/model.gguf.part-* > /dev/null 2>&1; then
  cat $A/model.gguf.part-* > $A/model.gguf          # the parts sort in order: -aa, -ab
fi
if [ -f $A/model.gguf ]; then
  echo "$SHA  $A/model.gguf" | sha256sum -c - || { echo "error: $A/model.gguf is not the default model"; exit 1; }
  extra+=(--model $A/model.gguf)
fi
for whl in $A/wheels/gguf-*.whl; do  # gguf is pure Python: import it straight from its wheel
  [ -f "$whl" ] && export PYTHONPATH="$PWD/$whl${PYTHONPATH:+:$PYTHONPATH}"
done
python -c "import pytest" 2> /dev/null || pip install --quiet --no-index --find-links $A/wheels pytest \
  || echo "note: no pytest here and none in $A: the tests section will fail"
[ -f $A/question.jsonl ] && extra+=(--mtbench $A/question.jsonl)
[ -f $A/sharegpt.json ] && extra+=(--sharegpt $A/sharegpt.json)
exec python tools/gpu_check.py "$@" ${extra[@]+"${extra[@]}"}
