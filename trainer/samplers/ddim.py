"""DDPO's stochastic DDIM sampler for diffusion models (epsilon- or v-prediction; pure torch).

With alphabar = the scheduler's ``alphas_cumprod``, a step from timestep t to t' = t - T/n
(T training timesteps, n inference steps) is

    x0_hat = (x - sqrt(1 - alphabar) eps_hat) / sqrt(alphabar)               (epsilon-prediction)
    x0_hat = sqrt(alphabar) x - sqrt(1 - alphabar) v_hat,
    eps_hat = sqrt(alphabar) v_hat + sqrt(1 - alphabar) x                   (v-prediction)
    sigma_t = eta sqrt((1 - alphabar') / (1 - alphabar)) sqrt(1 - alphabar / alphabar')
    mean = sqrt(alphabar') x0_hat + sqrt(1 - alphabar' - sigma_t^2) eps_hat,  x' = mean + sigma_t xi

x0_hat is clipped when the scheduler config says so (``clip_sample``). The log-prob of x' is the
Gaussian N(mean, sigma_t^2) in float32, averaged over non-batch dims, as DDPO's
``ddim_step_with_logprob``; with eta = 0 the step is diffusers' own ``DDIMScheduler.step``.

Below timestep 0 the two differ: the stochastic step clamps t' to 0 as DDPO does (alphabar' =
alphas_cumprod[0], so the last step keeps a variance even with ``set_alpha_to_one``), the
deterministic one uses the scheduler's ``final_alpha_cumprod`` as diffusers does. eta may not
exceed what the grid allows: beyond it 1 - alphabar' - sigma_t^2 < 0 and the mean is undefined.
"""

from __future__ import annotations

import copy

import torch

from epgrpo.trainer.samplers.base import Sampler, StepResult, gaussian_step

PREDICTION_TYPES = ("epsilon", "v_prediction")


class DDIMSampler(Sampler):
    reads = ("eta",)
    stochastic_eval = True  # DDPO evaluates the eta = 1 policy it trains; eta = 0 is another sampler

    def __init__(self, alphas_cumprod: torch.Tensor, timesteps: list[int], num_train_timesteps: int,
                 final_alpha_cumprod: float, prediction_type: str = "epsilon", eta: float = 1.0,
                 clip_sample: bool = False, clip_sample_range: float = 1.0):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type: expected one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
        if not eta >= 0:
            raise ValueError(f"sampling.eta: expected >= 0, got {eta}")
        self.alphas_cumprod = alphas_cumprod.double()
        self.timesteps = [int(t) for t in timesteps]
        self.num_train_timesteps = num_train_timesteps
        self.final_alpha_cumprod = float(final_alpha_cumprod)
        self.prediction_type = prediction_type
        self.eta = float(eta)
        self.clip_sample, self.clip_sample_range = clip_sample, clip_sample_range
        self.num_steps = len(self.timesteps)
        stride = num_train_timesteps // self.num_steps
        # per step: alphabar_t, alphabar_t' (float64 tables; each step casts to float32 once)
        self._alpha = [float(self.alphas_cumprod[t]) for t in self.timesteps]
        self._alpha_prev = [float(self.alphas_cumprod[t - stride]) if t - stride >= 0 else self.final_alpha_cumprod
                            for t in self.timesteps]  # the deterministic step: diffusers' DDIMScheduler.step
        # the stochastic step: DDPO clamps the previous timestep to >= 0
        self._alpha_prev_sde = [float(self.alphas_cumprod[max(t - stride, 0)]) for t in self.timesteps]
        self.device = torch.device("cpu")
        largest = self.max_eta()
        if self.eta > largest:
            raise ValueError(f"sampling.eta: expected 0 <= eta <= {largest:.6g} (beyond it this {self.num_steps}-step "
                             f"DDIM grid has 1 - alphabar' - sigma_t^2 < 0: no real mean), got {eta}")

    @classmethod
    def from_scheduler(cls, scheduler, num_steps: int, eta: float = 1.0) -> "DDIMSampler":
        """From any diffusers scheduler config (SD ships PNDM): a ``DDIMScheduler`` built from it
        gives the timesteps (its spacing and steps_offset) and the alphas, as the pipeline would."""
        from diffusers import DDIMScheduler

        ddim = DDIMScheduler.from_config(scheduler.config)
        if ddim.config.thresholding:
            raise ValueError("scheduler: dynamic thresholding is not supported by the DDIM sampler")
        ddim.set_timesteps(num_steps)
        return cls(ddim.alphas_cumprod, ddim.timesteps.tolist(), ddim.config.num_train_timesteps,
                   float(ddim.final_alpha_cumprod), ddim.config.prediction_type, eta,
                   bool(ddim.config.clip_sample), float(ddim.config.clip_sample_range))

    def timestep(self, i: int) -> torch.Tensor:
        return torch.tensor(self.timesteps[i], device=self.device)

    def noise_std(self, i: int) -> float:
        return (1 - self._alpha[i]) ** 0.5

    def interval(self, i: int) -> float:
        return (self.num_train_timesteps // self.num_steps) / self.num_train_timesteps  # t -> t - T/n

    def _x0_eps(self, x: torch.Tensor, out: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = self._alpha[i]
        x, out = x.float(), out.float()
        if self.prediction_type == "epsilon":
            x0, eps = (x - (1 - a) ** 0.5 * out) / a**0.5, out
        else:
            x0, eps = a**0.5 * x - (1 - a) ** 0.5 * out, a**0.5 * out + (1 - a) ** 0.5 * x
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return x0, eps

    def std(self, i: int, eta: float | None = None) -> float:
        """sigma_t of step i: eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a') (a' clamped as DDPO's)."""
        a, a_prev = self._alpha[i], self._alpha_prev_sde[i]
        eta = self.eta if eta is None else eta
        return eta * ((1 - a_prev) / (1 - a)) ** 0.5 * (1 - a / a_prev) ** 0.5

    def max_eta(self) -> float:
        """The largest eta for which every step's 1 - a' - sigma_t^2 >= 0."""
        limits = [((1 - a_prev) / self.std(i, 1.0) ** 2) ** 0.5 for i, a_prev in enumerate(self._alpha_prev_sde)
                  if self.std(i, 1.0) > 0]
        return min(limits, default=float("inf"))

    def _mean(self, x, out, i, std: float, a_prev: float) -> torch.Tensor:
        x0, eps = self._x0_eps(x, out, i)
        return a_prev**0.5 * x0 + max(0.0, 1 - a_prev - std**2) ** 0.5 * eps  # max: rounding at eta = max_eta

    def step(self, x, model_out, i, noise=None, sample=None) -> StepResult:
        std = self.std(i)
        if std <= 0:
            raise ValueError(f"step {i}: the DDIM step has zero variance (eta = {self.eta}); it has no log-prob")
        mean = self._mean(x, model_out, i, std, self._alpha_prev_sde[i])
        return gaussian_step(mean, torch.full((len(x),) + (1,) * (x.ndim - 1), std, device=mean.device),
                             noise, sample)

    def deterministic_step(self, x, model_out, i) -> torch.Tensor:
        return self._mean(x, model_out, i, 0.0, self._alpha_prev[i])

    def x0(self, x, model_out, i) -> torch.Tensor:
        return self._x0_eps(x, model_out, i)[0]

    def to(self, device) -> "DDIMSampler":
        moved = copy.copy(self)  # the tables are Python floats: only the timestep device changes
        moved.device = torch.device(device)
        return moved
