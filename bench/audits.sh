#!/usr/bin/env bash
# The audits behind the README's defense figures. Each line is one `leakkit audit`; rerun with
# RESUME=1 after an interruption. About two hours on 2 CPU cores with Ray.
set -euo pipefail
L=${LEAKKIT:-leakkit}
OUT=${OUT:-audits}
R="--backend ray ${RESUME:+--resume}"  # RESUME=1 continues audits an interruption left
# the attacker's budget for the image grids: one restart per candidate and image (the recipes allow four)
A="attack.restarts=1"
# the image grids attack seed 23's photos and weights: the noise-aware prior's scale was chosen on seed 0
S="--seed 23"
# image defenses and settings: `auto`, the strongest attack we have (rgap, idlg, dlg, inverting-gradients per update)
$L audit auto $A $S --defense noise:std=0,1e-4,1e-3,1e-2,1e-1 --samples 16 --out $OUT/auto-noise $R --quiet
$L audit auto $A $S --defense fp16 --defense prune:ratio=0.1,0.3,0.5,0.7,0.9 --samples 8 --out $OUT/auto-prune $R --quiet
$L audit auto $A $S --grid task.model=lenet,lenet-relu --samples 8 --out $OUT/auto-activation $R --quiet
$L audit auto $A $S --grid data.batch_size=1,4,16 --samples 16 --no-utility --out $OUT/auto-batch $R --quiet
$L audit auto $A $S --grid task.image_size=32,64 --samples 4 --no-utility --out $OUT/auto-resolution $R --quiet
# the same grids with `dlg` alone, one restart (the README's earlier tables, seed 0)
$L audit dlg $A --defense noise:std=0,1e-4,1e-3,1e-2,1e-1 --samples 16 --out $OUT/noise $R --quiet
$L audit dlg $A --defense fp16 --defense prune:ratio=0.01,0.1,0.2,0.3,0.5,0.7 --samples 8 --out $OUT/prune $R --quiet
$L audit bert-exact task.name=sequence-classification --defense noise:std=0,1e-5,1e-4,1e-3 --defense prune:ratio=0.1,0.3,0.5,0.7 --input ${TEXT:-../shared/data/text/sst2_dev.tsv} --samples 10 --out $OUT/text $R --quiet
$L audit bert-exact task.name=sequence-classification --defense prune:ratio=0.1,0.5,0.9,0.99 --input ${TEXT:-../shared/data/text/sst2_dev.tsv} --samples 10 --out $OUT/text-prune $R --quiet
$L audit dlg $A --grid task.model=lenet,lenet-relu --samples 8 --out $OUT/activation $R --quiet
$L audit dlg $A --grid data.batch_size=1,4,16 --samples 16 --no-utility --out $OUT/batch $R --quiet
$L audit dlg $A --grid task.image_size=32,64,128 --samples 4 --no-utility --out $OUT/resolution $R --quiet
$L audit dlg $A attack.ignore_zeros=true --defense prune:ratio=0.1,0.3,0.5,0.7,0.9 --samples 8 --no-utility --out $OUT/prune-aware $R --quiet
