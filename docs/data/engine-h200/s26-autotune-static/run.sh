#!/bin/bash
# On the GPU machine, from the repository root: the decode step at 128K with the default compile mode
# (`run.sh default`), or with max-autotune compiled per batch bucket (`run.sh static`, through static.py).
# One call each, back to back in one lease; the first compile of a lease takes about 150 s of the first.
export PYTHONPATH=$PWD
A="--models random:llama-3.1-8b --contexts 128k --batches 1,max --methods lychee,lychee+lfps --no-hf-baseline --steps 20 --warmup 3"
if [ "$1" = static ]; then
  run="python3 docs/data/engine-h200/s26-autotune-static/static.py bench e2e $A --compile-mode max-autotune-no-cudagraphs"
else
  run="python3 -m sparsedecode bench e2e $A"
fi
timeout 540 $run --out /tmp/$1 > $OUT/$1.log 2>&1; echo "$1 rc=$?"
grep "ms/step (p10" $OUT/$1.log; cp /tmp/$1/results.md $OUT/$1-results.md
