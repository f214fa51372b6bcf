"""Train the projector: python train.py --help (or torchrun --nproc_per_node=N train.py ...)."""

from speechllm.training import main

if __name__ == "__main__":
    main()
