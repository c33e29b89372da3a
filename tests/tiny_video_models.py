"""Tiny random-weight configs of every diffusers video transformer sparsevid supports (CPU, no downloads).

``MODELS[class name] = (build, inputs)``: ``build()`` returns the eval() model (seeded), ``inputs(frames,
height, width)`` the forward kwargs (seeded) for a token grid of ``frames x height x width`` after
patchify, batch 2, with ``return_dict=False``. The configs come from a survey of diffusers 0.42.1
(which attention modules see which tokens, checked by instrumenting one forward).
"""

import torch

from tiny_models import cogvideox_inputs, hunyuan_inputs, tiny_cogvideox, tiny_hunyuan, tiny_wan, wan_inputs

B, TEXT, PADDED = 2, 9, 3  # batch; text tokens; the last prompt's padded tail


def _g():
    return torch.Generator().manual_seed(1)


def _text_mask(dtype=torch.long):
    mask = torch.ones(B, TEXT, dtype=dtype)
    mask[-1, TEXT - PADDED:] = 0
    return mask


def _build(name, **config):
    def build():
        import diffusers

        torch.manual_seed(0)
        model = getattr(diffusers, name)(**config).eval()
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():  # zero-initialised modulations make attention a no-op at random init
            for param_name, p in model.named_parameters():
                if "modulation" in param_name and bool((p == 0).all()):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        return model

    return build


_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, out_channels=4, text_dim=32,
            freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, rope_max_seq_len=64)


def _wan_like(channels=4, text=7, **extra):
    def inputs(f, h, w):
        g = _g()
        return dict(hidden_states=torch.randn(B, channels, f, 2 * h, 2 * w, generator=g),
                    timestep=torch.full((B,), 500), encoder_hidden_states=torch.randn(B, text, 32, generator=g),
                    return_dict=False, **{k: v(g, f, h, w) for k, v in extra.items()})

    return inputs


def _helios_inputs(f, h, w, sizes=(4, 2, 1)):
    inputs = _wan_like()(f, h, w)
    g = _g()
    long_, mid, short = sizes
    i_pre, i_long, i_mid, i_1x, i_hid = torch.arange(1 + long_ + mid + short + f).split([1, long_, mid, short, f])
    latent = lambda n: torch.randn(B, 4, n, 2 * h, 2 * w, generator=g)  # noqa: E731
    return dict(inputs, indices_hidden_states=i_hid[None], indices_latents_history_short=torch.cat([i_pre, i_1x])[None],
                indices_latents_history_mid=i_mid[None], indices_latents_history_long=i_long[None],
                latents_history_short=latent(1 + short), latents_history_mid=latent(mid), latents_history_long=latent(long_))


def _anyflow_inputs(f, h, w):
    g = _g()
    return dict(hidden_states=torch.randn(B, f, 4, 2 * h, 2 * w, generator=g), timestep=torch.full((B, f), 500.0),
                r_timestep=torch.full((B, f), 250.0), encoder_hidden_states=torch.randn(B, 7, 32, generator=g),
                return_dict=False)


def _hunyuan15_inputs(f, h, w):
    g = _g()
    mask_2 = torch.ones(B, 5, dtype=torch.long)
    mask_2[-1, 4:] = 0
    return dict(hidden_states=torch.randn(B, 4, f, h, w, generator=g), timestep=torch.full((B,), 500.0),
                encoder_hidden_states=torch.randn(B, TEXT, 16, generator=g), encoder_attention_mask=_text_mask(),
                encoder_hidden_states_2=torch.randn(B, 5, 8, generator=g), encoder_attention_mask_2=mask_2,
                image_embeds=torch.randn(B, 4, 8, generator=g), return_dict=False)


def _motif_inputs(f, h, w):
    g = _g()
    return dict(hidden_states=torch.randn(B, 9, f, 2 * h, 2 * w, generator=g), timestep=torch.full((B,), 500),
                encoder_hidden_states=torch.randn(B, TEXT, 16, generator=g), encoder_attention_mask=_text_mask(),
                image_embeds=torch.randn(B, 4, 8, generator=g), return_dict=False)


