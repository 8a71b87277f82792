"""Token data for calibration and evaluation: documents → packed fixed-length sequences → batches.

The pipeline is deliberately plain tensors:

* :func:`as_documents` turns what a caller has (a token tensor, an iterable of token tensors or
  lists, a text file or folder plus a tokenizer, a Hugging Face ``datasets`` object) into a list of
  1-D int64 token tensors;
* :func:`pack` concatenates the documents (with an optional separator token) and cuts the stream
  into ``[N, seq_len]`` sequences, dropping the tail;
* :func:`heldout_split` sets aside every k-th sequence for evaluation (deterministic, no RNG, spread
  evenly over the corpus so that no single document is the whole evaluation set);
* :class:`BatchStream` serves batch ``i`` of an endless, per-epoch shuffled order that is a pure
  function of ``(seed, i)``, so a resumed run sees exactly the batches an uninterrupted one would,
  and data-parallel ranks take disjoint slices of the same global batch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from swapformer.errors import InputError

TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst")
_CHUNK_CHARS = 8192


@dataclass
class TokenSplits:
    """Packed training and held-out sequences, both ``[N, seq_len]`` int64."""

    train: torch.Tensor
    heldout: torch.Tensor

    @property
    def seq_len(self) -> int:
        return int(self.train.shape[1])


def tokenize_documents(docs: Sequence[str], tokenizer: Any) -> list[torch.Tensor]:
    """Tokenize each document without special tokens (batched, in paragraph-aligned chunks).

    Long documents are cut after blank lines into pieces of about 8 K characters, so the tokenizer
    never sees a sequence longer than its nominal maximum; a token never spans a blank line anyway.
    """
    out = []
    for doc in docs:
        pieces = _paragraph_chunks(doc)
        ids = tokenizer(pieces, add_special_tokens=False)["input_ids"] if pieces else []
        out.append(torch.tensor([t for piece in ids for t in piece], dtype=torch.long))
    return out


def _paragraph_chunks(text: str) -> list[str]:
    paragraphs = re.split(r"(?<=\n\n)(?=\S)", text)
    chunks: list[str] = []
    current = ""
    for p in paragraphs:
        if current and len(current) + len(p) > _CHUNK_CHARS:
            chunks.append(current)
            current = ""
        current += p
    if current:
        chunks.append(current)
    return chunks


def as_documents(data: Any, tokenizer: Any = None) -> list[torch.Tensor]:
    """Normalise ``data`` to a list of 1-D int64 token tensors.

    Args:
        data: a 1-D token tensor (one document), a 2-D tensor (one document per row), an iterable
            of token tensors or integer lists, a path to a text file or a folder of text files (needs
            ``tokenizer``), or a Hugging Face ``datasets`` object with an ``input_ids`` or ``text``
            column.
        tokenizer: a Hugging Face tokenizer, needed for text.

    Raises:
        InputError: a path that does not exist, text without a tokenizer, or an unknown type.
    """
    if isinstance(data, torch.Tensor):
        return _tensor_documents(data)
    if isinstance(data, (str, Path)):
        tokenizer = _need(tokenizer, "text files")
        return tokenize_documents(_read_texts(Path(data)), tokenizer)
    if hasattr(data, "column_names"):
        return _dataset_documents(data, tokenizer)
    if isinstance(data, Iterable):
        return [_as_token_tensor(d) for d in data]
    raise InputError(f"cannot read token data from a {type(data).__name__}")


def _tensor_documents(data: torch.Tensor) -> list[torch.Tensor]:
    if data.dtype.is_floating_point or data.dtype == torch.bool:
        raise InputError(f"token tensors must hold integers, got {data.dtype}")
    if data.dim() == 1:
        return [data.long()]
    if data.dim() == 2:
        return [row.long() for row in data]
    raise InputError(f"token tensors must be 1-D or 2-D, got shape {tuple(data.shape)}")


def _as_token_tensor(doc: Any) -> torch.Tensor:
    t = doc if isinstance(doc, torch.Tensor) else torch.as_tensor(doc)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise InputError(f"token sequences must hold integers, got {t.dtype}")
    return t.reshape(-1).long()


def _need(tokenizer: Any, what: str) -> Any:
    if tokenizer is None:
        raise InputError(f"{what} need a tokenizer: pass tokenizer=...")
    return tokenizer


def _read_texts(path: Path) -> list[str]:
    if path.is_file():
        return [path.read_text(encoding="utf-8", errors="replace")]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise InputError(f"folder {path} holds no text files ({', '.join(TEXT_SUFFIXES)})")
        return [p.read_text(encoding="utf-8", errors="replace") for p in files]
    raise InputError(f"no such file or folder: {path}")


def _dataset_documents(data: Any, tokenizer: Any) -> list[torch.Tensor]:
    columns = list(data.column_names)
    if "input_ids" in columns:
        return [_as_token_tensor(d) for d in data["input_ids"]]
    if "text" in columns:
        return tokenize_documents(list(data["text"]), _need(tokenizer, "text datasets"))
    raise InputError(f"dataset needs an 'input_ids' or 'text' column, has {columns}")


def pack(docs: Iterable[torch.Tensor], seq_len: int, *, sep_token: int | None = None) -> torch.Tensor:
    """Concatenate documents (``sep_token`` after each, when given) and cut ``[N, seq_len]``.

    The incomplete tail is dropped.

    Raises:
        InputError: ``seq_len < 2`` or fewer than ``seq_len`` tokens in all.
    """
    if seq_len < 2:
        raise InputError(f"seq_len must be at least 2, got {seq_len}")
    parts: list[torch.Tensor] = []
    for doc in docs:
        parts.append(doc.reshape(-1).long())
        if sep_token is not None:
            parts.append(torch.tensor([sep_token], dtype=torch.long))
    stream = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
    n = stream.numel() // seq_len
    if n == 0:
        raise InputError(f"{stream.numel()} tokens cannot fill one sequence of {seq_len}")
    return stream[: n * seq_len].reshape(n, seq_len).clone()


def heldout_split(seqs: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split packed sequences into (train, held-out): every k-th sequence is held out, k ≈ 1/fraction.

    Deterministic and spread evenly over the corpus. ``fraction == 0`` holds nothing out.

    Raises:
        InputError: fraction outside ``[0, 0.5]`` or too few sequences to hold one out.
    """
    if not 0.0 <= fraction <= 0.5:
        raise InputError(f"held-out fraction must be in [0, 0.5], got {fraction}")
    if fraction == 0.0:
        return seqs, seqs[:0]
    step = max(2, round(1.0 / fraction))
    held = torch.zeros(seqs.shape[0], dtype=torch.bool)
    held[step - 1 :: step] = True
    if not held.any():
        raise InputError(
            f"{seqs.shape[0]} sequences are too few to hold out a fraction of {fraction}"
        )
    return seqs[~held], seqs[held]


