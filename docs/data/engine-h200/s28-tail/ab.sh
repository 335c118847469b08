#!/bin/bash
# The decode step's tail compiled (branch candidate/compiled-tail: final norm, greedy argmax, sampler) against
# main at 128K, batch 1 and max, greedy and sampled (temperature 1, an API request's default), in one lease.
# Trees: copies of the files the branch changes under .carry/ab/<tree>/, made on the development machine:
#   rm -rf .carry/ab; for t in main candidate/compiled-tail; do for f in $(git diff --name-only main
#   candidate/compiled-tail); do mkdir -p .carry/ab/${t##*/}/$(dirname $f); git show $t:$f > .carry/ab/${t##*/}/$f; done; done
# Usage: ab.sh STEP...; a step is "tests" (the branch's GPU tests) or <tree>:greedy / <tree>:sampled.
export PYTHONPATH=$PWD
use() { cp -r .carry/ab/$1/. . ; echo "== tree $1: $(md5sum sparsedecode/engine/model_runner.py | cut -c1-8)"; }
A="--models random:llama-3.1-8b --contexts 128k --batches 1,max --methods lychee,lychee+lfps --no-hf-baseline --steps 20 --warmup 3"
for step in "$@"; do
  s=$(date +%s)
  case "$step" in
    tests) use compiled-tail
      timeout 200 python3 -m pytest -q tests/test_engine.py tests/test_sampling.py -k "graph_replays or captured_buckets or compiled or dependent" 2>&1 | tail -3 ;;
    *:*) tree=${step%%:*}; mode=${step##*:}; use $tree; name=${tree}-${mode}-$s
      extra=""; [ $mode = sampled ] && extra="--temperature 1"
      timeout 200 python3 -m sparsedecode bench e2e $A $extra --out /tmp/$name > $OUT/$name.log 2>&1; echo "$name rc=$?"
      grep -E "^\| random" $OUT/$name.log | head -6; cp /tmp/$name/results.md $OUT/$name-results.md 2>/dev/null ;;
  esac
  echo "-- $step: $(( $(date +%s) - s )) s"
done
use main
