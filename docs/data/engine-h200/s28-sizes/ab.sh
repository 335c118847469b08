#!/bin/bash
# Decode steps compiled for their batch size (LLM's compile_sizes), against one shape-generic graph, at 128K,
# batch 1 and max (6 sequences, run in bucket 8), 8B shape, alternated in one lease (session 28, code of 60ce152).
# Usage: ab.sh STEP...; each step is
#   tests   GPU tests: captured steps against eager (also with compile sizes) and dependent launches
#   plain   bench e2e as the tables run it (compile mode default, one graph for every batch size)
#   sizes   the same with --compile-mode max-autotune-no-cudagraphs --compile-sizes 1,8
#   tuned   --compile-mode max-autotune-no-cudagraphs alone (buckets 1 and 8 share the shape-generic graph)
export PYTHONPATH=$PWD
A="--models random:llama-3.1-8b --contexts 128k --batches 1,max --methods dense,lychee,lychee+lfps --no-hf-baseline --steps 20 --warmup 3"
for step in "$@"; do
  s=$(date +%s)
  case "$step" in
    tests) timeout 280 python3 -m pytest -q tests/test_engine.py -k "graph_replays or dependent_launches" 2>&1 | tail -3 ;;
    plain|sizes|tuned) name=$step-$s
      extra=""; [ $step = sizes ] && extra="--compile-mode max-autotune-no-cudagraphs --compile-sizes 1,8"
      [ $step = tuned ] && extra="--compile-mode max-autotune-no-cudagraphs"
      timeout 330 python3 -m sparsedecode bench e2e $A $extra --out /tmp/$name > $OUT/$name.log 2>&1; echo "$name rc=$?"
      grep -E "^\| random" $OUT/$name.log | head -12; cp /tmp/$name/results.md $OUT/$name-results.md 2>/dev/null ;;
  esac
  echo "-- $step: $(( $(date +%s) - s )) s"
done
