"""Model loading: the offline registry, GGUF / Hugging Face folders, random-weight shapes, the decoder."""

#: torch.compile modes `Transformer.compile_decode` takes (here, without torch, for the command line)
DECODE_COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
#: what runs a decode step's linear layers: torch (F.linear: cuBLAS on a GPU) or the few-row kernel kernels.gemv
DECODE_LINEARS = ("torch", "gemv")
