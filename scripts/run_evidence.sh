#!/usr/bin/env bash
# The evidence of docs/evidence.md: `robustmedsam evaluate` on the 12 labelled real
# scans (EVALUATION ONLY) and the phantoms, models side by side, in phases ordered by
# value per CPU second. Every phase is resumable (finished cells are skipped) and the
# encoder outputs are shared through one --encoder-cache, so re-running with a model
# added (e.g. robustmedsam-lite) costs only its decoder and the slices it visits anew.
#
#   scripts/run_evidence.sh EVALDATA OUT CACHE MODEL_SPEC... [-- PHASE...]
#   scripts/run_evidence.sh /work/evaldata runs/evidence /tmp/enc \
#       litemedsam robustmedsam-lite demo=fused:/tmp/robustmedsam_demo.pth -- clean-3d clean-2d
#
# PHASES (default: all, in this order; they are ordered by value per CPU second):
#   clean-3d     real scans, 3D (one prompt on the central slice, then `segment --propagate`'s
#                pipeline: evaluation/volumetric.py), clean, seed 0
#   clean-2d     real scans, 2D (central slice), box and point, clean, seeds 0 1 2
#   clean-3d-seeds  3D clean, seeds 1 and 2 too
#   2d-subset    2D, clean + the 12 corruptions at severity 3, seeds 0 1 2 (corruption and
#                prompt jitter), on one case per source and modality (SUBSET below)
#   2d-degraded  the 2D corruptions on all 12 real scans
#   phantoms     phantom:all,count=1, 2D (clean + 12 corruptions) and 3D (clean), seeds 0 1 2:
#                phantoms-2d then phantoms-3d (each also a phase of its own)
#   3d-subset    3D, the 12 corruptions at severity 3, seed 0, on SUBSET
# Environment: PYTHON (default .venv/bin/python), DEVICE (default cpu), ENGINE (default
# openvino: the lite encoder under OpenVINO, float32, within 1e-5 of eager; ViT models eager),
# PROMPTS (default "box point": the first prompts every phase runs).
set -euo pipefail

data=$1 out=$2 cache=$3
shift 3
models=() phases=()
while [[ $# -gt 0 && $1 != "--" ]]; do models+=(--model "$1"); shift; done
[[ ${1:-} == "--" ]] && shift
phases=("$@")
[[ ${#phases[@]} -eq 0 ]] && phases=(clean-3d clean-2d clean-3d-seeds 2d-subset 2d-degraded phantoms 3d-subset)
python=${PYTHON:-.venv/bin/python}
device=${DEVICE:-cpu}
engine=${ENGINE:-openvino}
read -ra prompts <<< "${PROMPTS:-box point}"

# One data set per source package and modality, so that tables name where a case came
# from. The folders hold links into EVALDATA (written by scripts/fetch_eval_scans.py).
sets=$out/datasets
declare -A groups=(
  [pyradiomics-CT]="lung1_nodule lung2_mass"
  [pyradiomics-MR]="brain1_tumour brain2_tumour breast1_lesion"
  [totalsegmentator-CT]="abdct_kidney_left abdct_kidney_right abdct_liver abdct_spleen"
  [totalsegmentator-MR]="abdmr_kidney_left abdmr_kidney_right abdmr_liver"
)
# One case per group for the costly phases; same data set names, so cells match.
declare -A subset=(
  [pyradiomics-CT]="lung2_mass" [pyradiomics-MR]="brain1_tumour"
  [totalsegmentator-CT]="abdct_kidney_left" [totalsegmentator-MR]="abdmr_liver"
)
real=() some=()
link() {  # link FOLDER CASE...: images/ and labels/ of the cases, linked into FOLDER
  local folder=$1; shift
  mkdir -p "$folder/images" "$folder/labels"
  for case in "$@"; do
    for kind in images labels; do
      ln -sfn "$(realpath "$data/$kind/$case.nii.gz")" "$folder/$kind/$case.nii.gz"
    done
  done
}
first=() rest=()  # one data spec per case (same data set names): the subset's cases first
for name in "${!groups[@]}"; do
  link "$sets/$name" ${groups[$name]}
  link "$sets/subset/$name" ${subset[$name]}
  real+=(--data "pairs:$sets/$name,modality=${name##*-},name=$name")
  some+=(--data "pairs:$sets/subset/$name,modality=${name##*-},name=$name")
  for case in ${groups[$name]}; do
    link "$sets/case/$case" "$case"
    spec="pairs:$sets/case/$case,modality=${name##*-},name=$name"
    if [[ $case == "${subset[$name]}" ]]; then first+=("$spec"); else rest+=("$spec"); fi
  done
done

common=(--encoder-cache "$cache" --device "$device" --engine "$engine" --out "$out" --no-progress
        --prompt "${prompts[@]}" --projection mask --severities 3 --clicks 0 --prompt-jitter 0.1)
evaluate() { nice -n 19 "$python" -m RobustMedSAMLib evaluate "${models[@]}" "${common[@]}" "$@"; }
# The 3D phases go case by case (3d-subset: type by type), every model in each call: the
# harness runs one model after the other, so a run stopped early still leaves all models
# on the same cells. The cells are those of one call over all cases.
by_case() { for spec in "${first[@]}" "${rest[@]}"; do evaluate --data "$spec" "$@"; done; }
by_type() {
  for type in $("$python" -c 'from RobustMedSAMLib.corruptions import CORRUPTIONS; print(*CORRUPTIONS)'); do
    evaluate "${some[@]}" --corruptions "$type" "$@"
  done
}
phantoms_2d() {
  evaluate --data phantom:all,count=1,name=phantoms --protocol interactive --corruptions all --seeds 0 1 2
}
phantoms_3d() {
  evaluate --data phantom:all,count=1,name=phantoms --protocol volumetric --corruptions clean --seeds 0 1 2
}

for phase in "${phases[@]}"; do
  echo "=== phase $phase $(date -u +%FT%TZ)"
  case $phase in
    clean-2d) evaluate "${real[@]}" --protocol interactive --corruptions clean --seeds 0 1 2 ;;
    clean-3d) by_case --protocol volumetric --corruptions clean --seeds 0 ;;
    clean-3d-seeds) by_case --protocol volumetric --corruptions clean --seeds 0 1 2 ;;
    2d-subset) evaluate "${some[@]}" --protocol interactive --corruptions all --seeds 0 1 2 ;;
    2d-degraded) evaluate "${real[@]}" --protocol interactive --corruptions all --seeds 0 1 2 ;;
    phantoms) phantoms_2d; phantoms_3d ;;
    phantoms-2d) phantoms_2d ;;
    phantoms-3d) phantoms_3d ;;
    3d-subset) by_type --protocol volumetric --seeds 0 ;;
    *) echo "unknown phase $phase" >&2; exit 2 ;;
  esac
done
echo "=== done $(date -u +%FT%TZ)"
