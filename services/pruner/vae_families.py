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


class Flux2VaeDecoder(VaeDecoder):
    """FLUX.2: patchified latents [N, 4 C, h, w] -> ``x * sqrt(bn.running_var + eps) + bn.running_mean``,
    unpatchified to [N, C, 2h, 2w] and decoded (Flux2KleinPipeline's order of operations)."""

    @staticmethod
    def vae_class():
        from diffusers import AutoencoderKLFlux2

        return AutoencoderKLFlux2

    @property
    def latent_channels(self) -> int:
        return self.vae.bn.num_features  # 4 x latent_channels: the 2x2 patches

    def images(self, z):
        import torch

        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(z.device, z.dtype)
        z = z * std + mean
        n, c, h, w = z.shape  # unpatchify: [N, C, 2, 2, h, w] -> [N, C, h, 2, w, 2]
        z = z.reshape(n, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, c // 4, 2 * h, 2 * w)
        return self.vae.decode(z, return_dict=False)[0]
