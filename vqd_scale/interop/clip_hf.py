"""open_clip text tower → transformers `CLIPTextModel` + `CLIPTokenizer` (what `VQDiffusionPipeline` takes).

Weights: open_clip's fused `in_proj` is split into q/k/v; names follow transformers' CLIP. Tokenizer:
vocab.json / merges.txt are written from open_clip's own bundled BPE (its `encoder` and
`bpe_ranks`), and the pad token is "!" (id 0) because open_clip pads with 0 and the pipeline feeds
every one of the 77 token features (padding included) to the transformer. Known difference: as a
special token "!" is split out of the text, so prompts containing "!" (e.g. "snow!!", id 748 in
open_clip) tokenize differently in the exported tokenizer; every other prompt gives the same ids.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from vqd_scale.compat import import_open_clip
from vqd_scale.errors import UserError


def _activation(clip: nn.Module) -> str:
    """transformers' name for the tower's MLP activation (QuickGELU for OpenAI weights, else GELU)."""
    act = clip.transformer.resblocks[0].mlp.gelu
    if type(act).__name__ == "QuickGELU":
        return "quick_gelu"
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    raise UserError(f"unsupported text MLP activation {act!r} for transformers' CLIPTextModel")


def text_config(clip: nn.Module) -> dict:
    """`CLIPTextConfig` kwargs for an open_clip CLIP's text tower."""
    blocks = clip.transformer.resblocks
    width = clip.ln_final.normalized_shape[0]
    return dict(vocab_size=clip.token_embedding.num_embeddings, hidden_size=width,
                intermediate_size=blocks[0].mlp.c_fc.out_features, num_hidden_layers=len(blocks),
                num_attention_heads=blocks[0].attn.num_heads,
                max_position_embeddings=clip.positional_embedding.shape[0], hidden_act=_activation(clip),
                layer_norm_eps=clip.ln_final.eps, projection_dim=clip.text_projection.shape[1],
                pad_token_id=0, bos_token_id=49406, eos_token_id=49407)


def text_state_dict(clip: nn.Module, prefix: str = "text_model.") -> dict[str, torch.Tensor]:
    """open_clip text-tower weights renamed for `CLIPTextModel` (prefix: "" in transformers 5)."""
    p = prefix
    sd = {p + "embeddings.token_embedding.weight": clip.token_embedding.weight,
          p + "embeddings.position_embedding.weight": clip.positional_embedding,
          p + "final_layer_norm.weight": clip.ln_final.weight, p + "final_layer_norm.bias": clip.ln_final.bias}
    for i, blk in enumerate(clip.transformer.resblocks):
        h = f"{p}encoder.layers.{i}."
        for name, t in zip(("q_proj", "k_proj", "v_proj"), blk.attn.in_proj_weight.chunk(3)):
            sd[f"{h}self_attn.{name}.weight"] = t
        for name, t in zip(("q_proj", "k_proj", "v_proj"), blk.attn.in_proj_bias.chunk(3)):
            sd[f"{h}self_attn.{name}.bias"] = t
        pairs = {"self_attn.out_proj": blk.attn.out_proj, "layer_norm1": blk.ln_1, "layer_norm2": blk.ln_2,
                 "mlp.fc1": blk.mlp.c_fc, "mlp.fc2": blk.mlp.c_proj}
        for name, mod in pairs.items():
            sd[f"{h}{name}.weight"], sd[f"{h}{name}.bias"] = mod.weight, mod.bias
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def to_hf_text_model(clip: nn.Module):
    """A transformers `CLIPTextModel` with the open_clip text tower's weights."""
    import_open_clip()  # torchvision patch before transformers' vision utilities import it
    from transformers import CLIPTextConfig, CLIPTextModel
    model = CLIPTextModel(CLIPTextConfig(**text_config(clip)))
    # transformers 5 dropped the `text_model.` level from CLIPTextModel's own state dict; 4.x has it.
    prefix = "text_model." if any(k.startswith("text_model.") for k in model.state_dict()) else ""
    missing, unexpected = model.load_state_dict(text_state_dict(clip, prefix), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"CLIP text conversion left keys unmapped: missing={missing}, unexpected={unexpected}")
    return model.eval()


def write_hf_tokenizer(folder: str | Path, context_length: int = 77):
    """Write vocab.json/merges.txt from open_clip's bundled BPE; returns the loaded `CLIPTokenizer`."""
    open_clip = import_open_clip()
    from transformers import CLIPTokenizer
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    simple = open_clip.SimpleTokenizer()
    vocab = dict(simple.encoder)
    # Same ids, transformers' names for the two special tokens (else they are appended as new ids).
    for ours, theirs in (("<start_of_text>", "<|startoftext|>"), ("<end_of_text>", "<|endoftext|>")):
        vocab[theirs] = vocab.pop(ours)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)  # rank order = merge priority
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!",
                        model_max_length=context_length)
    tok.save_pretrained(str(folder))
    return tok
