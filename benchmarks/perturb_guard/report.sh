#!/bin/sh
# The report set of benchmarks/perturb-guard-rule.md (seeds 0-2, never used to choose): the registry's
# defaults as chosen (the rule kept them: guard off) and, for comparison, the best guard candidate of
# the grid as an option (--perturb guard=0.02,guard_budget=1: 2 repair rounds, then up to 3 halvings).
# Two lanes in parallel. Run from the repository root.
set -e
export OMP_NUM_THREADS=1
EVAL="python -m unlearn_ext eval --methods topk,randomk --ratios 0.01,0.05,0.1 --seeds 0,1,2 --noise-floor 0 --no-ud --quiet"
GUARD="--perturb guard=0.02,guard_budget=1"
MEM="--label-noise 0.2 --limit 300 --optimizer momentum --lr 0.02 --batch-size 32 --weight-decay 0 --epochs 150"
O=benchmarks/perturb_guard
( $EVAL --data digits --model cnn --json $O/report-digits-cnn.json
  $EVAL --data digits --model cnn $GUARD --json $O/report-digits-cnn-guard.json
  $EVAL --data digits --model cnn $MEM --ratios 0.1 --json $O/report-mem-digits-cnn.json
  $EVAL --data digits --model cnn $MEM --ratios 0.1 $GUARD --json $O/report-mem-digits-cnn-guard.json
) > $O/report-lane1.log 2>&1 &
( $EVAL --data digits --model resnet --limit 300 --json $O/report-digits-resnet.json
  $EVAL --data digits --model resnet --limit 300 $GUARD --json $O/report-digits-resnet-guard.json
  $EVAL --data tokens --model transformer --limit 300 --json $O/report-tokens-transformer.json
  $EVAL --data tokens --model transformer --limit 300 $GUARD --json $O/report-tokens-transformer-guard.json
) > $O/report-lane2.log 2>&1 &
wait
