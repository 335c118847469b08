#!/bin/bash
# A/B of candidate/scored-rows: main, branch, main trees in one lease.
# .carry/ab/<tree>/ holds each tree's copy of the files the branch changes (git show), swapped in between runs;
# .carry/wheels/ the openai wheel and its dependencies (pip download), to check they install there.
export PYTHONPATH=$PWD
use() { cp -r .carry/ab/$1/. . ; echo "== tree $1: $(md5sum sparsedecode/kernels/sparse_decode.py | cut -c1-8)"; }
python3 -c "import fastapi, uvicorn, prometheus_client, pydantic, httpx; print('server deps ok')" 2>&1 | tail -1
(python3 -m pip install -q --no-index --find-links .carry/wheels openai 2>&1 | tail -2; python3 -c "import openai; print('openai', openai.__version__)") 2>&1 | tail -3
i=0
for t in main scored-rows main; do
  i=$((i+1)); use $t
  timeout 80 python3 -m sparsedecode bench kernel --contexts 128k --batches 1,8 --no-flashinfer > $OUT/k$i-$t.txt 2>&1; echo "kernel rc=$?"
  grep -E "hybrid|dense" $OUT/k$i-$t.txt | head -20
  timeout 150 python3 -m sparsedecode bench e2e --models random:llama-3.1-8b --contexts 128k --batches 1,max --methods lychee,lychee+lfps --no-hf-baseline --steps 20 --warmup 3 --out /tmp/e2e$i > $OUT/e$i-$t.log 2>&1; echo "e2e rc=$?"
  grep "ms/step" $OUT/e$i-$t.log
  cp /tmp/e2e$i/results.md $OUT/e$i-$t-results.md 2>/dev/null
done
use scored-rows
timeout 100 python3 -m pytest -q -x tests/test_kernels.py tests/test_method_contract.py tests/test_engine.py -k "scored or graph_replays" 2>&1 | tail -3
use main
