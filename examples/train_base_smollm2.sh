#!/usr/bin/env bash
# Whisper base + SmolLM2-135M-Instruct, the hearing campaign's next encoder (issue 22: base's own decoder makes a
# sixth fewer errors than tiny.en's on LibriSpeech, a quarter fewer on Common Voice), trained on CPU on all of
# ../shared/data/train with the campaign's data: sentence-cased targets, each clip played at 0.9, 1.0 or 1.1 times
# its speed. Two stages, as train_tiny_en_smollm2.sh:
#   1. the projector alone, new (base's features are 512 wide, tiny.en's 384), at a constant rate: a stage cut short
#      by the end of a sitting loses no schedule, and START1=folder continues it from weights saved in another
#      (STAGE1_STEPS more, after a new 100-step warm-up: the optimizer state is not saved with the weights);
#   2. from stage 1, LoRA inside the LLM as well, over one long cosine (the campaign's length).
# Interrupted, the same command resumes from the newest checkpoint of the stage it was in.
# STAGE1=folder skips stage 1 and starts stage 2 from that saved model: a stage-1 projector, or stage 2's projector +
# LoRA saved in another sitting, which it continues (a new warm-up and cosine of STAGE2_STEPS: the optimizer state is
# not saved with the weights). Arguments go to both stages.
set -euo pipefail
cd "$(dirname "$0")/.."
# Both packaged models by name (speechllm/packaged_models.py): the saved config records them and loads offline.
WHISPER=$(python -c "from speechllm.packaged_models import WHISPER_BASE; print(WHISPER_BASE)")
LLM=$(python -c "from speechllm.packaged_models import SMOLLM2_GGUF; print(SMOLLM2_GGUF)")
OUT=${OUT:-runs/base_smollm2}
COMMON=(
    --whisper_model_name_or_path "$WHISPER" --llm_model_name_or_path "$LLM"
    --data_path ../shared/data/train/data.jsonl --recase_all_caps --speed_perturb 0.9,1.0,1.1
    --per_device_train_batch_size 8 --weight_decay 0.0
    --logging_steps 10 --save_steps 100 --save_total_limit 3
    --use_cpu --report_to none --seed "${SEED:-0}"
)

if [ -z "${STAGE1:-}" ]; then
    STAGE1=$OUT/stage1
    if [ -n "${START1:-}" ]; then
        PROJECTOR=(--projector_model_path "$START1")
    else
        PROJECTOR=(--system_prompt "" --projector_kernel_size 5 --projector_hidden_size 2048 --audio_mode dynamic)
    fi
    python train.py "${COMMON[@]}" "${PROJECTOR[@]}" \
        --output_dir "$STAGE1" \
        --learning_rate 5e-4 --lr_scheduler_type constant_with_warmup --warmup_steps 100 \
        --max_steps "${STAGE1_STEPS:-3000}" \
        "$@"
fi

python train.py "${COMMON[@]}" \
    --projector_model_path "$STAGE1" \
    --lora_rank 16 --lora_alpha 32 --lora_dropout 0.05 --lora_target_modules all-linear \
    --output_dir "$OUT/stage2" \
    --learning_rate 3e-4 --lr_scheduler_type cosine --warmup_steps 200 --max_steps "${STAGE2_STEPS:-10000}" \
    "$@"
