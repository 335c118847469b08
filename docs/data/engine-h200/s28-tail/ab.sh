#!/bin/bash
# Session 27's candidates for issue 23 against main at 128K, batch 1 and max, in one lease:
#   compiled-tail        the step's final norm, greedy argmax and sampler compiled (candidate/compiled-tail)
#   compile-sizes        on top of it, buckets 1 and 8 (batch 6 runs in 8) compiled for their own size with
#                        max-autotune (candidate/compile-sizes; mode "sizes" passes --compile-sizes 1,8)
#   unfiltered-sampling  on top of compiled-tail, sampled rows without top-k / top-p / min-p choose by
#                        Gumbel-max without sorting the vocabulary (candidate/unfiltered-sampling)
#   pdl-fill             the block-score fill as a Triton launch in the dependent-launch chain (candidate/pdl-fill)
# Trees: copies of the files each branch changes, and main's copies of all of them, under .carry/ab/<tree>/,
# made on the development machine:
#   rm -rf .carry/ab; for b in compiled-tail compile-sizes unfiltered-sampling pdl-fill; do for f in $(git diff
#   --name-only main candidate/$b -- sparsedecode tests); do mkdir -p .carry/ab/$b/$(dirname $f) .carry/ab/main/$(dirname $f);
#   git show candidate/$b:$f > .carry/ab/$b/$f; git show main:$f > .carry/ab/main/$f; done; done
# Usage: ab.sh STEP...; a step is "tests" (GPU tests of compile-sizes and pdl-fill), "tests-sampling" (of
# unfiltered-sampling) or <tree>:<mode>, mode greedy, sampled (temperature 1, an API request's default) or
# sizes (greedy, --compile-sizes 1,8).
export PYTHONPATH=$PWD
use() { cp -r .carry/ab/main/. . ; cp -r .carry/ab/$1/. . ; echo "== tree $1: $(cat sparsedecode/engine/model_runner.py sparsedecode/kernels/sparse_decode.py | md5sum | cut -c1-8)"; }
A="--models random:llama-3.1-8b --contexts 128k --batches 1,max --methods lychee,lychee+lfps --no-hf-baseline --steps 20 --warmup 3"
for step in "$@"; do
  s=$(date +%s)
  case "$step" in
    tests) use compile-sizes
      timeout 150 python3 -m pytest -q tests/test_engine.py tests/test_sampling.py -k "graph_replays or captured_buckets or compiled or compile_sizes or dependent" 2>&1 | tail -3
      use pdl-fill
      timeout 100 python3 -m pytest -q tests/test_engine.py tests/test_kernels.py -k "dependent or strided or hybrid" 2>&1 | tail -3 ;;
    tests-sampling) use unfiltered-sampling
      timeout 120 python3 -m pytest -q tests/test_engine.py tests/test_sampling.py -k "captured_buckets or filters or unfiltered" 2>&1 | tail -3 ;;
    *:*) tree=${step%%:*}; mode=${step##*:}; use $tree; name=${tree}-${mode}-$s
      extra=""; [ $mode = sampled ] && extra="--temperature 1"; [ $mode = sizes ] && extra="--compile-sizes 1,8"
      timeout 260 python3 -m sparsedecode bench e2e $A $extra --out /tmp/$name > $OUT/$name.log 2>&1; echo "$name rc=$?"
      grep -E "^\| random" $OUT/$name.log | head -6; cp /tmp/$name/results.md $OUT/$name-results.md 2>/dev/null ;;
  esac
  echo "-- $step: $(( $(date +%s) - s )) s"
done
use main
