#!/bin/sh
# The reported set of benchmarks/perturb-defaults-rule.md: one `unlearn-ext eval` per setting, the
# defaults as the registry holds them (methods.PERTURB_SETTINGS["network"]). Two lanes in parallel.
set -e
export OMP_NUM_THREADS=1
EVAL="python -m unlearn_ext eval --methods topk,randomk,finetune --ratios 0.1 --seeds 0,1,2 --noise-floor 0 --no-ud --quiet"
O=benchmarks/perturb_defaults
( $EVAL --data digits --model cnn --label-noise 0.2 --limit 300 --optimizer momentum --lr 0.02 --batch-size 32 \
      --weight-decay 0 --epochs 150 --json $O/report-mem-digits-cnn.json --out $O/out-mem-digits-cnn
  $EVAL --data tokens --model transformer --json $O/report-gen-tokens-transformer.json --out $O/out-gen-tokens-transformer
) > $O/report-lane1.log 2>&1 &
( $EVAL --data digits --model cnn --json $O/report-gen-digits-cnn.json --out $O/out-gen-digits-cnn
  $EVAL --data mnist1d --limit 1500 --model resnet --json $O/report-gen-mnist1d-resnet.json --out $O/out-gen-mnist1d-resnet
) > $O/report-lane2.log 2>&1 &
wait
