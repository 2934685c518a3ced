#!/usr/bin/env bash
# Every measurement quoted in the README, recorded under benchmarks/results/ (one file per
# command, the command on its first line). Run from the repository root with the package
# installed and ../shared beside it (or TOKENSPARSE_SHARED set); takes about 2 hours on
# the 2-core CPU machine. Timings are only comparable within one file: run nothing else meanwhile.
set -euo pipefail
cd "$(dirname "$0")/.."
S="${TOKENSPARSE_SHARED:-../shared}"
W="$S/weights/vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"
I="$S/data/imagenet-sample"
OUT=benchmarks/results
mkdir -p "$OUT"
export COLUMNS=110

record() {  # record NAME COMMAND...: run COMMAND, keep its output (progress bars go to the terminal only)
  local name=$1; shift
  echo "== $name"
  { echo "\$ $*"; "$@"; } > "$OUT/$name.txt"
}

# DeiT-S speed, every method at its defaults, three separate runs (the machine is noisy)
for run in 1 2 3; do
  record "deit_small_speed_run$run" tokensparse bench --model deit_small_patch16_224 --batch-size 32 --threads 2 \
    --runs 20 --method tome:r=13 --method evit:keep_rate=0.7 --method ppt --method evovit \
    --method dynamicvit:rho=0.7 --json "$OUT/deit_small_speed_run$run.json"
done
for run in 1 2; do  # the model-family redesign: the code before it and now, interleaved in one process
  record "refactor_speed_run$run" python benchmarks/refactor_speed.py --before f0b9bf1 --method tome:r=13 \
    --method evit:keep_rate=0.7 --method ppt --method evovit --method dynamicvit:rho=0.7
done
for run in 1 2 3; do  # transformers ViT-S: speed-ups against the same methods on timm, all in one process
  record "hf_speed_run$run" python benchmarks/hf_speed.py --method tome:r=13 --method evit:keep_rate=0.7 --runs 20
done
# Deploy: compiled (inductor) and exported (onnxruntime) models, each timed against the eager models in the same run
export COLUMNS=140  # the wider tables (eager columns)
FIVE=(--method tome:r=13 --method evit:keep_rate=0.7 --method ppt --method evovit --method dynamicvit:rho=0.7)
for run in 1 2 3; do
  record "deit_small_compile_run$run" tokensparse bench --model deit_small_patch16_224 --batch-size 32 --threads 2 \
    --runs 10 --compile "${FIVE[@]}" --json "$OUT/deit_small_compile_run$run.json"
done
for run in 1 2; do
  record "deit_small_onnxruntime_run$run" tokensparse bench --model deit_small_patch16_224 --batch-size 32 --threads 2 \
    --runs 10 --runtime onnxruntime "${FIVE[@]}" --json "$OUT/deit_small_onnxruntime_run$run.json"
done
# inductor settings (freezing with / without weight pre-packing, none): compiled vs eager speed-ups in one run
record compile_settings python benchmarks/compile_settings.py --method tome:r=13 --method evit:keep_rate=0.7 --runs 12 \
  --threads 2
record deit_small_compile_b1 tokensparse bench --model deit_small_patch16_224 --batch-size 1 --threads 2 --runs 30 \
  --compile "${FIVE[@]}" --json "$OUT/deit_small_compile_b1.json"
record deit_small_onnxruntime_b1 tokensparse bench --model deit_small_patch16_224 --batch-size 1 --threads 2 --runs 30 \
  --runtime onnxruntime "${FIVE[@]}" --json "$OUT/deit_small_onnxruntime_b1.json"
export COLUMNS=110
record deploy_matrix python benchmarks/deploy_matrix.py --no-inductor
record overhead_limit python benchmarks/overhead_limit.py --method tome:r=13 --method evit:keep_rate=0.7 --method ppt

# ViT-Tiny accuracy on the 500 shared images
record vit_tiny_accuracy tokensparse bench --model vit_tiny_patch16_224.augreg_in21k_ft_in1k --weights "$W" \
  --images "$I/images" --wnids "$I/wnids.txt" --threads 2 --method tome:r=13 --method mctf \
  --method evit:keep_rate=0.7 --method topk:keep_rate=0.7 --method ppt --method evovit --method evovit:keep_rate=0.7 \
  --json "$OUT/vit_tiny_accuracy.json" --overwrite
