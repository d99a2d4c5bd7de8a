"""`AdapterConfig`: what to adapt and how, as plain data (it is written to a run's `hyperparameters.yaml` and into
every adapter file, so merge, chat and eval rebuild the adapters from it instead of parsing directory names).

The paper's and the reference CLI's words are kept as field names (`nb`, `flip_side`, `Htype` values as `method`).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterator, Optional

# every method an `AdapterConfig` accepts; the multiplicative ones share the block machinery
MULTIPLICATIVE_METHODS = ("ether", "etherplus", "etherplusHH", "oft")
METHODS = MULTIPLICATIVE_METHODS + ("lora",)



def starts_from_base(init: str) -> bool:
    """Whether a LoRA `init` starts `B A` at a part of the base weight (PiSSA, OLoRA), kept as `A_0`, `B_0`."""
    return init in ("pissa", "olora") or init.startswith("pissa_niter_")


# the named targets of a `lit_gpt.GPT` (see the module names at the top of `lit_gpt/model.py`)
GPT_TARGETS = ("query", "key", "value", "projection", "mlp", "head")
# PEFT's "all-linear" convention: every linear layer but the output head
ALL_LINEAR = "all-linear"
# the named train_modules of a `lit_gpt.GPT`: its output head, its embeddings (token, and GPT-2's positions) and
# every norm
GPT_TRAIN_MODULES = ("head", "embeddings", "norms")


# how an error names a field: by its name here, or, inside `named_by_flags` (which the finetune scripts enter), by the
# command-line flag that set it, so that the sentence says what to change where the user typed it
_FLAGS: ContextVar[dict[str, str]] = ContextVar("adapter_flag_names", default={})


@contextmanager
def named_by_flags(flags: dict[str, str]) -> Iterator[None]:
    """Within: adapter errors name `flags[field]` (e.g. `--ether_nb`) for each field it maps."""
    token = _FLAGS.set(flags)
    try:
        yield
    finally:
        _FLAGS.reset(token)


def field_name(name: str) -> str:
    """A field as an error names it: its flag inside `named_by_flags`, else the field's name."""
    return _FLAGS.get().get(name, name)


def setting(name: str, value: Any) -> str:
    """A field's value as an error names it: `--ether_nb 33` inside `named_by_flags`, else `nb=33`."""
    flag = _FLAGS.get().get(name)
    return f"{flag} {value}" if flag else f"{name}={value!r}"


