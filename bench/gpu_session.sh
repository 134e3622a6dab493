#!/usr/bin/env bash
# Everything only a GPU can show, as one prepared call on a lent GPU machine (the device tool;
# 15 device-minutes a session, 10 a call). Steps run in the order of their worth, each under the
# call's deadline, so a cut-short call still brings back what finished.
#
#   here:   bash bench/gpu_wheels.sh                 # the wheels that machine lacks, into .whl/
#   there:  bash bench/gpu_session.sh [STEP ...]     # device run, carry [".whl"], timeout_s 600
#
# All steps take longer than one call. With 15 device-minutes (a start costs 1-2): a first call
# `GPU_SESSION_SECONDS=560 bash bench/gpu_session.sh best equal`, then at once, while the machine
# is still warm (its assets in /tmp and compiled kernels reused), a second with the steps that
# matter next. The fast options use varlen_attn (PyTorch's own variable-length flash kernel):
# nothing to compile. flex attention, which compiles its kernels on the first batches and again
# once lengths vary, is one ablation: on an H100 on 2026-12-06 `best` with flex had not finished
# after 414 s, the asset build included; the plain settings at 16 pairs ran 8 steps in 30 s.
#
# Steps (default: all, in this order):
#   best         the headline target: dpo-hpc with its fast options (one padding-free row through
#                varlen_attn, fused AdamW) against TRL's best configuration seen (16 pairs,
#                precomputed reference, no gradient checkpointing)
#   equal        bench/vs_trl.py, perf.md section 7's setup, both sides with a precomputed reference,
#                micro-batch 8 (the same batches on both sides; bf16 loss gate)
#   gpu_tests    tests/integration/test_gpu.py (bf16 on nccl, MFU, memory; checkpointing, fused AdamW;
#                padding-free through varlen_attn and flex), varlen_attn's kernel against float64, and
#                the padding-free micro-batch under torch.cuda.set_sync_debug_mode("error")
#   profile      the best step under torch.profiler (profile_steps): its phases and costliest kernels,
#                brought back as profile_best.txt
#   suite        the whole suite on a GPU machine (left out: the Slurm tests, which need a cluster,
#                and the check that the installed versions are the pinned ones)
#   online       the online-reference target: best's options at 16 pairs against TRL's defaults
#                (gradient checkpointing on), both with an online reference
#   best_variants  dpo-hpc alone with best's options and torch.compile; then at 32 pairs with every
#                2nd block checkpointed, and with none (whether a larger micro-batch beats 16 pairs)
#   max_batch    dpo-hpc alone at micro-batch 64, then 96, with best's options and gradient
#                checkpointing (the largest micro-batch target)
#   ablations    dpo-hpc alone at micro-batch 8, one option at a time (checkpointing of every
#                block and of every 2nd one among them)
# Written to $OUT: session.log (everything), results.jsonl (one line per benchmark) and
# steps.tsv; the last lines printed are the summary. GPU_SESSION_SECONDS (default 570) is the
# budget; a step that is not reached is listed as such.
set -uo pipefail
self="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$self")/.."
out="${OUT:-/tmp/gpu_session}"
mkdir -p "$out"
python="${PYTHON:-python3}"
deadline=$((SECONDS + ${GPU_SESSION_SECONDS:-570}))
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# dpo-hpc's own default, given to TRL's side too: the comparison is of trainers, not allocator settings
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

# perf.md section 7: Llama-3.2-1B's shape, random init, bf16, HH-like lengths. BENCH_SHAPE lets a
# CPU rehearsal run the same steps on the small shape.
read -r -a shape <<<"${BENCH_SHAPE:---shape llama-1b --vocab 128256 --bf16 --prompt-words 100 500 --reply-words 50 300 --steps 20 --warmup 8 --pairs 256}"
bench=("$python" bench/vs_trl.py "${shape[@]}" --assets /tmp/vs_trl_assets --repeats 1 --threads 8)
with_trl=("${bench[@]}" --trl-python "$python")

