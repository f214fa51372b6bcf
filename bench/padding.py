r"""How much of each training batch is padding, with random batches and with length-grouped ones (train.py's default).

    python bench/padding.py ../shared/data/train/data.jsonl --model examples/tiny_en_smollm2 --batch_size 8

No audio is decoded and no model runs: each clip's duration (the jsonl's, else its header) gives its mel frames
and audio tokens, and the model's processor its prompt and answer tokens. A batch is padded to its longest window's
mel frames (dynamic audio; window mode always encodes 30 s) and to its longest row of LLM positions; the padded share
is what the encoder and the LLM compute on padding. One epoch of each sampler, drawn with the training seed.
"""

import argparse
import json

import torch

from speechllm import SpeechLLMConfig
from speechllm.audio import SAMPLE_RATE, batch_frames, num_audio_tokens, num_frames, window_lengths
from speechllm.data import SpeechDataset
from speechllm.decoding import stop_token_ids
from speechllm.llm import load_llm, torch_dtype
from speechllm.processor import Processor
from speechllm.training import EpochLengthGroupedSampler

MILLISECONDS = 1000


def processor_of(model_folder: str) -> Processor:
    """The saved model's processor, from its config and its LLM's tokenizer (the models' weights are not needed)."""
    config = SpeechLLMConfig.from_pretrained(model_folder)
    llm, tokenizer = load_llm(config.llm_model_name_or_path, torch_dtype("float32"))
    return Processor(
        tokenizer,
        stop_token_ids(tokenizer, llm.generation_config),
        prompt=config.prompt,
        system_prompt=config.system_prompt,
        n_mels=0,  # no features are made here
        kernel_size=config.projector_kernel_size,
        audio_mode=config.audio_mode,
    )


def clip_sizes(dataset: SpeechDataset, processor: Processor) -> list[dict]:
    """Each clip's windows' real mel frames and its row of LLM positions (prompt, audio tokens, answer)."""
    sizes = []
    for example, milliseconds in zip(dataset.examples, dataset.lengths):
        samples = milliseconds * SAMPLE_RATE // MILLISECONDS
        before, after = processor.prompt_ids(example.prompt or processor.prompt)
        answer = processor.response_ids(example.prompt or processor.prompt, example.txt)
        positions = len(before) + num_audio_tokens(samples, processor.kernel_size) + len(after) + len(answer)
        sizes.append({"frames": [num_frames(n) for n in window_lengths(samples)], "positions": positions})
    return sizes


def padded_shares(sizes: list[dict], order: list[int], batch_size: int, pad_frames_to: int | None) -> dict:
    real_frames = padded_frames = real_positions = padded_positions = 0
    for start in range(0, len(order), batch_size):
        batch = [sizes[i] for i in order[start : start + batch_size]]
        frames = [f for clip in batch for f in clip["frames"]]
        real_frames += sum(frames)
        padded_frames += len(frames) * batch_frames(frames, pad_frames_to)
        real_positions += sum(clip["positions"] for clip in batch)
        padded_positions += len(batch) * max(clip["positions"] for clip in batch)
    return {
        "audio_frames_padded": 1 - real_frames / padded_frames,
        "llm_positions_padded": 1 - real_positions / padded_positions,
        "llm_positions_per_batch": padded_positions / -(-len(order) // batch_size),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="training jsonl")
    parser.add_argument("--model", default="examples/tiny_en_smollm2", help="a saved SpeechLLM folder")
    parser.add_argument("--batch_size", type=int, default=8, help="per device, times gradient accumulation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    processor = processor_of(args.model)
    dataset = SpeechDataset(args.data)
    sizes = clip_sizes(dataset, processor)
    orders = {
        "random": torch.randperm(len(sizes), generator=torch.Generator().manual_seed(args.seed)).tolist(),
        "group_by_length": list(EpochLengthGroupedSampler(args.batch_size, dataset.lengths, args.seed)),
    }
    results = {
        sampling: padded_shares(sizes, order, args.batch_size, processor.pad_frames_to)
        for sampling, order in orders.items()
    }
    print(f"{len(sizes)} clips, batch {args.batch_size}, {processor.audio_mode} audio")
    print("| batches | audio frames padded | LLM positions padded | LLM positions a batch |\n|---|---|---|---|")
    for sampling, result in results.items():
        print(
            f"| {sampling} | {100 * result['audio_frames_padded']:.1f}% | {100 * result['llm_positions_padded']:.1f}% "
            f"| {result['llm_positions_per_batch']:.0f} |"
        )
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=1)
    return results


if __name__ == "__main__":
    main()