python benchmarks/hf_convert_vit_tiny.py --weights "$W" --out "$OUT/.vit-tiny-hf" > /dev/null
record hf_vit_tiny_bench tokensparse bench --model "hf:$OUT/.vit-tiny-hf" --images "$I/images" --wnids "$I/wnids.txt" \
  --threads 2 --batch-size 64 --json "$OUT/hf_vit_tiny_bench.json"
rm -rf "$OUT/.vit-tiny-hf"
record ppt_branches python benchmarks/ppt_branches.py
record evovit_accuracy python benchmarks/evovit_accuracy.py
record dynamicvit_calibrate python benchmarks/dynamicvit_calibrate.py --threads 2
record dynamicvit_calibrate_lr2e-3_odd python benchmarks/dynamicvit_calibrate.py --threads 2 --fold odd --lr 0.002
record dynamicvit_calibrate_epochs8_odd python benchmarks/dynamicvit_calibrate.py --threads 2 --fold odd --epochs 8
record oracle_rankings python benchmarks/oracle_rankings.py --threads 2
# tokensparse tune: searched on the even positions, every reported number on the odd ones (OUT/tune_vit_tiny/tune.{csv,png})
record tune_vit_tiny tokensparse tune --model vit_tiny_patch16_224.augreg_in21k_ft_in1k --weights "$W" \
  --images "$I/images" --wnids "$I/wnids.txt" --speedup tome:r=13 --threads 2 --batch-size 64 --out "$OUT/tune_vit_tiny"
# ppt schedules around its default (and the tune choice), both halves of the shared images
record schedule_fidelity python benchmarks/schedule_fidelity.py ppt tome:r=13 "tome:r=[0,0,0,30,28,25,22,19,16,13,10]" \
  ppt:r=53 "ppt:locations=[3,6,9],r=[62,52,40]" "ppt:locations=[3,5,7,9],r=[42,40,38,36]" \
  "ppt:locations=[2,4,6,8,10],r=30" "ppt:locations=[2,4,6,8,10],r=34" "ppt:locations=[3,4,5,6,7,8,9,10],r=23" \
  "ppt:locations=[2,5,8],r=[50,45,40]" "ppt:locations=[3,6,9,11],r=[50,50,50,23]" ppt:threshold=3e-5 \
  ppt:threshold=3e-4 ppt:threshold=1 ppt:r=53,threshold=3e-4 --threads 2
# the same search run again (the run-to-run spread of the choice on this machine)
record tune_vit_tiny_run2 tokensparse tune --model vit_tiny_patch16_224.augreg_in21k_ft_in1k --weights "$W" \
  --images "$I/images" --wnids "$I/wnids.txt" --speedup tome:r=13 --threads 2 --batch-size 64 --out "$OUT/tune_vit_tiny_run2"
record tune_vit_tiny_run3 tokensparse tune --model vit_tiny_patch16_224.augreg_in21k_ft_in1k --weights "$W" \
  --images "$I/images" --wnids "$I/wnids.txt" --speedup tome:r=13 --threads 2 --batch-size 64 --out "$OUT/tune_vit_tiny_run3"
record tune_vit_tiny_run4 tokensparse tune --model vit_tiny_patch16_224.augreg_in21k_ft_in1k --weights "$W" \
  --images "$I/images" --wnids "$I/wnids.txt" --speedup tome:r=13 --threads 2 --batch-size 64 --out "$OUT/tune_vit_tiny_run4"
# schedules of several methods in one model (mix: ppt, tome, a top-k cut) against ppt, both halves
record mix_fidelity python benchmarks/schedule_fidelity.py ppt tome:r=13 "tome:r=[0,0,0,30,28,25,22,19,16,13,10]" \
  "ppt+topk:locations=[11],tokens=[1]" "ppt:locations=[3],r=50+tome:r=[0,0,0,0,14,14,14,14,14,14,14]" \
  "ppt:locations=[3,6],r=50+tome:r=[0,0,0,0,0,0,0,10,10,10,10]" \
  "ppt:locations=[3,6],r=50+tome:r=[0,0,0,0,0,0,0,12,12,12]+topk:locations=[11],tokens=[1]" \
  "ppt:locations=[3,6,9],r=44+tome:r=[0,0,0,0,6,6,0,6,6]+topk:locations=[11],tokens=[1]" \
  "tome:r=[0,0,0,20,20,20]+ppt:locations=[6,9],r=50" "tome:r=[0,0,0,25,25,25]+ppt:locations=[6,9],r=40" \
  "ppt:locations=[3,6,9],r=[44,44,23]+tome:r=[0,0,17,0,14,12,0,10,8,0,6]" --threads 2

