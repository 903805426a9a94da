"""The emotion models' names and labels, importable without torch or Beam's ML stack
(the command line, the options and the REST service need them; inference does not)."""

from __future__ import annotations

DEFAULT_MODEL = "minilm-goemotions-ekman"
LABELS = ("anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise")
DTYPES = ("auto", "float32", "bfloat16")
