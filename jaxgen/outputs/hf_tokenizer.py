"""The run's tokenizer as Hugging Face files that tokenize and decode exactly as jaxgen does.

A Hugging Face tokenizer (tokenizer.json) goes out as it came in, with its
tokenizer_config.json. For a sentencepiece model, `tokenizer.json` is written from
the model's own pieces and scores (no converter), with a normaliser, pre-tokeniser
and decoder that mirror the sentencepiece settings; a model whose settings it cannot
reproduce is refused before anything is written.
"""

from __future__ import annotations

import base64
import json
import pathlib
import shutil

from sentencepiece import sentencepiece_model_pb2

from jaxgen.data.hf_json_tokenizer import CONFIG_NAME
from jaxgen.data.tokenizer import Tokenizer
from jaxgen.errors import ExportError

Piece = sentencepiece_model_pb2.ModelProto.SentencePiece
TrainerSpec = sentencepiece_model_pb2.TrainerSpec


def check_exportable(tokenizer: Tokenizer) -> None:
    """Refuse, before any work, a tokenizer the Hugging Face files cannot reproduce."""
    if tokenizer.kind == "sentencepiece":
        sentencepiece_model(tokenizer.path)


def sentencepiece_model(path: pathlib.Path) -> sentencepiece_model_pb2.ModelProto:
    """A sentencepiece tokenizer, refused unless `hf_tokenizer_json` reproduces it exactly."""
    if not path.is_file():
        raise ExportError(f"{str(path)!r} does not exist; a Hugging Face export needs the run's tokenizer")
    model = sentencepiece_model_pb2.ModelProto.FromString(path.read_bytes())
    norm, trainer = model.normalizer_spec, model.trainer_spec
    unsupported = {
        f"model_type={TrainerSpec.ModelType.Name(trainer.model_type)}":
            trainer.model_type not in (TrainerSpec.BPE, TrainerSpec.UNIGRAM),
        "byte_fallback=False": not trainer.byte_fallback,
        "remove_extra_whitespaces=True": norm.remove_extra_whitespaces,
        "escape_whitespaces=False": not norm.escape_whitespaces,
        "treat_whitespace_as_suffix=True": trainer.treat_whitespace_as_suffix,
        "unused pieces": any(p.type == Piece.UNUSED for p in model.pieces),
    }
    if found := [setting for setting, present in unsupported.items() if present]:
        raise ExportError(
            f"tokenizer {str(path)!r} has {', '.join(found)}, which a Hugging Face tokenizer cannot reproduce; "
            "use --format safetensors, or a tokenizer from `jaxgen tokenizer train` for the next run"
        )
    return model


def hf_tokenizer_json(model: sentencepiece_model_pb2.ModelProto) -> dict:
    """A tokenizer.json that encodes and decodes exactly as sentencepiece does with `model`.

    Written here rather than converted by transformers, whose Llama tokenizer prepends the
    dummy-prefix space only to text that does not already start with one ("  x" loses a space).
    Sentencepiece normalises the whole text (prefix space, spaces to "▁") and runs its model
    over it without splitting words: the highest-scored pair merges first (BPE), or the best
    path over the piece scores wins (unigram).
    """
    pieces, trainer, norm = model.pieces, model.trainer_spec, model.normalizer_spec
    normal = {p.piece: i for i, p in enumerate(pieces) if p.type == Piece.NORMAL}
    if trainer.model_type == TrainerSpec.BPE:
        # Each piece from any two pieces, highest-scored piece first: tokenizers merges by rank.
        merges = [[piece[:i], piece[i:]] for piece in sorted(normal, key=lambda p: -pieces[normal[p]].score)
                  for i in range(1, len(piece)) if piece[:i] in normal and piece[i:] in normal]
        backend = {"type": "BPE", "dropout": None, "unk_token": pieces[trainer.unk_id].piece,
                   "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                   "byte_fallback": True, "ignore_merges": False,
                   "vocab": {p.piece: i for i, p in enumerate(pieces)}, "merges": merges}
    else:
        # Sentencepiece never finds control or byte pieces ("<s>", "<0x41>") in text; tokenizers'
        # unigram would. Scored below any spelling of their text in normal pieces, they never win.
        lowest = min(pieces[i].score for i in normal.values())
        vocab = [[p.piece, p.score if p.type == Piece.NORMAL else (len(p.piece) + 1) * lowest] for p in pieces]
        backend = {"type": "Unigram", "unk_id": trainer.unk_id, "byte_fallback": True, "vocab": vocab}
    whole = [p.piece for p in pieces if p.type == Piece.USER_DEFINED]  # trained whole: [MASK], <extra_id_0>
    normalizers = [{"type": "Prepend", "prepend": "▁"}] if norm.add_dummy_prefix and not whole else []
    if norm.precompiled_charsmap:
        charsmap = base64.b64encode(norm.precompiled_charsmap).decode()
        normalizers.append({"type": "Precompiled", "precompiled_charsmap": charsmap})
    pre_tokenizer = None
    if whole:
        # Pieces trained whole are taken out of the text before it is normalised; each part left would get
        # its own dummy prefix, so the pre-tokeniser gives it to the text's first part only. A text starting
        # with a space then tokenizes differently from sentencepiece (which adds "▁" anyway).
        pre_tokenizer = {"type": "Metaspace", "replacement": "▁", "split": False,
                         "prepend_scheme": "first" if norm.add_dummy_prefix else "never"}
    else:
        normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": "▁"})
    decoders = [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    if norm.add_dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    bos = pieces[trainer.bos_id].piece
    first, second = ([{"SpecialToken": {"id": bos, "type_id": type_id}}, {"Sequence": {"id": seq, "type_id": type_id}}]
                     for type_id, seq in enumerate("AB"))
    added = [{"id": i, "content": p.piece, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for i, p in enumerate(pieces) if p.type in (Piece.CONTROL, Piece.UNKNOWN)]
    # Pieces trained whole ([MASK], <extra_id_0>, ...) are found in the text wherever they are; not special,
    # so split_special_tokens leaves them whole. Each takes the space before it (lstrip), as jaxgen's prompts
    # do (`jaxgen.tasks.text_inputs.spaces_taken`): "be [MASK]" is "▁be", "[MASK]", as in training, where
    # sentencepiece gives "▁be", "▁", "[MASK]".
    added += [{"id": i, "content": p.piece, "single_word": False, "lstrip": True, "rstrip": False,
               "normalized": False, "special": False}
              for i, p in enumerate(pieces) if p.type == Piece.USER_DEFINED]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers}, "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "TemplateProcessing", "single": first, "pair": first + second,
                           "special_tokens": {bos: {"id": bos, "ids": [trainer.bos_id], "tokens": [bos]}}},
        "decoder": {"type": "Sequence", "decoders": decoders}, "model": backend,
    }


