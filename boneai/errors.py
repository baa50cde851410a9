"""Exceptions raised by boneai, each with a message a clinician or operator can act on."""

from __future__ import annotations

__all__ = [
    "BoneAIError",
    "EmptyFileError",
    "UnsupportedFileError",
    "DicomReadError",
    "NoPixelDataError",
    "ImageTooLargeError",
    "ImageTooSmallError",
    "StudyTooLargeError",
    "DatasetError",
    "ModelNotFoundError",
]


class BoneAIError(Exception):
    """Base class: every error boneai raises on purpose derives from it."""


class EmptyFileError(BoneAIError):
    """The file has no bytes."""


class UnsupportedFileError(BoneAIError):
    """The bytes are neither an image format we read nor DICOM."""


class DicomReadError(BoneAIError):
    """The file looks like DICOM but cannot be parsed (truncated or corrupt)."""


class NoPixelDataError(BoneAIError):
    """A valid DICOM object without an image in it (a report, a structured document...)."""


class ImageTooLargeError(BoneAIError):
    """The image declares more pixels than we agree to decode (decompression-bomb guard)."""


class ImageTooSmallError(BoneAIError):
    """The image is too small to be a radiograph a model can read."""


class StudyTooLargeError(BoneAIError):
    """A study upload with more files or more bytes than one study may hold."""


class DatasetError(BoneAIError):
    """A dataset folder does not have the expected layout."""


class ModelNotFoundError(BoneAIError):
    """A model name or weights folder that does not exist."""
