#!/usr/bin/env bash
# Recipe search for the organism suite over training seeds, on a GPU machine (the runs of
# docs/ORGANISMS.md "Choosing the recipe"): several variants at once, one JSON line per run.
# Usage: OUT=dir ROUND=1|2 bash benchmarks/recipe_search.sh
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
P="python3 -m benchmarks.organism_population --device cuda --threads 1 --seeds ${SEEDS:-0-5}"
if [ "${ROUND:-1}" = 1 ]; then
$P --workers 5 --sizes xs,s,m,l --variant base --out $OUT/base.jsonl > $OUT/base.log 2>&1 &
$P --workers 2 --sizes xs --set steps=1600 --variant steps+40 --out $OUT/steps.jsonl > $OUT/steps_xs.log 2>&1 &
$P --workers 2 --sizes s --set steps=1400 --variant steps+40 --out $OUT/steps.jsonl > $OUT/steps_s.log 2>&1 &
$P --workers 2 --sizes xs,s --set lr=0.005 --variant lr5e-3 --out $OUT/lr5.jsonl > $OUT/lr5.log 2>&1 &
$P --workers 2 --sizes xs,s --set lr=0.002 --variant lr2e-3 --out $OUT/lr2.jsonl > $OUT/lr2.log 2>&1 &
$P --workers 2 --sizes xs,s --set decay_from=0.4 --variant decay0.4 --out $OUT/decay.jsonl > $OUT/decay.log 2>&1 &
elif [ "${ROUND}" = 2 ]; then
$P --workers 3 --sizes xs --set steps=1840 --variant steps+60 --out $OUT/s60.jsonl > $OUT/s60xs.log 2>&1 &
$P --workers 3 --sizes s --set steps=1600 --variant steps+60 --out $OUT/s60.jsonl > $OUT/s60s.log 2>&1 &
$P --workers 2 --sizes m --set steps=1760 --variant steps+60 --out $OUT/s60.jsonl > $OUT/s60m.log 2>&1 &
$P --workers 2 --sizes l --set steps=1920 --variant steps+60 --out $OUT/s60.jsonl > $OUT/s60l.log 2>&1 &
$P --workers 3 --sizes xs --set steps=2300 --variant steps+100 --out $OUT/s100.jsonl > $OUT/s100xs.log 2>&1 &
$P --workers 3 --sizes s --set steps=2000 --variant steps+100 --out $OUT/s100.jsonl > $OUT/s100s.log 2>&1 &
elif [ "${ROUND}" = 3 ]; then
$P --workers 5 --sizes xs --set steps=1840 --set heads=8 --variant xs-8heads --out $OUT/xs.jsonl > $OUT/xs_a.log 2>&1 &
$P --workers 5 --sizes xs --set steps=1840 --set intermediate=512 --variant xs-mlp512 --out $OUT/xs.jsonl > $OUT/xs_b.log 2>&1 &
$P --workers 5 --sizes xs --set steps=1840 --set hidden=192 --set heads=6 --variant xs-d192h6 --out $OUT/xs.jsonl > $OUT/xs_c.log 2>&1 &
fi
wait
cat $OUT/*.log | grep -E "induction [0-9]" | sort
