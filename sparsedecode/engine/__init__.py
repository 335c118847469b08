"""The serving engine: sequences, block manager, scheduler, model runner, the engine loop and the LLM API."""
from .llm import LLM, Generation
from .llm_engine import LLMEngine, RequestOutput
from .model_runner import ModelRunner
from .sampling import TokenLogprob
from .sampling_params import SamplingParams

__all__ = ["LLM", "Generation", "LLMEngine", "ModelRunner", "RequestOutput", "SamplingParams", "TokenLogprob"]
