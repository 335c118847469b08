"""sparsedecode: fast long-context decoding that reads only the part of the KV cache that matters."""
from .engine import LLM, Generation, SamplingParams
from .roles.head_roles import HeadRoles

__all__ = ["LLM", "Generation", "HeadRoles", "SamplingParams"]
__version__ = "0.1.0"
