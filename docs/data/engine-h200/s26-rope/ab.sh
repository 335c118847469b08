#!/bin/bash
# A/B of one RoPE launch for q and k and the cos/sin table (tree "rope") against the code before it
# ("main"): main, rope, main in one lease. .carry/ab/<tree>/ holds each tree's copy of the two changed
# files (git show), swapped in between runs.
export PYTHONPATH=$PWD
use() { cp -r .carry/ab/$1/. . ; echo "== tree $1: $(md5sum sparsedecode/models/transformer.py | cut -c1-8)"; }
i=0
for t in main rope main; do
  i=$((i+1)); use $t
  timeout 175 python3 -m sparsedecode bench e2e --models random:llama-3.1-8b --contexts 128k --batches 1,max --methods lychee,lychee+lfps --no-hf-baseline --steps 20 --warmup 3 --out /tmp/e2e$i > $OUT/r$i-$t.log 2>&1; echo "e2e rc=$?"
  grep "ms/step" -A12 $OUT/r$i-$t.log | head -14
  cp /tmp/e2e$i/results.md $OUT/r$i-$t-results.md 2>/dev/null
done
use rope
