"""Tiny, randomly initialised stand-ins for the evaluation models, in the layouts the real ones use.

`write_eval_models(DIR)` writes, each a transformers folder with safetensors weights and an
offline tokenizer or image processor written by code:

    DIR/captioner/   VisionEncoderDecoderModel: ViT encoder + GPT-2 decoder, byte-level BPE
                     tokenizer, ViTImageProcessor   (as nlpconnect/vit-gpt2-image-captioning)
    DIR/sentence/    BertModel + WordPiece tokenizer, with sentence-transformers' modules.json and
                     mean-pooling config              (as sentence-transformers/all-MiniLM-L6-v2)
    DIR/dino/        ViTModel without pooler + ViTImageProcessor        (as facebook/dino-vits16)
    DIR/clip/        CLIPModel + CLIPProcessor       (as openai/clip-vit-large-patch14)

Their numbers mean nothing; they prove the loading and measuring code on the real classes.
"""

from __future__ import annotations

import json
from pathlib import Path

from cinefx.testing.tiny import _bytes_to_unicode, write_tokenizer

IMAGE = 32  # the tiny vision models' input side
PATCH = 8
HIDDEN = 32
_WORDS = ("a", "man", "woman", "cat", "dog", "street", "sitting", "standing", "on", "in", "of",
          "the", "with", "table", "red", "blue", "photo", "film", "night", "light", "cinematic")


def _vit_config(**extra):
    from transformers import ViTConfig

    return ViTConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     image_size=IMAGE, patch_size=PATCH, **extra)


def _vit_processor():
    from transformers import ViTImageProcessor

    return ViTImageProcessor(size={"height": IMAGE, "width": IMAGE})


def write_gpt2_tokenizer(folder: Path) -> int:
    """Byte-level BPE files as GPT-2's (every byte a token, a few whole words merged, with the
    leading-space marker). Returns the vocabulary size; <|endoftext|> is the last id."""
    from transformers import GPT2TokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    space = _bytes_to_unicode()[ord(" ")]
    vocab = {c: i for i, c in enumerate(_bytes_to_unicode().values())}
    merges: list[str] = []
    for word in _WORDS:
        pieces = [space, *word]
        while len(pieces) > 1:
            merge = f"{pieces[0]} {pieces[1]}"
            if merge not in merges:
                merges.append(merge)
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    # file paths positionally: transformers 4 calls them vocab_file/merges_file, 5 vocab/merges
    tok = GPT2TokenizerFast(str(folder / "vocab.json"), str(folder / "merges.txt"),
                            bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                            model_max_length=64)
    tok.save_pretrained(folder)
    return len(vocab)


def write_wordpiece_tokenizer(folder: Path) -> int:
    """BERT's WordPiece files (special tokens, whole words, single characters and ## pieces).
    Returns the vocabulary size."""
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?'-")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_WORDS, *chars, *(f"##{c}" for c in chars)]
    tokens = list(dict.fromkeys(tokens))
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    BertTokenizerFast(str(folder / "vocab.txt"), do_lower_case=True,
                      model_max_length=128).save_pretrained(folder)
    return len(tokens)


def write_eval_models(folder: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write the four tiny models into `folder` (created). Returns role → folder, the roles being
    `cinefx.eval.models.EvalModelSpec`'s fields."""
    from cinefx.eval.models import quiet_transformers

    quiet_transformers()  # before the imports below, which advise installing torchvision
    import torch
    from transformers import (BertConfig, BertModel, CLIPConfig, CLIPImageProcessor, CLIPModel,
                              CLIPProcessor, CLIPTokenizer, GPT2Config, GPT2LMHeadModel, GenerationConfig,
                              ViTModel, VisionEncoderDecoderModel)

    folder = Path(folder)
    out = {role: folder / role for role in ("captioner", "sentence", "dino", "clip")}

    torch.manual_seed(seed)
    vocab = write_gpt2_tokenizer(out["captioner"])
    eos = vocab - 1
    decoder = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=HIDDEN, n_layer=2, n_head=4,
                                         add_cross_attention=True, bos_token_id=eos, eos_token_id=eos))
    with torch.no_grad():  # a random decoder would mostly stop at once; keep it talking for 16 tokens
        decoder.transformer.wte.weight[eos] = 0
    captioner = VisionEncoderDecoderModel(encoder=ViTModel(_vit_config(), add_pooling_layer=False), decoder=decoder)
    captioner.config.decoder_start_token_id = captioner.config.pad_token_id = eos
    captioner.config.eos_token_id = eos
    captioner.generation_config = GenerationConfig(decoder_start_token_id=eos, pad_token_id=eos, eos_token_id=eos,
                                                   bos_token_id=eos)
    captioner.save_pretrained(out["captioner"], safe_serialization=True)
    _vit_processor().save_pretrained(out["captioner"])

    torch.manual_seed(seed + 1)
    vocab = write_wordpiece_tokenizer(out["sentence"])
    BertModel(BertConfig(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=128), add_pooling_layer=False) \
        .save_pretrained(out["sentence"], safe_serialization=True)
    # sentence-transformers' own description of the model: transformer → mean pooling → normalise
    (out["sentence"] / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (out["sentence"] / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128,
                                                                           "do_lower_case": False}))
    (out["sentence"] / "1_Pooling").mkdir(exist_ok=True)
    (out["sentence"] / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": HIDDEN, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}))
    (out["sentence"] / "2_Normalize").mkdir(exist_ok=True)

    torch.manual_seed(seed + 2)
    ViTModel(_vit_config(), add_pooling_layer=False).save_pretrained(out["dino"], safe_serialization=True)
    _vit_processor().save_pretrained(out["dino"])

    torch.manual_seed(seed + 3)
    vocab = write_tokenizer(out["clip"])  # the CLIP BPE files of the tiny diffusion bundle
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab - 2,
                         eos_token_id=vocab - 1, pad_token_id=vocab - 1),
        vision_config=dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMAGE, patch_size=PATCH),
        projection_dim=HIDDEN))
    clip.save_pretrained(out["clip"], safe_serialization=True)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": IMAGE},
                                                     crop_size={"height": IMAGE, "width": IMAGE}),
                  tokenizer=CLIPTokenizer.from_pretrained(out["clip"])).save_pretrained(out["clip"])
    return out
