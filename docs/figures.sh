#!/usr/bin/env bash
# `make docs-figures`: copy the figures the docs show from the outputs of the project's own
# tools into docs/images/ (nothing here is drawn by hand):
#   make study  -> work_dirs/ratio_study/ratio_study.png, work_dirs/statdiff_study/statdiff_study.png
#   make demo   -> work_dirs/demo/sn_ratios.png, sn_ratios_training.png (SSN only), predictions/
# A figure whose tool has not run is left as it is, with the command that makes it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
IMAGES=docs/images
mkdir -p "$IMAGES"
copied=0
missing=0

copy() {  # copy SOURCE TARGET COMMAND
    if [ -f "$1" ]; then
        cp "$1" "$IMAGES/$2"
        echo "[mmnorm docs] $IMAGES/$2 <- $1"
        copied=$((copied + 1))
    else
        echo "[mmnorm docs] $IMAGES/$2: no $1 (made by: $3); left as it is"
        missing=$((missing + 1))
    fi
}

copy work_dirs/ratio_study/ratio_study.png ratio_study_digits.png 'make study'
copy work_dirs/statdiff_study/statdiff_study.png statdiff_study_digits.png 'make study'
copy work_dirs/demo/sn_ratios.png demo_sn_ratios.png 'make demo'
# The first two validation images with the demo model's predictions drawn on them.
i=0
if [ -d work_dirs/demo/predictions ]; then
    while IFS= read -r image; do
        i=$((i + 1))
        copy "$image" "demo_prediction_$i.png" 'make demo'
    done < <(find work_dirs/demo/predictions -name '*.png' | sort | head -2)
fi
[ "$i" -gt 0 ] || copy work_dirs/demo/predictions/'*.png' 'demo_prediction_<n>.png' 'make demo'
echo "[mmnorm docs] $copied figure(s) copied, $missing not made yet; rebuild with make docs"
