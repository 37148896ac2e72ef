"""The one batching core both models use (``core``) and its timing policies (``policy``)."""

from app.services.batching.core import AGAIN, Adapter, Batcher, BatchMetrics
from app.services.batching.policy import IdleWaitPolicy, InlinePolicy

__all__ = ["AGAIN", "Adapter", "BatchMetrics", "Batcher", "IdleWaitPolicy", "InlinePolicy"]
