#!/bin/bash
# Record of the A/B run behind docs/performance.md, "Results": the code at 2e0048e checked out at /tmp/p2v-before
# (git worktree add /tmp/p2v-before 2e0048e), HEAD in /work/main, one venv, one thread, rounds alternating.
# A/B/A/B: the code at 2e0048e vs HEAD, same tiny bench command, one thread, same venv
. /work/main/.venv/bin/activate
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1
CMD="bench --model tiny --size 128 --steps 20 --frames 6 --backend torch --backend onnxruntime --repeats 3 --warmup 1 --threads 1"
for round in 1 2; do
  for side in before after; do
    dir=/work/main; [ $side = before ] && dir=/tmp/p2v-before
    cd $dir
    export P2V_CACHE=/tmp/benchcmp/cache-$side
    start=$(date +%s)
    python3 -c "import sys; from cli import main; sys.argv[0]='p2v'; main()" $CMD --json /tmp/benchcmp/$side-$round.json > /tmp/benchcmp/$side-$round.log 2>&1
    echo "$side round $round rc=$? $(( $(date +%s) - start ))s"
  done
done
