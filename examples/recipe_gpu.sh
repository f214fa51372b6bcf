#!/usr/bin/env bash
# A complete recipe for your own data on GPUs: prepare jsonl, train with torchrun + ZeRO-3, recognize, score.
# The pair here is large: Whisper large-v3 (128 mel bins) + Qwen2.5-1.5B-Instruct. For the small pair we ship,
# see train_tiny_en_smollm2.sh. Set CORPUS, GPUS and the paths to yours.
set -euo pipefail
cd "$(dirname "$0")/.."
CORPUS=${CORPUS:-corpus}
GPUS=${GPUS:-8}
OUT=${OUT:-runs/large_v3_qwen2.5_1.5b}

# 1. jsonl from audio + a `key<TAB>text` table, one per split
python examples/prepare_jsonl.py --audio_dir "$CORPUS/train" --transcripts "$CORPUS/train.tsv" data/train.jsonl
python examples/prepare_jsonl.py --audio_dir "$CORPUS/test" --transcripts "$CORPUS/test.tsv" data/test.jsonl

# 2. train the projector; a rerun resumes from the last checkpoint in $OUT
torchrun --standalone --nproc_per_node="$GPUS" train.py \
    --whisper_model_name_or_path large-v3 \
    --llm_model_name_or_path Qwen/Qwen2.5-1.5B-Instruct \
    --model_dtype bfloat16 --bf16 \
    --deepspeed ds_config_zero3.json \
    --projector_kernel_size 5 --projector_hidden_size 2048 --audio_mode dynamic \
    --data_path data/train.jsonl \
    --output_dir "$OUT" \
    --per_device_train_batch_size 16 --gradient_accumulation_steps 1 \
    --learning_rate 1e-4 --lr_scheduler_type cosine --warmup_steps 500 --weight_decay 0.0 \
    --num_train_epochs 5 \
    --train_sampling_strategy group_by_length \
    --dataloader_num_workers 4 \
    --logging_steps 20 --save_steps 1000 --save_total_limit 3 \
    --report_to none

# 3. recognize and score (WER after Whisper's English normaliser; --metric cer for Chinese and similar)
torchrun --standalone --nproc_per_node="$GPUS" recognize.py \
    --projector_model_path "$OUT" \
    --data_path data/test.jsonl \
    --result_path "$OUT/test_hypotheses.txt" \
    --num_beams 4 --batch_size 16
