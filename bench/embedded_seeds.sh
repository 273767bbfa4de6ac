#!/usr/bin/env bash
# The embedded default's SFT → DPO → report for other seeds: `seed` in configs/tiny.toml and configs/dpo-tiny.toml,
# each seed in its own folder runs/seed<N>/ (the base and `make data`'s files are shared: runs/base, runs/data).
#     bench/embedded_seeds.sh 1 2            after `make sft dpo eval` (seed 0, runs/tiny, runs/tiny-dpo, runs/eval)
# Prints each seed's table (runs/seed<N>/eval/results.md); bench/embedded_seeds.py summarises them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
for seed in "$@"; do
    dir=runs/seed$seed
    mkdir -p "$dir"
    sed -e "s|^seed = .*|seed = $seed|" -e "s|runs/tiny|$dir/tiny|g" configs/tiny.toml > "$dir/tiny.toml"
    sed -e "s|^seed = .*|seed = $seed|" -e "s|runs/tiny|$dir/tiny|g" configs/dpo-tiny.toml > "$dir/dpo-tiny.toml"
    $PY -u train_sft.py --config "$dir/tiny.toml" --resume
    $PY -u train_dpo.py --config "$dir/dpo-tiny.toml" --resume
    $PY -u evaluate.py report --sft-run "$dir/tiny" --dpo-run "$dir/tiny-dpo" --out "$dir/eval" --seed "$seed"
done