@dataclass
class AdapterConfig:
    """How adapters are placed and parametrised (docs/METHODS.md is the definition of every formula).

    Args:
        method: ``ether``, ``etherplus``, ``etherplusHH``, ``oft`` or ``lora``.
        nb: number of diagonal blocks on each adapted side (``d % nb == 0``).
        block_size: block size ``k`` instead of ``nb`` (how OFT users size blocks); when set it wins over ``nb`` and
            each side gets ``nb = d / block_size`` blocks.
        targets: on a ``lit_gpt.GPT``: ``query``, ``key``, ``value``, ``projection``, ``mlp``, ``head`` or
            ``all-linear`` (everything but ``head``). On any model (GPT included): module names matched against
            the dotted module path, PEFT-style: ``q_proj`` matches every module whose name ends in ``.q_proj``;
            a pattern with ``*``/``?``/``[`` is an ``fnmatch`` glob on the full name; ``re:<regex>`` is a
            regular expression that must match the full name; ``all-linear`` is every such layer but the output
            head (the module ``get_output_embeddings()`` returns, else a top-level ``lm_head``), as in PEFT. Only
            ``nn.Linear`` (subclasses that keep its ``forward``) and GPT-2 ``Conv1D`` are adapted, and not the
            ``out_proj`` of an ``nn.MultiheadAttention``, which never calls it.
        flip_side: put the one-sided transform on the output side (``y = H W x + b``) instead of the input side.
        dropout: ordinary dropout on the input of the adapted computation (the reference ``ether_dropout``;
            LoRA's ``lora_dropout``).
        block_dropout: multiplicative dropout: while training, each block is replaced by ``I`` with this
            probability, drawn anew every forward (never in eval mode). Multiplicative methods only.
        r: LoRA rank.
        alpha: LoRA scale numerator (the update is ``alpha / r * B A x``).
        dora: LoRA only: DoRA (Liu et al., arXiv 2402.09353; PEFT's ``use_dora``), a trained magnitude ``m`` per
            output row on top of LoRA: ``y = m / ||W + (alpha/r) B A||_row * (W + (alpha/r) B A) x + b``, the norm
            taken per output row and treated as a constant in backward (as the paper suggests and PEFT does).
            ``m`` starts at the base rows' norms, so the layer starts as the base layer; it is float32 on a
            half-precision model (as in PEFT), where bfloat16 would round AdamW's steps near 1 away.
        init: LoRA only: how ``A`` and ``B`` start (PEFT's ``init_lora_weights``). ``default``: ``A``
            Kaiming-uniform, ``B = 0``; ``gaussian``: ``A ~ N(0, 1/r²)``, ``B = 0``; ``pissa`` (Meng et al., arXiv
            2404.02948): ``B A`` starts as the top ``r`` singular components of the base weight, ``B = U_r
            sqrt(S_r / s)``, ``A = sqrt(S_r / s) V_rᵀ`` (``s = alpha / r``), computed by a full SVD (on a GPU when
            there is one), or ``pissa_niter_<k>``: a randomized SVD of ``k`` subspace iterations (``torch.svd_lowrank``,
            far faster on a large model; its random start is fixed, so a resumed run computes the same factors);
            ``olora`` (Büyükakyüz, arXiv 2406.01775): ``B = Q_r``, ``A = R_r`` of the QR decomposition of the base
            weight. Those two change what the base computes in PEFT (``W - s B_0 A_0``); here the base stays as it
            is and the adapter keeps its starting factors ``A_0``, ``B_0`` (saved in its file, never trained) and
            adds ``s (B A - B_0 A_0) x``: the same layer, which merges and exports to PEFT as a plain LoRA of rank
            ``2 r`` on the original base.
        coft: constrained OFT: each skew block ``S_i`` is rescaled inside the forward so ``‖S_i‖_F <= eps``.
        eps: the COFT radius, per block. 6e-5 is the OFT authors' and PEFT's default number; note that their
            code bounds ``‖S_i‖_F`` by ``eps / sqrt(nb)``: pass that value to reproduce their constraint.
        block_share: OFT with one ``R`` shared by all blocks of a side.
        neumann_terms: OFT with ``K > 0`` replaces ``(I - S)^-1`` by ``sum_{j=0..K} S^j`` (OFTv2; K + 1 terms:
            PEFT's ``num_cayley_neumann_terms`` T is K = T - 2); 0 is exact.
        upper_triangle: OFT stores only the strict upper triangle of each ``R_i`` (``k(k-1)/2`` numbers, ``R_i``'s
            lower triangle is zero), half the parameters of full blocks for the same set of rotations.
        train_modules: modules trained in full beside the adapters (PEFT's ``modules_to_save``).
        layers: only the layers the targets select inside these transformer blocks (indices from 0) take adapters
            (PEFT's ``layers_to_transform``); ``None``: every block. A module's block is the first number between
            dots after the first name (``transformer.h.3.attn.qkv``, ``model.layers.3.self_attn.q_proj``: block 3),
            as PEFT reads it. As in PEFT, a layer a target names exactly (the ``head``, a module's full name) is
            adapted whatever the blocks.
    """

    method: str = "ether"
    nb: int = 32
    block_size: Optional[int] = None
    targets: list[str] = field(default_factory=lambda: ["query", "value"])
    flip_side: bool = False
    dropout: float = 0.0
    block_dropout: float = 0.0
    r: int = 8
    alpha: float = 16.0
    dora: bool = False
    init: str = "default"
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    neumann_terms: int = 0
    upper_triangle: bool = False
    train_modules: list[str] = field(default_factory=list)
    layers: Optional[list[int]] = None

    def __post_init__(self) -> None:
        for name in ("targets", "train_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value])
            elif isinstance(value, (list, tuple)):
                setattr(self, name, list(value))
        if isinstance(self.layers, (tuple, range)):
            self.layers = list(self.layers)
        self.validate()
        if self.layers is not None:  # one spelling per set of blocks: resumes and run names compare it
            self.layers = sorted(set(self.layers))

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        if self.method not in METHODS:
            hint = " (full fine-tuning takes no AdapterConfig: pass None)" if self.method == "full" else ""
            raise ValueError(
                f"Unknown adapter method {self.method!r}{hint}: choose one of {', '.join(METHODS)}."
            )
        n = field_name
        if not isinstance(self.targets, list) or not self.targets or not all(
            isinstance(t, str) and t for t in self.targets
        ):
            raise ValueError(f"{n('targets')} must be a non-empty list of module names, got {self.targets!r}.")
        if not isinstance(self.train_modules, list) or not all(isinstance(t, str) and t for t in self.train_modules):
            raise ValueError(f"{n('train_modules')} must be a list of module names (or empty), got "
                             f"{self.train_modules!r}.")
        if self.layers is not None and (not isinstance(self.layers, list) or not self.layers or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers)):
            every = "leave it unset" if n("layers") != "layers" else "None"
            raise ValueError(f"{n('layers')} must be a non-empty list of block indices (integers from 0), or {every} "
                             f"for every block, got {self.layers!r}.")
        for name in ("targets", "train_modules"):
            for t in getattr(self, name):
                if t.startswith("re:"):
                    try:
                        re.compile(t[3:])
                    except re.error as e:
                        raise ValueError(
                            f"The {n(name)} entry {t!r} is not a valid regular expression ({e}): fix the pattern "
                            "after 're:'."
                        ) from None
        # a bool is an int and a str is truthy: both would pass the checks below with a meaning nobody asked for
        for name in ("flip_side", "coft", "block_share", "upper_triangle", "dora"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{n(name)} must be True or False, got {value!r} ({type(value).__name__}).")
        for name in ("nb", "block_size", "r", "neumann_terms"):
            value = getattr(self, name)
            if value is None and name == "block_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{n(name)} must be an integer, got {value!r} ({type(value).__name__}).")
        for name in ("dropout", "block_dropout", "alpha", "eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{n(name)} must be a number, got {value!r} ({type(value).__name__}).")
        if self.nb < 1:
            raise ValueError(f"{n('nb')} must be a positive number of blocks, got {self.nb!r}.")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"{n('block_size')} must be a positive integer or None, got {self.block_size!r}.")
        for name in ("dropout", "block_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{n(name)} must be a probability in [0, 1), got {p!r}.")
        if self.neumann_terms < 0:
            raise ValueError(
                f"{n('neumann_terms')} must be 0 (exact Cayley) or a positive integer, got {self.neumann_terms!r}."
            )
        if not self.eps > 0:
            raise ValueError(f"{n('eps')} (the COFT radius) must be positive, got {self.eps!r}.")

        if self.method == "lora":
            if self.r < 1:
                raise ValueError(f"The LoRA rank {n('r')} must be a positive integer, got {self.r!r}.")
            if not self.alpha > 0:
                raise ValueError(f"The LoRA scale {n('alpha')} must be positive, got {self.alpha!r}.")
            for name in ("flip_side", "coft", "block_share", "upper_triangle"):
                if getattr(self, name):
                    raise ValueError(f"{n(name)} does not apply to LoRA: it is an option of the multiplicative "
                                     "methods.")
            if self.block_dropout:
                raise ValueError(f"{n('block_dropout')} does not apply to LoRA (it has no blocks): use "
                                 f"{n('dropout')} instead.")
            if self.neumann_terms:
                raise ValueError(f"{n('neumann_terms')} is an OFT option and does not apply to LoRA.")
            if self.block_size is not None:
                raise ValueError(f"{n('block_size')} does not apply to LoRA: set its rank with {n('r')}.")
        if not isinstance(self.init, str) or not re.fullmatch(r"default|gaussian|pissa|pissa_niter_[1-9]\d*|olora",
                                                              self.init):
            raise ValueError(f"{n('init')} must be default, gaussian, pissa, pissa_niter_<k> (k a positive number of "
                             f"iterations) or olora, got {self.init!r}.")
        if self.init != "default" and self.method != "lora":
            raise ValueError(f"{n('init')} {self.init} is a LoRA option; {setting('method', self.method)} does not use "
                             "it.")
        if self.dora and starts_from_base(self.init):
            raise ValueError(f"{n('init')} {self.init} and {n('dora')} do not go together here: DoRA's norms would "
                             f"need the starting factors too; drop one of them.")
        if self.dora and self.method != "lora":
            raise ValueError(f"{n('dora')} (DoRA) is a LoRA option; {setting('method', self.method)} does not use it.")
        if self.method != "oft":
            for name in ("coft", "block_share", "upper_triangle"):
                if getattr(self, name):
                    raise ValueError(f"{n(name)} is an OFT option; {setting('method', self.method)} does not use it.")
            if self.neumann_terms:
                raise ValueError(f"{n('neumann_terms')} is an OFT option; {setting('method', self.method)} does not "
                                 "use it.")
        if self.method == "etherplusHH" and self.flip_side:
            raise ValueError(f"etherplusHH already transforms both sides: drop {n('flip_side')}.")

    # ------------------------------------------------------------------ plain data
    @property
    def multiplicative(self) -> bool:
        return self.method in MULTIPLICATIVE_METHODS

    def to_dict(self) -> dict[str, Any]:
        """Plain data (str/int/float/bool/list/None): safe for YAML and for `torch.load(weights_only=True)`."""
        data = asdict(self)
        data["targets"] = list(self.targets)
        data["train_modules"] = list(self.train_modules)
        data["layers"] = None if self.layers is None else list(self.layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        if not isinstance(data, dict):
            raise TypeError(f"An adapter config must be a mapping of field names to values, got {type(data).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown adapter config field(s) {unknown}: the known fields are {sorted(known)}.")
        return cls(**data)

    def describe(self) -> str:
        """One line for logs and the dry-run report."""
        if self.method == "lora":
            parts = [f"r={self.r}", f"alpha={self.alpha:g}"] + (["DoRA"] if self.dora else [])
            if self.init != "default":
                parts.append(f"init={self.init}")
        else:
            parts = [f"block_size={self.block_size}" if self.block_size else f"nb={self.nb}"]
            if self.flip_side:
                parts.append("output side")
            if self.method == "oft":
                if self.upper_triangle:
                    parts.append("upper-triangle storage")
                if self.block_share:
                    parts.append("block_share")
                if self.coft:
                    parts.append(f"coft eps={self.eps:g}")
                parts.append(f"neumann_terms={self.neumann_terms}" if self.neumann_terms else "exact Cayley")
            if self.block_dropout:
                parts.append(f"block_dropout={self.block_dropout:g}")
        if self.dropout:
            parts.append(f"dropout={self.dropout:g}")
        trained = f"; trains {', '.join(self.train_modules)} in full" if self.train_modules else ""
        where = "" if self.layers is None else f" in {blocks_phrase(self.layers)}"
        return f"{self.method} ({', '.join(parts)}; targets {', '.join(self.targets)}{where}{trained})"


def format_layers(layers: list[int]) -> str:
    """Block indices as ranges: `[0, 1, 2, 5]` -> `0-2,5`."""
    runs: list[list[int]] = []
    for i in sorted(layers):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def blocks_phrase(layers: list[int]) -> str:
    """`block 3` or `blocks 0-2,5`."""
    return f"block{'s' if len(layers) > 1 else ''} {format_layers(layers)}"
