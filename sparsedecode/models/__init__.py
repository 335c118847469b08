"""Model loading: the offline registry, GGUF / Hugging Face folders, random-weight shapes, the decoder."""
