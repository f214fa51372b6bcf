"""Train the projector: python train.py --help (or torchrun --nproc_per_node=N train.py ...)."""

from speechllm.training import command_line

if __name__ == "__main__":
    command_line()
