"""The embedded diffusion toy: the digit model as an epsilon-prediction diffusion model, sampled
with DDIM (``model.name=toy_digits_ddpm``).

Same digits, prompts, rewards and judge as the flow toy, and the same small
``SD3Transformer2DModel`` conditioned on learned digit embeddings; only the objective differs:
DDPM noise prediction at an integer timestep t (linear betas 1e-4..0.02 over 1,000 steps, the
DDPM paper's), with x_t = sqrt(alphabar_t) x0 + sqrt(1 - alphabar_t) eps. The noise schedule is
a diffusers ``DDIMScheduler`` saved beside the weights (``scheduler/``) and loaded back with
``from_pretrained``, so the rollouts' timesteps and alphas come from the same place as for SD.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from epgrpo.trainer.policy.base import register_policy
from epgrpo.trainer.policy.toy import ToyDigitPolicy, ToyRecipe, _predict, ensure_pretrained, pretrain, toy_factory
from epgrpo.trainer.samplers import DDIMSampler, Sampler, SamplerOptions


@dataclass(frozen=True)
class ToyDdpmRecipe(ToyRecipe):
    pretrain_steps: int = 200
    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_train_timesteps: int = 1000


def ddpm_scheduler(recipe: ToyDdpmRecipe) -> DDIMScheduler:
    # "trailing" spacing with alphabar = 1 below t = 0: few-step DDIM starts at t = T - 1 and ends clean
    return DDIMScheduler(num_train_timesteps=recipe.num_train_timesteps, beta_start=recipe.beta_start,
                         beta_end=recipe.beta_end, beta_schedule="linear", prediction_type="epsilon",
                         clip_sample=True, set_alpha_to_one=True, timestep_spacing="trailing")


def pretrain_ddpm(recipe: ToyDdpmRecipe, out_dir: Path, progress: bool = True) -> dict:
    scheduler = ddpm_scheduler(recipe)
    alphas = scheduler.alphas_cumprod

    def eps_loss(transformer, conditioner, x0, digits, generator):
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, recipe.num_train_timesteps, (len(x0),), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        eps = _predict(transformer, conditioner, a.sqrt() * x0 + (1 - a).sqrt() * noise, t.float(), digits)
        return F.mse_loss(eps, noise)

    meta = pretrain(recipe, out_dir, progress, loss_fn=eps_loss, what="toy diffusion model")
    scheduler.save_pretrained(out_dir / "scheduler")
    return meta


class ToyDdpmPolicy(ToyDigitPolicy):
    """Predicts the noise epsilon at timestep t; rollouts use DDPO's stochastic DDIM."""

    recipe_class = ToyDdpmRecipe

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scheduler = DDIMScheduler.from_pretrained(self.model_dir / "scheduler", local_files_only=True)

    @staticmethod
    def ensure_pretrained(recipe: ToyRecipe, progress: bool) -> Path:
        return ensure_pretrained(recipe, progress=progress, pretrain_fn=pretrain_ddpm, family="toy_digits_ddpm")

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=self.device).expand(x.shape[0])
        prompt = self.conditioner(cond["digits"])
        return self.run_transformer(hidden_states=x, encoder_hidden_states=prompt["encoder_hidden_states"],
                                    pooled_projections=prompt["pooled_projections"], timestep=t)

    def make_sampler(self, num_steps: int, options: SamplerOptions) -> Sampler:
        return DDIMSampler.from_scheduler(self.scheduler, num_steps, options.eta).to(self.device)


register_policy("toy_digits_ddpm")(toy_factory(ToyDdpmPolicy))
