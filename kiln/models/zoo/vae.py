"""A convolutional variational autoencoder for 28x28 digits."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from kiln.models.loaded import LoadedModel
from kiln.models.zoo import register

# The zoo's generative models read `mnist-gen`: pixels in [-1, 1] (2*x/255 - 1).
GENERATION_DATASET = "mnist-gen"


def check_pixels(x: torch.Tensor, model: str) -> None:
    """The models' contract with mnist-gen: a loss on other scales would be silently wrong."""
    if x.numel() and (x.min() < -1.0 - 1e-4 or x.max() > 1.0 + 1e-4):
        raise ValueError(f"{model} expects pixels in [-1, 1] (the {GENERATION_DATASET} scaling), "
                         f"got values in [{x.min().item():.3g}, {x.max().item():.3g}]")


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per sample, in nats (Kingma & Welling 2014, appendix B)."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)


class ConvVAE(nn.Module):
    """VAE (Kingma & Welling 2014, "Auto-Encoding Variational Bayes"): a strided-conv encoder
    to a diagonal Gaussian q(z|x), a transposed-conv decoder to Bernoulli logits p(x|z).

    Pixels x in [-1, 1] are read as Bernoulli means (x + 1) / 2, the usual likelihood for
    MNIST VAEs; the negative ELBO is reported per sample, in nats.
    """

    def __init__(self, latent: int = 16, in_channels: int = 1, width: int = 32):
        super().__init__()
        self.latent = latent
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, width, 4, 2, 1), nn.ReLU(),          # 28 -> 14
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.ReLU(),            # 14 -> 7
            nn.Flatten(), nn.Linear(2 * width * 7 * 7, 2 * latent),
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent, 2 * width * 7 * 7), nn.ReLU(), nn.Unflatten(1, (2 * width, 7, 7)),
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.ReLU(),   # 7 -> 14
            nn.ConvTranspose2d(width, in_channels, 4, 2, 1),            # 14 -> 28: logits
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, C, 28, 28) in [-1, 1] -> (reconstruction logits, mu, logvar). The code is
        sampled in training mode; in eval mode it is the mean, so inference is deterministic."""
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        return self.decoder(z), mu, logvar

    def loss(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The negative ELBO, batch mean of per-sample nats: Bernoulli reconstruction
        -log p(x|z) with one reparameterised sample z ~ q(z|x) (in any mode), plus the KL of
        q(z|x) from N(0, I). `y` (the class) is unused."""
        check_pixels(x, "ConvVAE")
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        logits = self.decoder(z)
        recon = F.binary_cross_entropy_with_logits(logits, (x + 1) / 2, reduction="none").flatten(1).sum(1)
        kl = gaussian_kl(mu, logvar)
        loss = (recon + kl).mean()
        return loss, {"elbo": -loss.item(), "recon": recon.mean().item(), "kl": kl.mean().item()}

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """n images from the prior, as Bernoulli means mapped to the data scale [-1, 1]."""
        z = torch.randn(n, self.latent, device=next(self.parameters()).device)
        return torch.sigmoid(self.decoder(z)) * 2 - 1


@register("vae", params=220_385, family="vae", task="generation", dataset=GENERATION_DATASET,
          default_input="1x1x28x28 float32 in [-1, 1]",
          description="convolutional VAE (Kingma & Welling 2014), 16-d latent, Bernoulli likelihood")
def vae() -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel("zoo:vae", ConvVAE().eval(), (torch.rand(1, 1, 28, 28) * 2 - 1,))