def _kandinsky5_inputs(f, h, w):
    g = _g()
    return dict(hidden_states=torch.randn(B, f, 2 * h, 2 * w, 4, generator=g),
                encoder_hidden_states=torch.randn(B, TEXT, 16, generator=g), timestep=torch.full((B,), 500.0),
                pooled_projections=torch.randn(B, 8, generator=g),
                visual_rope_pos=(torch.arange(f), torch.arange(h), torch.arange(w)), text_rope_pos=torch.arange(TEXT),
                scale_factor=(1.0, 2.0, 2.0), return_dict=False)


def _kandinsky6_inputs(f, h, w):
    g = _g()
    return dict(hidden_states=torch.randn(B, f, 2 * h, 2 * w, 9, generator=g),
                encoder_hidden_states=torch.randn(B, TEXT, 16, generator=g),
                pooled_projections=torch.randn(B, 8, generator=g), timestep=torch.full((B,), 500.0),
                audio_hidden_states=torch.randn(B, 6, 4, generator=g), encoder_attention_mask=_text_mask(torch.bool),
                return_dict=False)


def _channels_first_inputs(f, h, w):  # (B, C, F, H, W) latents with text (JoyImage-Edit, EasyAnimate)
    g = _g()
    return dict(hidden_states=torch.randn(B, 4, f, 2 * h, 2 * w, generator=g), timestep=torch.full((B,), 500),
                encoder_hidden_states=torch.randn(B, TEXT, 16, generator=g), return_dict=False)


def _consisid_inputs(f, h, w):
    g = _g()
    return dict(hidden_states=torch.randn(B, f, 4, 2 * h, 2 * w, generator=g),
                encoder_hidden_states=torch.randn(B, 8, 8, generator=g), timestep=torch.full((B,), 500),
                return_dict=False)


def _ltx_inputs(f, h, w):
    g = _g()
    return dict(hidden_states=torch.randn(B, f * h * w, 4, generator=g),
                encoder_hidden_states=torch.randn(B, TEXT, 16, generator=g), timestep=torch.full((B,), 500),
                encoder_attention_mask=_text_mask(), num_frames=f, height=h, width=w,
                rope_interpolation_scale=(8 / 25, 32, 32), return_dict=False)


def _ltx2_inputs(f, h, w):
    g = _g()
    return dict(hidden_states=torch.randn(B, f * h * w, 4, generator=g), audio_hidden_states=torch.randn(B, 6, 4, generator=g),
                encoder_hidden_states=torch.randn(B, TEXT, 16, generator=g),
                audio_encoder_hidden_states=torch.randn(B, TEXT, 16, generator=g), timestep=torch.full((B,), 500.0),
                encoder_attention_mask=_text_mask(), audio_encoder_attention_mask=_text_mask(), num_frames=f, height=h,
                width=w, audio_num_frames=6, return_dict=False)


def _mochi_inputs(f, h, w):
    g = _g()
    return dict(hidden_states=torch.randn(B, 4, f, 2 * h, 2 * w, generator=g),
                encoder_hidden_states=torch.randn(B, TEXT, 16, generator=g), timestep=torch.full((B,), 500),
                encoder_attention_mask=_text_mask(torch.bool), return_dict=False)


def _cosmos_inputs(f, h, w):
    g = _g()
    return dict(hidden_states=torch.randn(B, 4, f, 2 * h, 2 * w, generator=g), timestep=torch.full((B,), 500.0),
                encoder_hidden_states=torch.randn(B, TEXT, 16, generator=g), attention_mask=_text_mask(torch.bool),
                fps=24, return_dict=False)


def _allegro_inputs(f, h, w):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro

    *freqs, grid_t, grid_h, grid_w = get_3d_rotary_pos_embed_allegro(
        embed_dim=24, crops_coords=((0, 0), (h, w)), grid_size=(h, w), temporal_size=f,
        interpolation_scale=(2.2, 2.0, 2.0))
    pos = torch.cartesian_prod(grid_t.long(), grid_h.long(), grid_w.long()).reshape(-1, 3).T.reshape(3, 1, -1)
    g = _g()
    return dict(hidden_states=torch.randn(B, 4, f, 2 * h, 2 * w, generator=g),
                encoder_hidden_states=torch.randn(B, TEXT, 16, generator=g), timestep=torch.full((B,), 500),
                encoder_attention_mask=_text_mask(), image_rotary_emb=(tuple(freqs), tuple(pos.contiguous())),
                return_dict=False)


