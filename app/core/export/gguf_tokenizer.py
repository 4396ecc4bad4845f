"""The tokenizer of a GGUF file: a byte-level BPE tokenizer.json written as llama.cpp's "gpt2"
model, with the pre-tokenizer llama.cpp must split text with, identified as convert_hf_to_gguf.py
does (by the token ids of a check text), and the chat template and special token ids."""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path

import gguf

from app.core.errors import ExportError

_CHKTXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
           "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
           "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
           "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
# sha256(str(token ids of _CHKTXT)) -> llama.cpp pre-tokenizer, from convert_hf_to_gguf.py's table
_PRE_BY_HASH = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
PRE_TOKENIZERS = set(_PRE_BY_HASH.values()) | {"gpt-2", "smollm", "llama-bpe", "qwen2", "default"}
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, config: dict,
                  pre_tokenizer: str = "", space_prefix: bool = True) -> tuple[str, list[str]]:
    """The vocabulary, pre-tokenizer, special tokens and chat template; `space_prefix` False for a
    SentencePiece tokenizer that adds no space before the first word (Gemma's)."""
    file = model_dir / "tokenizer.json"
    if not file.exists():
        raise ExportError(f"{model_dir}: no tokenizer.json; GGUF export needs the fast tokenizer file "
                          "(save the tokenizer with save_pretrained from transformers)")
    spec = json.loads(file.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if tokenizer_kind(model_dir) == "llama":
        return _add_sentencepiece(writer, model_dir, config, space_prefix)
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or not byte_level:
        raise ExportError(f"{file}: the tokenizer is {model.get('type')}, neither byte-level BPE (Llama 3, Qwen2, "
                          "SmolLM) nor SentencePiece (Llama 2, Mistral 7B), which is what GGUF export writes; "
                          "use llama.cpp's convert_hf_to_gguf.py for this model")
    n_vocab = config["vocab_size"]
    vocab = dict(model["vocab"]) | {a["content"]: a["id"] for a in spec.get("added_tokens", [])}
    bad = next(((text, i) for text, i in vocab.items()
                if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n_vocab), None)
    if bad is not None:
        raise ExportError(f"{file}: token {bad[0]!r} has id {bad[1]!r}, outside 0..{n_vocab - 1} (vocab_size in "
                          "config.json); the tokenizer file is damaged or belongs to another model")
    tokens, types = [f"[PAD{i}]" for i in range(n_vocab)], [gguf.TokenType.UNUSED] * n_vocab
    for text, token_id in vocab.items():
        tokens[token_id], types[token_id] = text, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        text = added["content"]
        looks_special = text in ("<pad>", "<mask>") or (text.startswith("<|") and text.endswith("|>"))
        if added.get("special") or looks_special:
            types[added["id"]] = gguf.TokenType.CONTROL
        else:
            tokens[added["id"]], types[added["id"]] = text.replace("\u2581", " "), gguf.TokenType.USER_DEFINED
    pre, warnings = _pre_tokenizer(file, spec, pre_tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise ExportError(f"{file}: the BPE tokenizer has no merges; the file is incomplete")
    special.add_special_token.setdefault("bos", False)  # HF adds no BOS unless its post-processor does
    special.add_to_gguf(writer, quiet=True)
    if special.chat_template is None:
        warnings.append("the tokenizer has no chat template; Ollama will need a TEMPLATE in the Modelfile")
    return pre, warnings


def tokenizer_kind(model_dir: Path) -> str:
    """llama.cpp's tokenizer model for this folder: "llama" (SentencePiece: a BPE tokenizer.json with
    byte fallback, as Llama 2 and Mistral 7B have, or only a tokenizer.model) or "gpt2" (byte-level BPE)."""
    file = Path(model_dir) / "tokenizer.json"
    if not file.exists():
        return "llama" if (Path(model_dir) / "tokenizer.model").exists() else "gpt2"
    try:
        model = json.loads(file.read_text(encoding="utf-8")).get("model") or {}
    except (OSError, ValueError):
        return "gpt2"
    return "llama" if model.get("byte_fallback") else "gpt2"


def _add_sentencepiece(writer: gguf.GGUFWriter, model_dir: Path, config: dict,
                       space_prefix: bool = True) -> tuple[str, list[str]]:
    """A SentencePiece vocabulary (pieces, scores, types) read from tokenizer.model by the gguf
    package's own SentencePieceVocab, as convert_hf_to_gguf.py does; padded to vocab_size."""
    if not (model_dir / "tokenizer.model").exists():
        raise ExportError(f"{model_dir}: a SentencePiece tokenizer without its tokenizer.model; copy tokenizer.model "
                          "from the original model into the folder")
    try:
        vocab = gguf.vocab.SentencePieceVocab(model_dir)
    except RuntimeError:  # sentencepiece is not installed
        raise ExportError(f"{model_dir}: writing a SentencePiece tokenizer (Llama 2, Mistral 7B) to GGUF needs the "
                          "sentencepiece package; install it with pip install 'tunesmith[gguf]'") from None
    except (OSError, ValueError) as err:
        raise ExportError(f"{model_dir / 'tokenizer.model'}: cannot read it ({str(err)[:160]})") from None
    n_vocab = config["vocab_size"]
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    if len(tokens) > n_vocab:
        raise ExportError(f"{model_dir / 'tokenizer.model'}: {len(tokens)} pieces, more than vocab_size {n_vocab} in "
                          "config.json; the tokenizer belongs to another model")
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    _overlay_added_tokens(model_dir, tokens, scores, types)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    if not space_prefix:
        writer.add_add_space_prefix(False)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, n_vocab=n_vocab)
    special.add_to_gguf(writer, quiet=True)
    warnings = [] if special.chat_template is not None else [
        "the tokenizer has no chat template; Ollama will need a TEMPLATE in the Modelfile"]
    return "default", warnings


def _overlay_added_tokens(model_dir: Path, tokens: list, scores: list, types: list) -> None:
    """The tokens tokenizer.json adds beyond tokenizer.model (Phi-3's <|user|>, <|end|> ...), as
    convert_hf_to_gguf.py puts them in: control tokens when special, user-defined otherwise."""
    try:
        added = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8")).get("added_tokens") or []
    except (OSError, ValueError):
        return
    for token in added:
        token_id = token.get("id")
        if isinstance(token_id, int) and 0 <= token_id < len(tokens) and isinstance(token.get("content"), str):
            tokens[token_id] = token["content"].encode("utf-8")
            scores[token_id] = -1000.0
            types[token_id] = gguf.TokenType.CONTROL if token.get("special") else gguf.TokenType.USER_DEFINED


def _pre_tokenizer(file: Path, spec: dict, override: str = "") -> tuple[str, list[str]]:
    """llama.cpp's pre-tokenizer name: `override` when given, else by its token-hash table, else by
    the tokenizer.json structure; refused when none of them knows it."""
    from tokenizers import Tokenizer

    if override:
        if override not in PRE_TOKENIZERS:
            raise ExportError(f"--pre-tokenizer {override}: not one we can write; choose one of "
                              f"{', '.join(sorted(PRE_TOKENIZERS))}")
        return override, [f"pre-tokenizer '{override}' set by hand (--pre-tokenizer), not identified from "
                          "the tokenizer: llama.cpp splits text that way"]

    try:
        ids = Tokenizer.from_file(str(file)).encode(_CHKTXT).ids
    except Exception as err:  # noqa: BLE001 - the tokenizers library raises a bare Exception
        raise ExportError(f"{file}: the tokenizers library cannot read it ({str(err)[:160]})") from None
    name = _PRE_BY_HASH.get(sha256(str(ids).encode()).hexdigest())
    if name:
        return name, []
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    pattern = next((s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"), None)
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2", []
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm", []
    if pattern == _LLAMA3_SPLIT:
        return "llama-bpe", []
    if pattern == _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}"):
        return "qwen2", []
    raise ExportError(f"{file}: pre-tokenizer not recognised (neither its token hash nor its structure); "
                      "a GGUF file would split some text differently from transformers. If you know llama.cpp's "
                      "name for it, pass --pre-tokenizer NAME (e.g. llama-bpe, qwen2, gpt-2)")
