"""lit_gpt: instruction-tune LLMs with multiplicative adapters (ETHER, ETHER+, OFT) and LoRA."""

from lit_gpt.config import Config
from lit_gpt.model import GPT
from lit_gpt.tokenizer import Tokenizer

__all__ = ["GPT", "Config", "Tokenizer"]
