"""Tiny random-weight FLUX.2 models built from the real classes, for tests, the demo and benchmarks.

Nothing is downloaded: the transformer is diffusers' `Flux2Transformer2DModel`,
the VAE `AutoencoderKLFlux2`, the text encoder transformers' `Qwen3ForCausalLM`
(FLUX.2 [klein]'s encoder), and the tokenizer a byte-level BPE built here with
Qwen's special tokens and chat template. Sizes keep what ComfyUI's FLUX.2
loader requires (head size 128, 128 latent channels after patchify).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_TRANSFORMER = dict(
    patch_size=1,
    in_channels=128,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=128,
    num_attention_heads=1,
    joint_attention_dim=96,  # 3 stacked hidden layers x text hidden size 32
    timestep_guidance_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000,
    eps=1e-6,
)
TINY_TEXT_HIDDEN = 32
TINY_TEXT_LAYERS = 3

# Qwen's chat template, reduced to what the FLUX.2 [klein] pipeline uses.
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def tiny_transformer(guidance_embeds: bool = False, seed: int = 0, **overrides):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(**{**TINY_TRANSFORMER, "guidance_embeds": guidance_embeds, **overrides})
    _perturb_zero_inits(model, seed)
    return model.eval()


def _perturb_zero_inits(model: torch.nn.Module, seed: int) -> None:
    """Give every weight a random value, as a trained model has (some layers init to 0)."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8, 8, 8),  # 4 levels: the real 8x downsampling
        layers_per_block=1,
        latent_channels=32,
        norm_num_groups=4,
        sample_size=64,
        mid_block_add_attention=False,
    )
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():  # batch-norm statistics as a trained VAE has them
        vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=g) * 0.1)
        vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape, generator=g) + 0.5)
    return vae.eval()


def tiny_tokenizer():
    """Byte-level BPE (no merges: every byte is a token) with Qwen's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="right",
    )
    fast.chat_template = _CHAT_TEMPLATE
    return fast


def tiny_text_encoder(vocab_size: int, seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=TINY_TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=TINY_TEXT_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    return Qwen3ForCausalLM(cfg).eval()


def tiny_pipeline(guidance_embeds: bool = False, seed: int = 0):
    """A complete FLUX.2 [klein]-style pipeline with tiny random weights."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    tokenizer = tiny_tokenizer()
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0),
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(len(tokenizer), seed),
        tokenizer=tokenizer,
        transformer=tiny_transformer(guidance_embeds=guidance_embeds, seed=seed),
        is_distilled=False,
    )


def build_tiny_pipeline_folder(folder: str | Path, guidance_embeds: bool = False, seed: int = 0) -> Path:
    """Write the tiny pipeline as a diffusers folder (once; an existing complete folder is reused)."""
    folder = Path(folder)
    marker = folder / "model_index.json"
    if marker.is_file() and json.loads(marker.read_text()).get("_flux2_train_tiny") == [guidance_embeds, seed]:
        return folder
    pipe = tiny_pipeline(guidance_embeds=guidance_embeds, seed=seed)
    pipe.save_pretrained(folder, safe_serialization=True)
    index = json.loads(marker.read_text())
    index["_flux2_train_tiny"] = [guidance_embeds, seed]
    marker.write_text(json.dumps(index, indent=2))
    return folder


def build_tiny_clip_folder(folder: str | Path, seed: int = 0) -> Path:
    """A transformers CLIPModel with tiny random weights, its tokenizer (one token per character) and
    image processor, saved as `CLIPModel.from_pretrained` and `CLIPProcessor.from_pretrained` read them."""
    import json
    import string

    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig,
                              CLIPTokenizer, CLIPVisionConfig)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    torch.manual_seed(seed)
    text = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
