"""Multimodal inputs: image / video preprocessing, media fetching; messages -> ids, pixels, positions."""

from .image_processor import ErnieVLImageProcessor, ImageProcessor, ProcessedImages, smart_resize
from .media import MediaFetcher
from .processor import (
    ErnieVLProcessor,
    MultimodalProcessor,
    MultimodalPrompt,
    check_media_limits,
    load_image,
    mrope_positions,
)
from .video import VideoFrames, VideoProcessor, sample_frame_indices

__all__ = [
    "ErnieVLImageProcessor",
    "ErnieVLProcessor",
    "ImageProcessor",
    "MediaFetcher",
    "MultimodalProcessor",
    "MultimodalPrompt",
    "ProcessedImages",
    "VideoFrames",
    "VideoProcessor",
    "check_media_limits",
    "load_image",
    "mrope_positions",
    "sample_frame_indices",
    "smart_resize",
]
