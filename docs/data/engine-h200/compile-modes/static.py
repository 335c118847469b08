"""`sparsedecode ...` with every max-autotune torch.compile made static (dynamic=False): each decode batch
bucket then compiles, and tunes its GEMMs, for its own batch size instead of the dynamic graph of batch 2."""
import sys

import torch

compile_ = torch.compile


def compile_static(fn=None, **kwargs):
    if kwargs.get("options", {}).get("max_autotune"):  # compile_decode("max-autotune-no-cudagraphs")
        kwargs["dynamic"] = False
    return compile_(fn, **kwargs)


torch.compile = compile_static
from sparsedecode.cli import main  # noqa: E402

sys.argv[0] = "sparsedecode"
main()