def prepare(
    data: Any,
    *,
    seq_len: int,
    tokenizer: Any = None,
    eval_fraction: float = 0.0,
    sep_token: int | None = None,
) -> TokenSplits:
    """Any supported data form → packed :class:`TokenSplits`.

    A :class:`TokenSplits` is returned unchanged (its sequence length must equal ``seq_len``). A 2-D
    tensor whose width equals ``seq_len`` is taken as already packed. Otherwise documents are packed
    with ``sep_token`` (default: the tokenizer's EOS token, if any).
    """
    if isinstance(data, TokenSplits):
        if data.seq_len != seq_len:
            raise InputError(f"data is packed to {data.seq_len} tokens, config asks for {seq_len}")
        return data
    if isinstance(data, torch.Tensor) and data.dim() == 2 and data.shape[1] == seq_len:
        seqs = _tensor_documents(data)
        packed = torch.stack(seqs)
    else:
        if sep_token is None and tokenizer is not None:
            sep_token = getattr(tokenizer, "eos_token_id", None)
        packed = pack(as_documents(data, tokenizer), seq_len, sep_token=sep_token)
    train, heldout = heldout_split(packed, eval_fraction)
    return TokenSplits(train=train, heldout=heldout)


class BatchStream:
    """Batches of an endless stream of sequences reshuffled every epoch, addressable by index.

    Global batch ``i`` is the ``batch_size * world_size`` sequences at stream positions
    ``[i * gb, (i + 1) * gb)``; rank ``r`` takes the ``r``-th slice of ``batch_size``. The order of
    epoch ``e`` is ``randperm(N)`` seeded with ``seed + e``; ``shuffle=False`` keeps corpus order.
    """

    def __init__(
        self,
        seqs: torch.Tensor,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if seqs.dim() != 2 or seqs.shape[0] == 0:
            raise InputError(f"need a non-empty [N, T] tensor of sequences, got {tuple(seqs.shape)}")
        if batch_size < 1:
            raise InputError(f"batch_size must be positive, got {batch_size}")
        self.seqs = seqs
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self._orders: dict[int, torch.Tensor] = {}

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one global batch (all ranks)."""
        return self.batch_size * self.world_size * int(self.seqs.shape[1])

    def passes(self, batches: int) -> float:
        """Passes over the sequences that global batches ``0 .. batches − 1`` make; above 1 the stream
        has started another epoch and rows repeat."""
        return batches * self.batch_size * self.world_size / int(self.seqs.shape[0])

    def batch(self, index: int) -> torch.Tensor:
        """This rank's ``[batch_size, T]`` slice of global batch ``index``."""
        start = (index * self.world_size + self.rank) * self.batch_size
        rows = [self._sequence_index(p) for p in range(start, start + self.batch_size)]
        return self.seqs[torch.tensor(rows)]

    def _sequence_index(self, position: int) -> int:
        n = int(self.seqs.shape[0])
        epoch, offset = divmod(position, n)
        if not self.shuffle:
            return offset
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._orders = {epoch: torch.randperm(n, generator=gen)}
        return int(self._orders[epoch][offset])
