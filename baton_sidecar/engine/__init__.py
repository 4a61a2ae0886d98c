"""Baton's engine: iteration-level dynamic re-batching over a dense, left-padded KV cache."""

from .core import EngineCore, EngineStats
from .engine import AsyncEngine, RequestStream
from .request import (AdmissionError, Request, RequestOutput, RequestStatus, RequestValidationError,
                      SamplingParams, StructuredOutput, TokenLogprob)
from .step import StepRecord

__all__ = [
    "AdmissionError", "AsyncEngine", "EngineCore", "EngineStats", "Request", "RequestOutput",
    "RequestStatus", "RequestStream", "RequestValidationError", "SamplingParams", "StepRecord", "StructuredOutput",
    "TokenLogprob",
]
