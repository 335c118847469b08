#!/bin/bash
# The decode step's tail compiled (branch candidate/compiled-tail: final norm, greedy argmax, sampler) against
# main, and compile sizes on top of it (candidate/compile-sizes: buckets 1 and 8, which batch 6 runs in,
# compiled for their own size with max-autotune), at 128K, batch 1 and max, in one lease.
# Trees: copies of the files the branches change under .carry/ab/<tree>/, made on the development machine:
#   rm -rf .carry/ab; for t in main candidate/compiled-tail candidate/compile-sizes; do for f in $(git diff
#   --name-only main candidate/compile-sizes); do mkdir -p .carry/ab/${t##*/}/$(dirname $f);
#   git show $t:$f > .carry/ab/${t##*/}/$f; done; done
# Usage: ab.sh STEP...; a step is "tests" (the branches' GPU tests) or <tree>:<mode>, mode greedy, sampled
# (temperature 1, an API request's default) or sizes (greedy, --compile-sizes 1,8).
export PYTHONPATH=$PWD
use() { cp -r .carry/ab/$1/. . ; echo "== tree $1: $(md5sum sparsedecode/engine/model_runner.py | cut -c1-8)"; }
A="--models random:llama-3.1-8b --contexts 128k --batches 1,max --methods lychee,lychee+lfps --no-hf-baseline --steps 20 --warmup 3"
for step in "$@"; do
  s=$(date +%s)
  case "$step" in
    tests) use compile-sizes
      timeout 200 python3 -m pytest -q tests/test_engine.py tests/test_sampling.py -k "graph_replays or captured_buckets or compiled or compile_sizes or dependent" 2>&1 | tail -3 ;;
    *:*) tree=${step%%:*}; mode=${step##*:}; use $tree; name=${tree}-${mode}-$s
      extra=""; [ $mode = sampled ] && extra="--temperature 1"; [ $mode = sizes ] && extra="--compile-sizes 1,8"
      timeout 260 python3 -m sparsedecode bench e2e $A $extra --out /tmp/$name > $OUT/$name.log 2>&1; echo "$name rc=$?"
      grep -E "^\| random" $OUT/$name.log | head -6; cp /tmp/$name/results.md $OUT/$name-results.md 2>/dev/null ;;
  esac
  echo "-- $step: $(( $(date +%s) - s )) s"
done
use main
