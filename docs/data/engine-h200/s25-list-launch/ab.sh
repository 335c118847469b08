#!/bin/bash
# A/B of candidate/list-launch (LFPS's list calls with 3 work items per SM): main, branch, main in one lease.
# .carry/ab/<tree>/ holds each tree's copy of the files the branch changes (git show), swapped in between runs.
export PYTHONPATH=$PWD
use() { cp -r .carry/ab/$1/. . ; echo "== tree $1: $(md5sum sparsedecode/methods/lfps.py | cut -c1-8)"; }
i=0
for t in main list-launch main; do
  i=$((i+1)); use $t
  timeout 170 python3 -m sparsedecode bench e2e --models random:llama-3.1-8b --contexts 128k --batches 1,max --methods lychee,lychee+lfps --no-hf-baseline --steps 20 --warmup 3 --out /tmp/e2e$i > $OUT/l$i-$t.log 2>&1; echo "e2e rc=$?"
  grep "ms/step" $OUT/l$i-$t.log
  cp /tmp/e2e$i/results.md $OUT/l$i-$t-results.md 2>/dev/null
done
use main
