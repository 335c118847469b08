# usage: bash scratch/ab.sh ON BATCH OUTNAME   (SelectionStream.enabled = ON)
export PYTHONPATH=$PWD
python3 -c "
import sys
import sparsedecode.methods.lychee as m
m.SelectionStream.enabled = bool($1)
from sparsedecode.cli import main
sys.argv = ['sparsedecode', 'bench', 'e2e', '--models', 'random:llama-3.1-8b', '--contexts', '128k', '--batches', '$2',
            '--methods', 'lychee,lychee+lfps', '--no-hf-baseline', '--steps', '20', '--warmup', '3', '--out', '/tmp/e2e-$3']
main()
" > $OUT/$3.log 2>&1; echo "rc=$? $3"; grep -E "^\| random" /tmp/e2e-$3/results.md | head -4
cp /tmp/e2e-$3/results.md $OUT/$3.md
