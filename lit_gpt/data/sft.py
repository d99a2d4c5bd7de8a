"""The training side of instruction data: load a prepared directory, batch it, and walk it in a resumable order.

API for a training loop (one process per rank)::

    train = SFTDataset.from_dir(data_dir, "train")          # clear error if scripts/prepare_*.py was not run
    loader = MicroBatchLoader(train, micro_batch_size=4, seed=1337, rank=fabric.global_rank,
                              world_size=fabric.world_size, pad_id=0, max_seq_length=256)
    loader.load_state_dict(checkpoint["data"])              # on resume: continue exactly where the run stopped
    for batch in loader:                                    # endless; epochs follow each other
        logits = model(batch["input_ids"])                  # (B, T)
        loss = cross_entropy(logits[:, :-1], batch["labels"][:, 1:], ignore_index=-100)
        ...
        checkpoint["data"] = loader.state_dict()            # {"position", ...}: the next micro-batch

Order. Epoch `e` is a permutation of the dataset drawn from `(seed, e)` alone, and the epochs follow each other as
one stream, without padding or repeats. Each global micro-step deals the next `world_size * micro_batch_size`
examples of the stream, rank `r` taking the `r`-th `micro_batch_size` of them, so the ranks' shards are disjoint,
every rank gets equally sized micro-batches (collective ops never wait on a rank that ran out), every example is seen
once per pass, and an optimizer step holds the same examples on any number of processes. A micro-batch that crosses
the end of an epoch takes the first examples of the next. Resuming at a `position` yields exactly the micro-batches
an uninterrupted run would have yielded from there.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from lit_gpt.data.prepare import PREPARE_CONFIG_FILENAME, TEST_FILENAME, TRAIN_FILENAME
from lit_gpt.data.prompts import PromptStyle, prompt_style_from_name

SPLIT_FILES = {"train": TRAIN_FILENAME, "test": TEST_FILENAME, "val": TEST_FILENAME}


def _missing_data_message(path: Path) -> str:
    return (
        f"{str(path)!r} does not exist: run scripts/prepare_alpaca.py first (or another scripts/prepare_*.py, "
        f"with --destination_path {str(path.parent)!r})."
    )


class SFTDataset(torch.utils.data.Dataset):
    """Prepared examples, each ``{"input_ids": LongTensor[T], "labels": LongTensor[T]}`` (plus raw text fields).

    `max_seq_length` (optional) truncates every example on access; `lengths` are the lengths after truncation.
    """

    def __init__(self, samples: Sequence[dict], max_seq_length: Optional[int] = None, source: str = "") -> None:
        where = f"{source!r}" if source else "the dataset"
        for i, sample in enumerate(samples):
            if not isinstance(sample, dict) or "input_ids" not in sample or "labels" not in sample:
                raise ValueError(f"Example {i} of {where} lacks 'input_ids'/'labels'; prepare the data again.")
            ids, labels = sample["input_ids"], sample["labels"]
            if not (isinstance(ids, torch.Tensor) and isinstance(labels, torch.Tensor)) or ids.ndim != 1 \
                    or ids.shape != labels.shape:
                raise ValueError(
                    f"Example {i} of {where} must hold two 1-D tensors of equal length as 'input_ids' and 'labels'; "
                    "prepare the data again."
                )
        if max_seq_length is not None and max_seq_length < 1:
            raise ValueError(f"max_seq_length must be positive, got {max_seq_length}.")
        self.samples = list(samples)
        self.max_seq_length = max_seq_length
        self.source = source

    @classmethod
    def from_dir(cls, data_dir: Path | str, split: str = "train", max_seq_length: Optional[int] = None
                 ) -> "SFTDataset":
        """Load `train.pt` (`split="train"`) or `test.pt` (`"test"` or `"val"`) from a prepared directory."""
        if split not in SPLIT_FILES:
            raise ValueError(f"Unknown split {split!r}; choose 'train' or 'test'.")
        path = Path(data_dir) / SPLIT_FILES[split]
        if not path.is_file():
            raise FileNotFoundError(_missing_data_message(path))
        try:
            samples = torch.load(path, map_location="cpu", weights_only=True)
        except (PermissionError, MemoryError):
            raise
        except Exception as e:  # cut short (an interrupted copy of the folder) or not a torch file
            raise ValueError(f"{str(path)!r} could not be read ({_read_problem(e)}): it is truncated or was not "
                             "written by a scripts/prepare_*.py script; prepare the data again.") from None
        if not isinstance(samples, list):
            raise ValueError(
                f"{str(path)!r} holds a {type(samples).__name__}, not a list of examples; prepare it again."
            )
        return cls(samples, max_seq_length=max_seq_length, source=str(path))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.samples[index]
        end = self.max_seq_length
        return {"input_ids": sample["input_ids"][:end].long(), "labels": sample["labels"][:end].long()}

    @property
    def lengths(self) -> list[int]:
        cap = self.max_seq_length or float("inf")
        return [int(min(len(s["input_ids"]), cap)) for s in self.samples]

    @property
    def longest_seq_length(self) -> int:
        return max(self.lengths, default=0)

    @property
    def max_token_id(self) -> int:
        """The largest input id (-1 for an empty dataset): it must index the model's embedding table."""
        return max((int(s["input_ids"].max()) for s in self.samples if s["input_ids"].numel()), default=-1)


