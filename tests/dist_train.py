"""train.py under torchrun, plus what each rank saw, for tests/test_training.py.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_train.py <train.py arguments>

Runs speechllm.training.main, then every rank writes <output_dir>/rank<RANK>/: its view of the projector
(save_pretrained gathers it under ZeRO-3, so all ranks call it) and run.json: the world size, the global steps this
invocation ran (a resumed run starts after its checkpoint), the logged losses, and for the encoder, LLM and projector
their dtype, full size and the part of it this rank holds (ZeRO-3 keeps a shard).
"""

import json
import os
import sys

from transformers import TrainerCallback

from speechllm import training


class Recorder(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def describe(module) -> dict:
    parameters = list(module.parameters())
    sharded = [hasattr(p, "ds_id") for p in parameters]
    return {
        "dtype": str(parameters[0].dtype).removeprefix("torch."),
        "numel": sum(p.ds_numel if s else p.numel() for p, s in zip(parameters, sharded)),
        "local_numel": sum(p.ds_tensor.numel() if s else p.numel() for p, s in zip(parameters, sharded)),
        "zero3": all(sharded),
    }


if __name__ == "__main__":
    recorder = Recorder()

    class RecordingTrainer(training.SpeechLLMTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(recorder)

    training.SpeechLLMTrainer = RecordingTrainer  # main() builds its Trainer from this module attribute
    trainer = training.main(sys.argv[1:])
    folder = os.path.join(trainer.args.output_dir, f"rank{os.environ.get('RANK', '0')}")
    trainer.model.save_pretrained(folder, is_main_process=True)
    run = {
        "world_size": trainer.args.world_size,
        "global_step": trainer.state.global_step,
        "steps": recorder.steps,
        "losses": {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h},
        "modules": {name: describe(getattr(trainer.model, name)) for name in ("encoder", "llm", "projector")},
    }
    with open(os.path.join(folder, "run.json"), "w") as file:
        json.dump(run, file)
    # Under load, DeepSpeed's CPU communication threads can abort the interpreter's teardown ("terminate called
    # without an active exception", SIGABRT) after all the work above is done and written: leave without running the
    # C++ static destructors, so the exit status says how the training went.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
