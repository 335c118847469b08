#!/bin/bash
# On the GPU machine, from the repository root: bash docs/data/serve-h200/8b-128k-distinct/run.sh METHODS
# Installs the server's and client's wheels carried in .carry/wheels (the machine has no openai, no
# fastapi) and reads its prompts from the essays carried in .carry/essays (no package index there), then one `bench serve` point: 6 clients, 6 distinct 127K prompts, 1,024 output tokens.
set -u
methods=$1
python3 -m pip install -q --no-index --find-links .carry/wheels openai fastapi uvicorn prometheus-client 2>&1 | tail -2
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
python3 -m sparsedecode bench serve --model random:llama-3.1-8b --methods "$methods" --input-len 127k \
  --output-len 1024 --concurrency 6 --num-prompts 6 --serve-arg=--max-num-seqs=8 --haystack .carry/essays --out "$OUT/serve" 2>&1 | tail -40
for f in "$OUT"/serve/*.log; do echo "== $f"; tail -5 "$f"; done
