"""Adapters injected into any model: ETHER, ETHER+, ETHER+HH, OFT (multiplicative) and LoRA (additive).

    from lit_gpt.adapters import AdapterConfig, apply_adapters, merge_adapters, save_adapters, load_adapters

    model = apply_adapters(model, AdapterConfig(method="etherplus", nb=32, targets=["query", "value"]))
    ...train...
    save_adapters(model, "out/adapter.pth")  # or "out/adapter_model.safetensors"
    merged = merge_adapters(model)           # plain nn.Linear weights W' = H_out W H_in again

Apply adapters after loading the base weights (the adapted model's `state_dict` has the base keys plus the adapter
keys), or load base weights with `strict=False`. docs/METHODS.md defines every formula; one file per method registers
itself here.
"""

from lit_gpt.adapters.config import ALL_LINEAR, GPT_TARGETS, METHODS, MULTIPLICATIVE_METHODS, AdapterConfig
from lit_gpt.adapters.base import (
    AdaptedLinear,
    BlockTransform,
    MultiplicativeAdapter,
    SliceAdapter,
    adapted_layers,
    adapter_config_of,
    apply_adapters,
    merge_adapters,
    register_method,
    set_adapters_enabled,
)
from lit_gpt.adapters import ether as _ether  # noqa: F401  (registers ether, etherplus, etherplusHH)
from lit_gpt.adapters import lora as _lora  # noqa: F401  (registers lora)
from lit_gpt.adapters import oft as _oft  # noqa: F401  (registers oft)
from lit_gpt.adapters.ether import HouseholderTransform
from lit_gpt.adapters.lora import LoRAAdapter
from lit_gpt.adapters.oft import OFTTransform, cayley
from lit_gpt.adapters.plan import plan_report
from lit_gpt.adapters.state import (
    adapter_state_dict,
    align_adapter_keys,
    load_adapter_file,
    load_adapters,
    read_adapter_config,
    save_adapters,
)

__all__ = [
    "ALL_LINEAR",
    "GPT_TARGETS",
    "METHODS",
    "MULTIPLICATIVE_METHODS",
    "AdaptedLinear",
    "AdapterConfig",
    "BlockTransform",
    "HouseholderTransform",
    "LoRAAdapter",
    "MultiplicativeAdapter",
    "OFTTransform",
    "SliceAdapter",
    "adapted_layers",
    "adapter_config_of",
    "adapter_state_dict",
    "align_adapter_keys",
    "apply_adapters",
    "cayley",
    "load_adapter_file",
    "load_adapters",
    "merge_adapters",
    "plan_report",
    "read_adapter_config",
    "register_method",
    "save_adapters",
    "set_adapters_enabled",
]
