"""BoneAI Review core: radiograph I/O, preprocessing, models, training, evaluation and explanations.

Usable without Streamlit; the app in ``app.py``/``pages/`` is one client, ``python -m boneai`` another.
"""

__version__ = "0.1.0"

from boneai.errors import BoneAIError  # noqa: E402

__all__ = ["BoneAIError", "__version__"]
