"""Model loading: the offline registry, GGUF / Hugging Face folders, random-weight shapes, the decoder."""

#: torch.compile modes `Transformer.compile_decode` takes (here, without torch, for the command line)
DECODE_COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
#: what runs a decode step's linear layers: torch (F.linear: cuBLAS on a GPU), the few-row kernel kernels.gemv,
#: gemv-fused (gemv with the norms, residual sums and SiLU-and-mul before each layer read in its prologue), or
#: auto: gemv where decode steps are compiled on a CUDA device, torch elsewhere
DECODE_LINEARS = ("auto", "torch", "gemv", "gemv-fused")
