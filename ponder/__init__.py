"""ponder: an LLM inference engine with native inference-time compute."""

from ponder.config import EngineConfig
from ponder.llm import LLM
from ponder.outputs import CompletionOutput, Logprob, RequestOutput, Usage
from ponder.sampling_params import SamplingParams, StructuredOutputs

__all__ = ["LLM", "SamplingParams", "StructuredOutputs", "EngineConfig", "RequestOutput", "CompletionOutput", "Logprob", "Usage"]
__version__ = "0.1.0"
