"""Instruction data: prompt styles, preparation of `train.pt`/`test.pt`, and the training-side dataset and loader."""

from lit_gpt.data.prepare import (
    PREPARE_CONFIG_FILENAME,
    TEST_FILENAME,
    TRAIN_FILENAME,
    DataPreparationError,
    encode_example,
)
from lit_gpt.data.prompts import PROMPT_STYLE_NAMES, PromptStyle, prompt_style_from_name
from lit_gpt.data.sft import (
    MicroBatchLoader,
    SFTDataset,
    collate,
    epoch_order,
    epoch_permutation,
    load_prompt_style,
    read_prepare_config,
)

__all__ = [
    "DataPreparationError",
    "MicroBatchLoader",
    "PREPARE_CONFIG_FILENAME",
    "PROMPT_STYLE_NAMES",
    "PromptStyle",
    "SFTDataset",
    "TEST_FILENAME",
    "TRAIN_FILENAME",
    "collate",
    "encode_example",
    "epoch_order",
    "epoch_permutation",
    "load_prompt_style",
    "prompt_style_from_name",
    "read_prepare_config",
]
