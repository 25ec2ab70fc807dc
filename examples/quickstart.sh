#!/usr/bin/env bash
# The README's first command after `pip install -e ".[plot]"`: train the C1 network with ABSA on 2,000 images
# of the offline synthetic data set (no download), then analyse the checkpoint: the top-3 Hessian
# eigenvalues, the trace and the spectral density (runs/quickstart/: the log, metrics.json, the checkpoint,
# spectrum.json and the PNG figures). A few minutes on two CPU cores. Run from anywhere in a checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
set -x
python train.py --name synthetic --synthetic-train 2000 --synthetic-test 500 --arch c1 --epochs 4 --batch-size 64 \
    --large-ratio 4 --duration 1 --lr 0.02 --lr-decay-epoch 3 --out-dir runs/quickstart --save runs/quickstart/model_param.pkl
python hessian_eig_driver.py --resume runs/quickstart/model_param.pkl --hessian-batch-size 64 --top-k 3 --trace \
    --trace-matvecs 30 --density --density-runs 1 --density-steps 40 --json runs/quickstart/spectrum.json
