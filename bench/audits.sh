#!/usr/bin/env bash
# The audits behind the README's defense figures. Each line is one `leakkit audit`; rerun with
# RESUME=1 after an interruption. About 100 minutes on 2 CPU cores with Ray.
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
$L audit bert-exact task.name=sequence-classification --defense noise:std=0,1e-5,1e-4,1e-3 --defense prune:ratio=0.1,0.3,0.5,0.7 --input ${TEXT:-../shared/data/text/sst2_dev.tsv} --samples 10 --out $OUT/text $R --quiet
$L audit bert-exact task.name=sequence-classification --defense prune:ratio=0.1,0.5,0.9,0.99 --input ${TEXT:-../shared/data/text/sst2_dev.tsv} --samples 10 --out $OUT/text-prune $R --quiet
# masked LM under noise; Rotten Tomatoes is the held-out file (the token cut was set on an SST-2 sentence)
$L audit bert-exact --defense noise:std=0,1e-5,1e-4,1e-3 --input ${TEXT:-../shared/data/text/sst2_dev.tsv} --samples 8 --no-utility --out $OUT/text-mlm $R --quiet
$L audit bert-exact --defense noise:std=0,1e-5,1e-4,1e-3 --input ../shared/data/text/mr_dev.tsv --samples 8 --no-utility --out $OUT/text-mlm-rt $R --quiet
# text privacy against utility: held-out Rotten Tomatoes sentences attacked, the classifier fine-tuned on SST-2 under each defense
$L audit bert-exact task.name=sequence-classification utility.data=../shared/data/text/sst2_dev.tsv --defense noise:std=0,1e-5,1e-4,1e-3 --defense prune:ratio=0.9,0.99 --input ../shared/data/text/mr_dev.tsv --samples 10 --out $OUT/text-utility $R --quiet
