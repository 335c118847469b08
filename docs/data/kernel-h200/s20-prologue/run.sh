#!/usr/bin/env bash
# session 20, call B: the partial kernel taking its row's length and kind from the prologue's vectors (new)
# against the kernel of the previous commit (old), alternating, in one lease
set -u
export PYTHONPATH=$PWD
cp sparsedecode/kernels/sparse_decode.py /tmp/sd_new.py
timeout 60 python3 -m pytest -q -x tests/test_kernels.py -k "hybrid or paged_cache or bit_identical" 2>&1 | tail -1
for v in new old new old; do
  cp /tmp/sd_$v.py sparsedecode/kernels/sparse_decode.py 2>/dev/null || cp .carry/sd_old.py  # .carry/sd_old.py: git show 3ec7406:sparsedecode/kernels/sparse_decode.py; sparsedecode/kernels/sparse_decode.py
  echo "== $v"
  timeout 120 python3 -m sparsedecode bench kernel --contexts 32k,128k --batches 1,8 --no-flashinfer > $OUT/kernel-$v-$RANDOM.txt 2>&1
  grep "^| ours" $(ls -t $OUT/kernel-$v-*.txt | head -1)
done
cp /tmp/sd_new.py sparsedecode/kernels/sparse_decode.py
