#!/bin/bash
# Whole-step programmatic dependent launch at 128K, batch 1 and max, in one lease (session 27, before the
# merge: main 532cca1 and candidate/pdl 62e0a57, where ours ran only with SPARSEDECODE_PDL=1). Trees: "main" and "pdl"
# (branch candidate/pdl's kernel files, our kernels with PDL under SPARSEDECODE_PDL=1), copies of the changed
# files under .carry/ab/<tree>/, swapped in between runs. Usage: ab.sh STEP...; each step is
#   tests-main   GPU engine tests of the captured step (the step inputs' pinned host load)
#   tests-pdl    the same bits with and without PDL (pdl tree)
#   <tree>:<mode>  bench e2e on that tree; mode plain, or pdl (TORCHINDUCTOR_ENABLE_PDL=1 SPARSEDECODE_PDL=1)
export PYTHONPATH=$PWD
use() { cp -r .carry/ab/$1/. . ; echo "== tree $1: $(md5sum sparsedecode/kernels/sparse_decode.py | cut -c1-8)"; }
A="--models random:llama-3.1-8b --contexts 128k --batches 1,max --methods lychee,lychee+lfps --no-hf-baseline --steps 20 --warmup 3"
for step in "$@"; do
  s=$(date +%s)
  case "$step" in
    tests-main) use main; timeout 150 python3 -m pytest -q -x tests/test_engine.py -k "graph_replays or captured_buckets" 2>&1 | tail -3 ;;
    tests-pdl) use pdl; timeout 150 python3 -m pytest -q -x tests/test_engine.py -k "dependent_launches" 2>&1 | tail -3 ;;
    *:*) tree=${step%%:*}; mode=${step##*:}; use $tree; name=${tree}-${mode}-$s
      if [ $mode = pdl ]; then export TORCHINDUCTOR_ENABLE_PDL=1 SPARSEDECODE_PDL=1; else unset TORCHINDUCTOR_ENABLE_PDL SPARSEDECODE_PDL; fi
      timeout 200 python3 -m sparsedecode bench e2e $A --out /tmp/$name > $OUT/$name.log 2>&1; echo "$name rc=$?"
      grep -E "^\| random" $OUT/$name.log | head -4; cp /tmp/$name/results.md $OUT/$name-results.md 2>/dev/null ;;
  esac
  echo "-- $step: $(( $(date +%s) - s )) s"
done
use main