# Evo-ViT on LeViT
record levit_speed tokensparse bench --model levit_256 --batch-size 32 --threads 2 --method evovit \
  --method evovit:class_token=mean --json "$OUT/levit_speed.json"
record levit_conv_speed tokensparse bench --model levit_conv_256 --batch-size 32 --threads 2 --method evovit

# ConvNeXt / Swin spatial sparsification
record convnext_speed tokensparse bench --model convnext_tiny --batch-size 32 --threads 2 \
  --method dynamicvit:rho=0.7 --json "$OUT/convnext_speed.json"
record swin_speed tokensparse bench --model swin_tiny_patch4_window7_224 --batch-size 32 --threads 2 \
  --method dynamicvit:rho=0.7 --json "$OUT/swin_speed.json"
record convnext_calibrate python benchmarks/spatial_calibrate.py --model convnext_tiny
record swin_calibrate python benchmarks/spatial_calibrate.py --model swin_tiny_patch4_window7_224

# MCTF (issue 26). Speed against ToMe at the same per-block r (r=16 in blocks 1-11), three runs each
R16="[0,16,16,16,16,16,16,16,16,16,16,16]"
for run in 1 2 3; do
  record "mctf_speed_vit_tiny_run$run" tokensparse bench --model vit_tiny_patch16_224 --batch-size 64 --threads 2 \
    --runs 10 --method "tome:r=$R16" --method mctf:r=16,one_step_ahead=true --method mctf:r=16,one_step_ahead=false \
    --json "$OUT/mctf_speed_vit_tiny_run$run.json" --overwrite
  record "mctf_speed_deit_small_run$run" tokensparse bench --model deit_small_patch16_224 --batch-size 32 --threads 2 \
    --runs 10 --method "tome:r=$R16" --method mctf:r=16,one_step_ahead=true --method mctf:r=16,one_step_ahead=false \
    --json "$OUT/mctf_speed_deit_small_run$run.json" --overwrite
done
# fidelity to the authors' code: needs their logits, made outside this repository (see mctf_fidelity.txt)
if [ -n "${MCTF_REFERENCE:-}" ]; then
  record mctf_fidelity python benchmarks/authors_fidelity.py "none=$MCTF_REFERENCE/ref_r0.pt" \
    "mctf:r=16,one_step_ahead=true=$MCTF_REFERENCE/ref_r16_osa1.pt" \
    "mctf:r=16,one_step_ahead=false=$MCTF_REFERENCE/ref_r16_osa0.pt"
fi
# faithfulness at equal GMACs (about 0.73-0.75 and 0.78-0.80), both forms of MCTF, and tune's choices
T14="[0,14,14,14,14,14,14,14,14,14,14,14]"
record mctf_faithfulness python benchmarks/fidelity_table.py none tome:r=13 "tome:r=$T14" ppt \
  mctf:r=16,one_step_ahead=true mctf:r=15,one_step_ahead=true mctf:r=14,one_step_ahead=true \
  mctf:r=16,one_step_ahead=false mctf:r=17,one_step_ahead=false mctf:r=18,one_step_ahead=false

# ToFu, PiToMe, DiffRate, Zero-TPrune (issue 28). Reduction work against ToMe's at the same token counts
DR13="diffrate:prune_kept=[189,176,163,150,137,124,111,98,85,72,59,46],merge_kept=[183,170,157,144,131,118,105,92,79,66,53,40]"
for run in 1 2 3; do
  record "overhead_limit_post_tome_run$run" python benchmarks/overhead_limit.py --runs 11 --method tome:r=13 --method tofu:r=13 \
    --method pitome:r=13 --method "$DR13" --method zerotprune:r=13
done
# the two methods above ToMe's in those runs, against ToMe with 31 interleaved runs each
for run in 1 2 3; do
  record "overhead_limit_runs31_run$run" python benchmarks/overhead_limit.py --runs 31 --method tome:r=13 \
    --method pitome:r=13 --method zerotprune:r=13
