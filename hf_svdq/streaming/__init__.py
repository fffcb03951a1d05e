"""Compressing checkpoints from disk to disk a block at a time: memory bounded by one block, resumable.

Public entry: :func:`compress_checkpoint` (also ``hf-svdq compress``)."""

from .estimate import MemoryEstimate
from .run import StreamedCompression, StreamingUnsupported, compress_checkpoint, streaming_unsupported, work_folder

__all__ = ["MemoryEstimate", "StreamedCompression", "StreamingUnsupported", "compress_checkpoint",
           "streaming_unsupported", "work_folder"]