def _sana_wm_inputs(f, h, w):
    g = _g()
    return dict(hidden_states=torch.randn(B, 4, f, h, w, generator=g), timestep=torch.full((B, 1, f), 500.0),
                encoder_hidden_states=torch.randn(B, 1, TEXT, 16, generator=g), encoder_attention_mask=_text_mask(),
                return_dict=False)


def _shifted(inputs_fn):
    """The default tiny inputs' signature: (f, h, w) with the defaults used by the tests."""
    return lambda frames=3, height=5, width=7: inputs_fn(frames, height, width)


MODELS = {
    "WanTransformer3DModel": (tiny_wan, lambda frames=3, height=5, width=7: wan_inputs(B, frames, height, width)),
    "HunyuanVideoTransformer3DModel": (tiny_hunyuan,
                                       lambda frames=3, height=5, width=7: hunyuan_inputs(B, frames, height, width)),
    "CogVideoXTransformer3DModel": (tiny_cogvideox,
                                    lambda frames=3, height=5, width=7: cogvideox_inputs(B, frames, height, width)),
    "WanVACETransformer3DModel": (
        _build("WanVACETransformer3DModel", in_channels=4, vace_layers=[0, 1], vace_in_channels=6, **_WAN),
        _shifted(_wan_like(control_hidden_states=lambda g, f, h, w: torch.randn(B, 6, f, 2 * h, 2 * w, generator=g)))),
    "SkyReelsV2Transformer3DModel": (_build("SkyReelsV2Transformer3DModel", in_channels=4, **_WAN), _shifted(_wan_like())),
    "ChronoEditTransformer3DModel": (
        _build("ChronoEditTransformer3DModel", in_channels=12, image_dim=16, added_kv_proj_dim=32,
               rope_temporal_skip_len=8, **_WAN),
        _shifted(_wan_like(12, 512, encoder_hidden_states_image=lambda g, f, h, w: torch.randn(B, 5, 16, generator=g)))),
    "WanAnimateTransformer3DModel": (
        _build("WanAnimateTransformer3DModel", in_channels=12, latent_channels=4, image_dim=16, added_kv_proj_dim=None,
               motion_encoder_channel_sizes={"4": 8, "8": 8}, motion_encoder_size=8, motion_style_dim=8, motion_dim=4,
               motion_encoder_dim=8, face_encoder_hidden_dim=8, face_encoder_num_heads=2, inject_face_latents_blocks=1,
               motion_encoder_batch_size=8, **_WAN),
        _shifted(_wan_like(
            12, encoder_hidden_states_image=lambda g, f, h, w: torch.randn(B, 5, 16, generator=g),
            pose_hidden_states=lambda g, f, h, w: torch.randn(B, 4, f - 1, 2 * h, 2 * w, generator=g),
            face_pixel_values=lambda g, f, h, w: torch.rand(B, 3, 4 * f - 7, 8, 8, generator=g) * 2 - 1))),
    "HeliosTransformer3DModel": (
        _build("HeliosTransformer3DModel", in_channels=4, rope_dim=(4, 6, 6), guidance_cross_attn=True,
               zero_history_timestep=True, has_multi_term_memory_patch=True, is_amplify_history=False,
               **{k: v for k, v in _WAN.items() if k != "rope_max_seq_len"}),
        _shifted(_helios_inputs)),
    "AnyFlowTransformer3DModel": (_build("AnyFlowTransformer3DModel", in_channels=4, **_WAN), _shifted(_anyflow_inputs)),
    "HunyuanVideo15Transformer3DModel": (
        _build("HunyuanVideo15Transformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2,
               attention_head_dim=16, num_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1,
               text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=8, rope_axes_dim=(4, 6, 6)),
        _shifted(_hunyuan15_inputs)),
    "MotifVideoTransformer3DModel": (
        _build("MotifVideoTransformer3DModel", in_channels=9, out_channels=4, num_attention_heads=2,
               attention_head_dim=16, num_layers=1, num_single_layers=2, num_decoder_layers=1, patch_size=2,
               patch_size_t=1, text_embed_dim=16, image_embed_dim=8, rope_axes_dim=(4, 6, 6),
               enable_text_cross_attention_dual=True, enable_text_cross_attention_single=True),
        _shifted(_motif_inputs)),
    "Kandinsky5Transformer3DModel": (
        _build("Kandinsky5Transformer3DModel", in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16,
               out_visual_dim=4, patch_size=(1, 2, 2), model_dim=32, ff_dim=64, num_text_blocks=1,
               num_visual_blocks=2, axes_dims=(4, 6, 6), visual_cond=False),
        _shifted(_kandinsky5_inputs)),
    "Kandinsky6Transformer3DModel": (
        _build("Kandinsky6Transformer3DModel", in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=8,
               time_dim=16, patch_size=(1, 2, 2), model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2,
               axes_dims=(4, 6, 6), visual_cond=True, in_audio_dim=4, out_audio_dim=4, text_token_padding=True,
               ca_rope=True, cross_gates=True, fix_modulation=True, visual_token_type_num_embeddings=2),
        _shifted(_kandinsky6_inputs)),
    "JoyImageEditTransformer3DModel": (
        _build("JoyImageEditTransformer3DModel", patch_size=[1, 2, 2], in_channels=4, hidden_size=32,
               num_attention_heads=2, text_dim=16, num_layers=2, rope_dim_list=[4, 6, 6], rope_type="rope"),
        _shifted(_channels_first_inputs)),
    "ConsisIDTransformer3DModel": (
        _build("ConsisIDTransformer3DModel", num_attention_heads=3, attention_head_dim=16, in_channels=4,
               out_channels=4, time_embed_dim=2, text_embed_dim=8, num_layers=2, sample_width=14, sample_height=10,
               sample_frames=9, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=8,
               use_rotary_positional_embeddings=False, is_train_face=False),
        _shifted(_consisid_inputs)),
    "EasyAnimateTransformer3DModel": (
        _build("EasyAnimateTransformer3DModel", num_attention_heads=2, attention_head_dim=16, in_channels=4,
               out_channels=4, patch_size=2, sample_width=14, sample_height=10, num_layers=2, mmdit_layers=1,
               time_embed_dim=8, text_embed_dim=16),
        _shifted(_channels_first_inputs)),
    "LTXVideoTransformer3DModel": (
        _build("LTXVideoTransformer3DModel", in_channels=4, out_channels=4, patch_size=1, patch_size_t=1,
               num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32, num_layers=2, caption_channels=16),
        _shifted(_ltx_inputs)),
    "LTX2VideoTransformer3DModel": (
        _build("LTX2VideoTransformer3DModel", in_channels=4, out_channels=4, patch_size=1, patch_size_t=1,
               num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32, audio_in_channels=4,
               audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=8,
               audio_cross_attention_dim=16, num_layers=2, caption_channels=16),
        _shifted(_ltx2_inputs)),
    "MochiTransformer3DModel": (
        _build("MochiTransformer3DModel", patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2,
               pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=8),
        _shifted(_mochi_inputs)),
    "CosmosTransformer3DModel": (
        _build("CosmosTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
               num_layers=2, mlp_ratio=2.0, text_embed_dim=16, adaln_lora_dim=8, max_size=(8, 16, 16),
               patch_size=(1, 2, 2), concat_padding_mask=False, extra_pos_embed_type="learnable"),
        _shifted(_cosmos_inputs)),
    "AllegroTransformer3DModel": (
        _build("AllegroTransformer3DModel", patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=24,
               in_channels=4, out_channels=4, num_layers=2, cross_attention_dim=48, sample_height=10, sample_width=14,
               sample_frames=3, caption_channels=16),
        _shifted(_allegro_inputs)),
    "SanaWMTransformer3DModel": (
        _build("SanaWMTransformer3DModel", in_channels=4, num_layers=2, hidden_size=32, num_attention_heads=2,
               patch_size=(1, 1, 1), softmax_every_n=1, linear_head_dim=16, caption_channels=16, mlp_ratio=2.0,
               chunk_plucker_channels=6),
        _shifted(_sana_wm_inputs)),
}