done
# the reduction work alone (attention core, by-products, hooks; of the hooks, PiToMe's and Zero-TPrune's graph
# scores), timed inside the forward pass: no matmul jitter
# (reduction_work_before_run{1,2,3}.txt: the same command on commit 1a96b08, before this script's first changes)
for run in 1 2 3; do
  record "reduction_work_run$run" python benchmarks/reduction_work.py --runs 15 --method tome:r=13 --method tofu:r=13 \
    --method pitome:r=13 --method "$DR13" --method zerotprune:r=13
done
# Zero-TPrune's fidelity at other PageRank iteration counts than the paper's (30 / 5 / 1), against ToMe
record zerotprune_iterations python benchmarks/fidelity_table.py zerotprune \
  "zerotprune:iterations=[50,50,50,10,10,10,10,10,10,1,1,1]" "zerotprune:iterations=[10,10,10,5,5,5,5,5,5,1,1,1]" \
  "zerotprune:iterations=[3,3,3,3,3,3,3,3,3,1,1,1]" zerotprune:iterations=1 tome:r=13
# DiffRate's rates learned on the even-position images at each level, and tune's diffrate schedule at 0.80
for g in 0.73 0.80; do
  record "diffrate_calibrate_$g" tokensparse calibrate --model vit_tiny_patch16_224.augreg_in21k_ft_in1k \
    --weights "$W" --images "$I/images" --split even --method diffrate --gmacs "$g" --threads 2 \
    --out "$OUT/diffrate_calibrated_$g.spec" --overwrite
done
record tune_vit_tiny_diffrate_gmacs0.80 tokensparse tune --model vit_tiny_patch16_224.augreg_in21k_ft_in1k \
  --weights "$W" --images "$I/images" --wnids "$I/wnids.txt" --gmacs 0.80 --methods diffrate --threads 2 --batch-size 64 \
  --out "$OUT/tune_vit_tiny_diffrate_gmacs0.80" --overwrite
# DynamicViT's predictors calibrated on the even-position images at the rho that lands at each level
for rho in 0.64 0.7; do
  record "dynamicvit_calibrate_even_rho$rho" tokensparse calibrate --model vit_tiny_patch16_224.augreg_in21k_ft_in1k \
    --weights "$W" --images "$I/images" --split even --method "dynamicvit:rho=$rho" --threads 2 \
    --out "$OUT/dynamicvit_even_rho$rho.safetensors" --overwrite
done
# every method at ~0.73 and ~0.80 GMACs: top-1, agreement, KL, speed-up; the plot docs/leaderboard.png
record leaderboard python benchmarks/leaderboard.py --calibrated \
  "0.73=diffrate (calibrated)=$(cat "$OUT/diffrate_calibrated_0.73.spec")" \
  "0.80=diffrate (calibrated)=$(cat "$OUT/diffrate_calibrated_0.80.spec")" \
  "0.73=dynamicvit (calibrated)=dynamicvit:rho=0.64,predictors=$OUT/dynamicvit_even_rho0.64.safetensors" \
  "0.80=dynamicvit (calibrated)=dynamicvit:rho=0.7,predictors=$OUT/dynamicvit_even_rho0.7.safetensors"
# fidelity to the authors' code: needs their logits, made outside this repository (see {pitome,diffrate}_fidelity.txt)
if [ -n "${POST_TOME_REFERENCE:-}" ]; then
  R=$POST_TOME_REFERENCE
  record pitome_fidelity python benchmarks/authors_fidelity.py "pitome:ratio=0.9,prop_attn=false=$R/pitome_0.9.pt" \
    "pitome:ratio=0.95,prop_attn=false=$R/pitome_0.95.pt"
  record diffrate_fidelity python benchmarks/authors_fidelity.py \
    "diffrate:prune_kept=[196,196,195,193,187,183,177,163,155,136,128,20],merge_kept=[196,196,195,189,185,153,147,155,144,134,124,20]=$R/diffrate_1.0.pt" \
    "diffrate:prune_kept=[196,196,195,185,165,146,116,102,91,79,73,2],merge_kept=[196,195,189,171,153,124,106,95,83,77,69,2]=$R/diffrate_0.8.pt"
fi
