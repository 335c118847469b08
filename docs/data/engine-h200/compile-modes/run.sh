#!/bin/bash
# On the GPU machine, from the repository root: the decode step at 128K, batch 1 and max, in one of two
# modes, one call each, back to back in one lease (the lease's first compile takes about 150 s of its call):
#   default     the default compile mode
#   static      max-autotune compiled per batch bucket (static.py)
# Dependent launches (kernels.pdl) are on in both, as by default on Hopper.
export PYTHONPATH=$PWD
A="--models random:llama-3.1-8b --contexts 128k --batches 1,max --methods lychee,lychee+lfps --no-hf-baseline --steps 20 --warmup 3"
case "$1" in
  default) run="python3 -m sparsedecode bench e2e $A" ;;
  static) run="python3 docs/data/engine-h200/compile-modes/static.py bench e2e $A --compile-mode max-autotune-no-cudagraphs" ;;
  *) echo "usage: run.sh default|static"; exit 2 ;;
esac
timeout 540 $run --out /tmp/$1 > $OUT/$1.log 2>&1; echo "$1 rc=$?"
grep "ms/step (p10" $OUT/$1.log; cp /tmp/$1/results.md $OUT/$1-results.md