def _read_problem(error: BaseException) -> str:
    """What torch.load said about a file it could not read, in a few words."""
    if isinstance(error, EOFError):
        return "the file ends early"
    if isinstance(error, OSError) and error.strerror:  # torch's zip reader on a cut archive: "[Errno 22] Invalid ..."
        return f"reading it failed: {error.strerror}"
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first[:100]}" if first else type(error).__name__


def read_prepare_config(data_dir: Path | str) -> dict:
    """The `prepare_config.yaml` a prepare script wrote (prompt style, tokenizer directory, max_seq_length...)."""
    path = Path(data_dir) / PREPARE_CONFIG_FILENAME
    if not path.is_file():
        raise FileNotFoundError(_missing_data_message(path))
    from lit_gpt.config import read_yaml_file

    config = read_yaml_file(path, "; prepare the data again.")  # (cut short, or broken by hand)
    if not isinstance(config, dict):
        raise ValueError(f"{str(path)!r} is not a mapping; prepare the data again.")
    return config


def load_prompt_style(data_dir: Path | str, checkpoint_dir: Optional[Path | str] = None) -> PromptStyle:
    """The prompt style a directory was prepared with, so chat and eval prompt the model the way it was trained.

    `checkpoint_dir` overrides the recorded tokenizer directory (needed only by the `chat_template` style).
    """
    config = read_prepare_config(data_dir)
    return prompt_style_from_name(
        config.get("prompt_style", "alpaca"),
        checkpoint_dir=checkpoint_dir or config.get("checkpoint_dir"),
        system_prompt=config.get("system_prompt"),
    )


def collate(
    batch: Sequence[dict[str, torch.Tensor]], pad_id: int = 0, ignore_index: int = -100,
    max_seq_length: Optional[int] = None, pad_to_length: Optional[int] = None,
) -> dict[str, torch.Tensor]:
    """Stack examples into ``{"input_ids": (B, T), "labels": (B, T), "lengths": (B,)}`` int64 tensors.

    Each example is first cut to `max_seq_length`; then `input_ids` are right-padded with `pad_id` and `labels` with
    `ignore_index` to the longest example, or to `pad_to_length` (fixed shapes, e.g. for a compiled model). The pad
    id never reaches the loss, so the tokenizer's EOS or 0 both work. `lengths` are the rows' tokens before padding.
    """
    if not batch:
        raise ValueError("collate() got an empty batch.")
    ids = [b["input_ids"][:max_seq_length] for b in batch]
    labels = [b["labels"][:max_seq_length] for b in batch]
    for i, (x, y) in enumerate(zip(ids, labels)):
        if x.ndim != 1 or x.shape != y.shape:
            raise ValueError(f"Example {i} of the batch has input_ids {tuple(x.shape)} and labels {tuple(y.shape)}.")
    length = max(len(x) for x in ids)
    if pad_to_length is not None:
        if pad_to_length < length:
            raise ValueError(f"pad_to_length={pad_to_length} is shorter than the longest example ({length} tokens).")
        length = pad_to_length
    out_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
    out_labels = torch.full((len(ids), length), ignore_index, dtype=torch.long)
    for i, (x, y) in enumerate(zip(ids, labels)):
        out_ids[i, : len(x)] = x
        out_labels[i, : len(y)] = y
    return {"input_ids": out_ids, "labels": out_labels, "lengths": torch.tensor([len(x) for x in ids])}


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """A permutation of `range(num_samples)` that depends only on `(seed, epoch)`."""
    # hashing keeps (seed, epoch) pairs apart: seed + epoch would give runs with seeds 1 and 2 shifted copies
    digest = hashlib.sha256(f"lit_gpt.data:{seed}:{epoch}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return torch.randperm(num_samples, generator=generator)


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True,
                lengths: Optional[Sequence[int]] = None) -> list[int]:
    """Epoch `epoch`'s order of the examples: `epoch_permutation` (or `range` without `shuffle`). With `lengths`,
    epoch 0's longest example is moved to the front, so that the first micro-batch is the longest there can be and an
    out-of-memory error shows at the first step rather than hours later."""
    order = (epoch_permutation(num_samples, seed, epoch) if shuffle else torch.arange(num_samples)).tolist()
    if lengths is not None and epoch == 0 and order:
        at = max(range(num_samples), key=lambda i: lengths[order[i]])  # (the first of the longest)
        order.insert(0, order.pop(at))
    return order


