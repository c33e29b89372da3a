"""Tiny random-weight diffusers models and a tiny Wan pipeline, built from configs (no downloads)."""

import torch


def tiny_wan(num_layers=2, heads=2, head_dim=16):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=num_layers, cross_attn_norm=True, rope_max_seq_len=64,
    ).eval()


def wan_inputs(batch=2, frames=3, height=5, width=7):
    g = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(batch, 4, frames, 2 * height, 2 * width, generator=g),
        timestep=torch.full((batch,), 500),
        encoder_hidden_states=torch.randn(batch, 7, 32, generator=g),
        return_dict=False,
    )


def tiny_hunyuan():
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6),
    ).eval()


def hunyuan_inputs(batch=2, frames=3, height=5, width=7, text=9, padded=3):
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, text, dtype=torch.long)
    mask[-1, text - padded :] = 0  # the last prompt is shorter: padded text keys are masked
    return dict(
        hidden_states=torch.randn(batch, 4, frames, height, width, generator=g),
        timestep=torch.full((batch,), 500),
        encoder_hidden_states=torch.randn(batch, text, 16, generator=g),
        encoder_attention_mask=mask,
        pooled_projections=torch.randn(batch, 8, generator=g),
        guidance=torch.full((batch,), 3000.0),
        return_dict=False,
    )


def tiny_cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=8, num_layers=2, sample_width=14, sample_height=10, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8,
    ).eval()


def cogvideox_inputs(batch=2, frames=3, height=5, width=7):
    g = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(batch, frames, 4, 2 * height, 2 * width, generator=g),
        encoder_hidden_states=torch.randn(batch, 8, 8, generator=g),
        timestep=torch.full((batch,), 500),
        return_dict=False,
    )


def tiny_tokenizer(words="a bunny runs in the grass video of red blue green sky"):
    """A word-level fast tokenizer built in memory (T5-style special tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words.split())}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_wan_pipeline():
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(
        UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                   relative_attention_num_buckets=8)
    ).eval()
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    ).eval()
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, transformer=tiny_wan(), vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
