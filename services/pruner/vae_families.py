"""Preview decoders for the VAEs that normalise latents their own way (registered by VAE class in
``decode._VAE_DECODERS``). Each undoes exactly what its pipeline undoes before ``vae.decode``; the
trainer's adapters do the same (tested to agree).
"""

from __future__ import annotations

from epgrpo.services.pruner.decode import VaeDecoder


class QwenImageVaeDecoder(VaeDecoder):
    """Qwen-Image: latents [N, z_dim, h, w] -> ``x / (1 / latents_std) + latents_mean`` per channel,
    decoded as one-frame videos ([N, z_dim, 1, h, w]) and the frame taken (QwenImagePipeline's order
    of operations, so the same bits)."""

    @staticmethod
    def vae_class():
        from diffusers import AutoencoderKLQwenImage

        return AutoencoderKLQwenImage

    @property
    def latent_channels(self) -> int:
        return self.vae.config.z_dim

    def images(self, z):
        import torch

        config = self.vae.config
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(z.device, z.dtype)
        inverse_std = 1.0 / torch.tensor(config.latents_std).view(1, -1, 1, 1).to(z.device, z.dtype)
        return self.vae.decode((z / inverse_std + mean).unsqueeze(2), return_dict=False)[0][:, :, 0]