class MicroBatchLoader:
    """An endless, resumable iterator over collated micro-batches for one rank (see the module docstring).

    `position` counts the examples dealt so far to all ranks: this rank's next micro-batch holds the examples at
    `position + rank * micro_batch_size` onwards in the stream of epochs, the same on every rank, so rank 0's
    `state_dict()` can be saved for all. The stream depends only on the seed, the number of examples and `shuffle`,
    so a position resumes on any number of processes and with any micro-batch size. `load_state_dict()` refuses a
    state from a run whose stream differs.
    """

    def __init__(
        self, dataset: SFTDataset, micro_batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
        pad_id: int = 0, ignore_index: int = -100, max_seq_length: Optional[int] = None,
        shuffle: bool = True, longest_first: bool = False, pad_to_length: Optional[int] = None,
    ) -> None:
        if micro_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"Need micro_batch_size >= 1 and 0 <= rank < world_size, got {micro_batch_size}, "
                             f"rank={rank}, world_size={world_size}.")
        if len(dataset) == 0:
            raise ValueError("Cannot batch an empty dataset.")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.pad_id = pad_id
        self.ignore_index = ignore_index
        self.max_seq_length = max_seq_length
        self.shuffle = shuffle
        self.longest_first = longest_first
        self.pad_to_length = pad_to_length
        self._lengths = dataset.lengths if longest_first else None
        self._orders: dict[int, list[int]] = {}  # the epochs in use (one, or two across a boundary)
        self.position = 0

    @property
    def epoch(self) -> int:
        """The epoch of the next example dealt."""
        return self.position // len(self.dataset)

    def indices(self, start: int, count: int) -> list[int]:
        """The dataset indices at positions `start .. start + count - 1` of the stream of epochs."""
        n = len(self.dataset)
        out: list[int] = []
        while count > 0:
            epoch, at = divmod(start, n)
            if epoch not in self._orders:
                self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
                self._orders[epoch] = epoch_order(n, self.seed, epoch, self.shuffle, self._lengths)
            take = min(count, n - at)
            out += self._orders[epoch][at:at + take]
            start, count = start + take, count - take
        return out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        m = self.micro_batch_size
        while True:
            indices = self.indices(self.position + self.rank * m, m)
            batch = collate([self.dataset[i] for i in indices], self.pad_id, self.ignore_index,
                            self.max_seq_length, self.pad_to_length)
            self.position += self.world_size * m
            yield batch

    def _order_settings(self) -> dict[str, Any]:
        return {"seed": self.seed, "num_samples": len(self.dataset), "shuffle": self.shuffle,
                "longest_first": self.longest_first}

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "epoch": self.epoch, **self._order_settings()}

    def order_differences(self, state: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """The settings of `state` (a `state_dict`) that fix the order and differ from this loader's: (old, new)."""
        return {k: (state[k], v) for k, v in self._order_settings().items() if k in state and state[k] != v}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        differ = self.order_differences(state)
        if differ:
            detail = ", ".join(f"{k} was {old!r}, now {new!r}" for k, (old, new) in differ.items())
            raise ValueError(f"Cannot resume the data order: {detail}; resume with the original settings.")
        if "position" in state:
            position = int(state["position"])
        else:  # checkpoints before the stream (2026-11-24): epochs padded to whole global micro-steps
            done = int(state["step"]) * int(state["world_size"]) * int(state["micro_batch_size"])
            position = int(state["epoch"]) * len(self.dataset) + min(done, len(self.dataset))
        if position < 0:
            raise ValueError(f"Saved data position {position} is negative.")
        self.position = position