setup() {
    "$python" -m pip install -q --no-index --no-deps --no-cache-dir .whl/*.whl || return
    "$python" -m pip install -q --no-index --no-deps --no-build-isolation -e . || return
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$python" -c "import torch, transformers, deepspeed, trl; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| transformers', transformers.__version__, '| deepspeed', deepspeed.__version__, '| trl', trl.__version__)"
}
gpu_tests() {
    "$python" -m pytest -q -rs -p no:cacheprovider tests/integration/test_gpu.py tests/unit/trainers/test_varlen_attention.py \
        tests/unit/algorithms/test_host_syncs.py
}
suite() {  # that machine's torch and transformers are its image's, not the pinned ones
    "$python" -m pytest -q -rs -p no:cacheprovider -m "not slurm" -n 12 --dist loadfile \
        --deselect tests/unit/test_containers.py::test_the_tested_environment_is_the_pinned_one
}
record() {  # run a benchmark; its last line (the result) goes to results.jsonl under the step's name
    local name=$1 line
    shift
    "$@" | tee "/tmp/$name.out" || return
    line=$(tail -n 1 "/tmp/$name.out")
    echo "{\"step\": \"$name\", \"result\": $line}" >>"$out/results.jsonl"
}
equal() { record equal "${with_trl[@]}" --batch 8 --precompute; }
# best's options (BENCH_FAST replaces them: a CPU rehearsal, another candidate)
read -r -a fast <<<"${BENCH_FAST:---set dpo_training.padding_free=true --set attn_implementation=varlen_attn \
--set dpo_training.optim=adamw_torch_fused}"
best() { record best "${with_trl[@]}" --batch 16 --precompute "${fast[@]}"; }
online() { record online "${with_trl[@]}" --batch 16 --trl-gradient-checkpointing "${fast[@]}"; }
best_variants() {  # best's options compiled (perf.md section 7: compile took the ceiling from 39% to
    # 46% MFU), then at 32 pairs with every 2nd block checkpointed and with none
    local mine=(--sides ours --precompute "${fast[@]}")
    record best_compiled "${bench[@]}" "${mine[@]}" --batch 16 --set dpo_training.torch_compile=true || return
    mine+=(--batch 32 --steps 12 --warmup 4)
    record best_32_checkpoint_every_2nd "${bench[@]}" "${mine[@]}" --set dpo_training.gradient_checkpointing=true \
        --set dpo_training.gradient_checkpointing_every_n_layers=2 || return
    record best_32 "${bench[@]}" "${mine[@]}"
}
profile() {  # where the headline configuration's step goes: the phase table and the costliest kernels
    record profile "${bench[@]}" --sides ours --batch 16 --precompute --steps 14 --warmup 8 "${fast[@]}" \
        --set "dpo_training.profile_steps=[12, 13]" --profile-out "$out/profile_best.txt" || return
    [ -s "$out/profile_best.txt" ] || { echo "profile: no table written" >&2; return 1; }
}
max_batch() {  # at ~1,000 tokens a pair, 64 pairs' activations outgrow 80 GB without checkpointing;
    # best's options (one flat row: no padding to hold) with every block checkpointed
    local batch
    for batch in 64 96; do
        record "max_batch_$batch" "${bench[@]}" --sides ours --batch "$batch" --precompute --steps 12 --warmup 4 \
            "${fast[@]}" --set dpo_training.gradient_checkpointing=true || return
    done
}
ablations() {  # one change at a time; padding-free three times: dense-mask rows (sdpa), one row (varlen, flex)
    local name options failed=0
    while read -r name options; do  # $options unquoted: several words
        record "ablation_$name" "${bench[@]}" --sides ours --batch 8 --precompute $options || failed=1
    done <<'EOF_ABLATIONS'
padding_free_varlen --set dpo_training.padding_free=true --set attn_implementation=varlen_attn
optim_fused --set dpo_training.optim=adamw_torch_fused
padding_free_sdpa --set dpo_training.padding_free=true
torch_compile --set dpo_training.torch_compile=true
group_by_length --set dpo_training.group_by_length=true
gradient_checkpointing --set dpo_training.gradient_checkpointing=true
checkpointing_every_2nd --set dpo_training.gradient_checkpointing=true --set dpo_training.gradient_checkpointing_every_n_layers=2
padding_free_flex --set dpo_training.padding_free=true --set attn_implementation=flex_attention
EOF_ABLATIONS
    return $failed
}

if [ "${1:-}" = --one ]; then  # one step, in its own process so that timeout can stop all of it
    "$2"
    exit
fi
exec > >(tee -a "$out/session.log") 2>&1
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(best equal gpu_tests profile suite online best_variants max_batch ablations)
printf 'step\tstatus\tseconds\n' >"$out/steps.tsv"
run_step() {  # name: runs under what is left of the budget; a step with under 30 s left is not started
    local name=$1 left=$((deadline - SECONDS)) started=$SECONDS status
    if [ "$left" -lt 30 ]; then
        status="not reached"
    else
        echo "=== $name (up to ${left} s)"
        timeout -k 10 "$left" bash "$self" --one "$name"
        case $? in 0) status=ok ;; 124 | 137) status="cut at the deadline" ;; *) status=failed ;; esac
    fi
    printf '%s\t%s\t%s\n' "$name" "$status" $((SECONDS - started)) >>"$out/steps.tsv"
}
run_step setup
for step in "${steps[@]}"; do
    declare -F "$step" >/dev/null || { echo "unknown step: $step" >&2; exit 2; }
    run_step "$step"
done
echo "=== summary"
awk -F'\t' '{printf "%-16s %-20s %s\n", $1, $2, $3}' "$out/steps.tsv"  # the image has no column(1)
[ -f "$out/results.jsonl" ] && "$python" bench/gpu_summary.py "$out/results.jsonl"
exit 0
