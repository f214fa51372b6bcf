"""speechllm: speech recognition and understanding with a frozen Whisper encoder, a trained projector, a frozen LLM."""

from .model import SpeechLLM, SpeechLLMConfig
from .nbest import NBEST_PLACEHOLDER
from .processor import AUDIO_PLACEHOLDER

__all__ = ["SpeechLLM", "SpeechLLMConfig", "AUDIO_PLACEHOLDER", "NBEST_PLACEHOLDER"]
