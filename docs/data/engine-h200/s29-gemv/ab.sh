#!/bin/bash
# The decode step's linear layers through kernels.gemv against cuBLAS, at 128K, batch 1 and max (6 sequences,
# bucket 8), 8B shape, alternated in one lease; and max-autotune from cold caches, profiled (session 28's
# open question: one cold max-autotune run was 0.3 ms faster at batch 1, warm runs were not); and sampled
# steps with and without the vocabulary sort.
# Usage: ab.sh STEP...; each step is
#   tests    GPU tests: gemv against its reference (and the custom op), captured steps against eager
#            (also with decode_linear gemv), dependent launches
#   kernel   bench kernel --gemv (each layer as 32 calls in one CUDA graph)
#   plain    bench e2e as the tables run it, with --decode-linear torch (cuBLAS)
#   gemv     the same with --decode-linear gemv
#   fused    the same with --decode-linear gemv-fused (norms, residual sums, SiLU-and-mul and RoPE in the gemv kernels)
#   sampled  --temperature 1: sampled rows that filter nothing, by Gumbel-max without the vocabulary sort
#   filtered --temperature 1 --top-p 0.9999: the same rows through the filtering path (sort, softmax, cumsum)
#   cold     --compile-mode max-autotune-no-cudagraphs --profile with Inductor's caches off
#   warm     the same with its caches on (run after cold)
export PYTHONPATH=$PWD
A="--models random:llama-3.1-8b --contexts 128k --batches 1,max --methods dense,lychee,lychee+lfps --no-hf-baseline --steps 20 --warmup 3"
for step in "$@"; do
  s=$(date +%s)
  case "$step" in
    tests) timeout 300 python3 -m pytest -q tests/test_gemv.py tests/test_engine.py -k "gemv or graph_replays or dependent_launches or custom_op or prologue" 2>&1 | tail -3 ;;
    kernel) timeout 200 python3 -m sparsedecode bench kernel --gemv 2>&1 | grep -v Warning | tee $OUT/kernel-gemv-$s.md ;;
    plain|gemv|fused|sampled|filtered|cold|warm) name=$step-$s; extra=""
      [ $step = plain ] && extra="--decode-linear torch"
      [ $step = gemv ] && extra="--decode-linear gemv"
      [ $step = fused ] && extra="--decode-linear gemv-fused"
      [ $step = sampled ] && extra="--temperature 1"
      [ $step = filtered ] && extra="--temperature 1 --top-p 0.9999"
      [ $step = cold ] || [ $step = warm ] && extra="--compile-mode max-autotune-no-cudagraphs --profile"
      if [ $step = cold ]; then export TORCHINDUCTOR_FORCE_DISABLE_CACHES=1; else unset TORCHINDUCTOR_FORCE_DISABLE_CACHES; fi
      timeout 330 python3 -m sparsedecode bench e2e $A $extra --out /tmp/$name > $OUT/$name.log 2>&1; echo "$name rc=$?"
      grep -E "^\| random" $OUT/$name.log | head -12; cp /tmp/$name/results.md $OUT/$name-results.md 2>/dev/null ;;
  esac
  echo "-- $step: $(( $(date +%s) - s )) s"
done