def write_hf_tokenizer(tokenizer: Tokenizer, out: pathlib.Path, max_len: int) -> None:
    """Tokenizer files `transformers.AutoTokenizer` loads."""
    if tokenizer.kind == "sentencepiece":
        write_sentencepiece_as_hf(tokenizer.path, out, max_len)
        return
    files = tokenizer.files()
    (out / tokenizer.file_name).write_bytes(files[tokenizer.file_name])
    config = json.loads(files[CONFIG_NAME])
    if "tokenizer_class" in config:  # as it came in
        (out / CONFIG_NAME).write_bytes(files[CONFIG_NAME])
        return
    # One jaxgen wrote (the tokenizer came without one), or one a Python class was to complete.
    config = {"model_max_length": max_len, **config, "tokenizer_class": "PreTrainedTokenizerFast"}
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_sentencepiece_as_hf(tokenizer_path: pathlib.Path, out: pathlib.Path, max_len: int) -> None:
    """Tokenizer files with which `transformers.AutoTokenizer` tokenizes exactly like jaxgen's sentencepiece model.

    Like jaxgen, it reads "<s>" in text as text (split_special_tokens) and starts each
    sequence with BOS. EOS pads, on the left, for batched generation.
    """
    model = sentencepiece_model(tokenizer_path)
    shutil.copyfile(tokenizer_path, out / "tokenizer.model")
    (out / "tokenizer.json").write_text(json.dumps(hf_tokenizer_json(model), ensure_ascii=False) + "\n",
                                        encoding="utf-8")
    names, trainer = [p.piece for p in model.pieces], model.trainer_spec
    special = {"bos_token": names[trainer.bos_id], "eos_token": names[trainer.eos_id],
               "unk_token": names[trainer.unk_id], "pad_token": names[trainer.eos_id]}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {  # PreTrainedTokenizerFast takes tokenizer.json as it is; LlamaTokenizer rebuilds its normaliser
        "tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": True, "add_eos_token": False,
        "split_special_tokens": True, "padding_side": "left", "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
    }
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def frame_texts(out: pathlib.Path, tokenizer: Tokenizer, *, bos: bool, eos: bool) -> None:
    """Make the written files of a sentencepiece run's tokenizer put BOS and/or EOS around each text, as the
    model was trained: an encoder's [CLS] text [SEP], a T5 input's text EOS. A Hugging Face tokenizer
    keeps the framing it came with."""
    if tokenizer.kind != "sentencepiece":
        return
    path = out / "tokenizer.json"
    written = json.loads(path.read_text(encoding="utf-8"))
    names = {i: piece for piece, i in written["model"]["vocab"].items()} if written["model"]["type"] == "BPE" else {
        i: piece for i, (piece, _) in enumerate(written["model"]["vocab"])}
    ends = [(tokenizer.bos_id, bos), (tokenizer.eos_id, eos)]

    def template(sequence: str, type_id: int) -> list[dict]:
        start, end = ([{"SpecialToken": {"id": names[i], "type_id": type_id}}] if wanted else [] for i, wanted in ends)
        return start + [{"Sequence": {"id": sequence, "type_id": type_id}}] + end

    written["post_processor"] = {
        "type": "TemplateProcessing", "single": template("A", 0), "pair": template("A", 0) + template("B", 1),
        "special_tokens": {names[i]: {"id": names[i], "ids": [i], "tokens": [names[i]]} for i, wanted in ends
                           if wanted}}
    path.write_text(json.dumps(written, ensure_ascii=False) + "\n", encoding="utf-8")
    config = json.loads((out / CONFIG_NAME).read_text())
    config.update(add_bos_token=bos, add_eos_token=eos)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
