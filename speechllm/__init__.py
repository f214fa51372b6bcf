"""speechllm: speech recognition and understanding with a frozen Whisper encoder, a trained projector, a frozen LLM."""

from .model import SpeechLLM, SpeechLLMConfig
from .processor import AUDIO_PLACEHOLDER

__all__ = ["SpeechLLM", "SpeechLLMConfig", "AUDIO_PLACEHOLDER"]
