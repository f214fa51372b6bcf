"""The only trained part: a strided Conv1d that shortens the encoder's frames, then an MLP into the LLM's space."""

import torch
import torch.nn.functional as F
from torch import nn


class Projector(nn.Module):
    def __init__(self, encoder_dim: int, llm_dim: int, kernel_size: int, hidden_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(encoder_dim, encoder_dim, kernel_size, stride=kernel_size)
        self.linear1 = nn.Linear(encoder_dim, hidden_size)
        self.linear2 = nn.Linear(hidden_size, llm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, frames, encoder_dim) -> (batch, ceil(frames / kernel_size), llm_dim)"""
        x = x.to(self.conv.weight.dtype).transpose(1, 2)
        x = F.pad(x, (0, -x.shape[-1] % self.kernel_size))  # a partial last group still becomes a token
        x = F.relu(self.conv(x)).transpose(1, 2)
        return self.linear2(F.relu(self.linear1(x)))
