"""speechllm: speech recognition and understanding with a frozen Whisper encoder, a trained projector, a frozen LLM."""

from transformers import AutoConfig, AutoModel

from .hypothesis import Hypothesis
from .model import SpeechLLM, SpeechLLMConfig
from .nbest import NBEST_PLACEHOLDER
from .processor import AUDIO_PLACEHOLDER

# After `import speechllm`, AutoConfig / AutoModel.from_pretrained(folder) know model_type "speechllm".
AutoConfig.register(SpeechLLMConfig.model_type, SpeechLLMConfig, exist_ok=True)
AutoModel.register(SpeechLLMConfig, SpeechLLM, exist_ok=True)

__all__ = ["SpeechLLM", "SpeechLLMConfig", "Hypothesis", "AUDIO_PLACEHOLDER", "NBEST_PLACEHOLDER"]
