python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/d/*.whl 2>&1 | grep -v WARN | tail -2
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_triton_cluster.py tests/test_clustered.py 2>&1 | tail -4
timeout 120 python3 scripts/bench_clustered_cost.py --shapes wan1.3b-480p --inputs clip --densities 0.1 --engines flash --warm-iters 2 --reps 5 --profile 2>&1 | grep -v Warn | tee $OUT/cost.log | tail -45
timeout 330 python3 -m sparsevid bench pareto --methods draft clustered --densities 0.05 0.1 0.25 \
  --option draft:tail=none --option clustered:tail=centroid --option clustered:replan_every=4 \
  --option clustered:q_clusters=128 --option clustered:q_clusters=256 --option clustered:q_clusters=512 \
  --shapes wan1.3b-480p --reps 2 --testbeds large --cases 8 --steps 20 --quiet --out $OUT/pareto 2>&1 | grep -v Warn | tail -22
